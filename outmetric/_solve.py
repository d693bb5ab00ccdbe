r"""The output-metric solve: $\delta = D^+ g$ and its damped variant, for every caller.

Flows, the optimizer and the geometry diagnostics all reduce to one linear-algebra problem
with the output Jacobian $D \in \mathbb{R}^{M\times K}$ ($M = QN$) and a right-hand side
$g \in \mathbb{R}^M$:

$$\delta = D^{+} g \qquad\text{or, with damping } \lambda > 0,\qquad
\delta = D^\top(DD^\top + \lambda I)^{-1} g = (D^\top D + \lambda I)^{-1}D^\top g.$$

The two damped forms are the same vector, so each method works on the smaller side: the
$M\times M$ Gram $DD^\top$ when $M \le K$, the $K\times K$ matrix $D^\top D$ otherwise.

Methods (the `solver` argument):

- `"cholesky"`: Cholesky of the (damped) Gram matrix. Fast; the hot path of the optimizer.
  Its pivots give a rank estimate (not a rank-revealing one: see "Rank" below); a non-finite
  or numerically zero pivot (rank loss with too little damping), or undamped a pivot below
  the cut-off, switches to `"svd"`, and the result says so (`fallback=True`). The Gram may
  come from a dense D, from chunks of D never held together (`chunk_size`), or, on the wide
  side, from the model's dense-layer structure (`gram="structured"`; `outmetric._gram`). Without
  a dense D, δ = Dᵀz is one VJP, and the rank-revealing fallback is the eigendecomposition of
  the Gram, $\delta = D^\top U\,\mathrm{diag}(1/(\mu_i + \lambda))\,U^\top g$ over eigenvalues
  $\mu_i > \max(\mathrm{rtol}^2, n\epsilon)\,\mu_{\max}$ (wide side; the tall side is analogous): it
  resolves singular values down to about $\sqrt{n\epsilon}\,\sigma_{\max}$ rather than
  rtol·σ_max, the price of never forming D.
- `"qr"`: QR of $D^\top$ (or $D$), on the matrix augmented by $\sqrt\lambda I$ when damped.
  Accurate to $\kappa(D)\,\epsilon$ rather than $\kappa(D)^2\epsilon$; the default of the
  undamped flows. The rank is read off the singular values of the small triangle R (an
  n×n SVD, n = min(M, K); R's diagonal alone misses ill-conditioning, as on Kahan's matrix);
  rank loss switches to `"svd"`.
- `"svd"`: the rank-revealing reference: singular values below `rtol`·σ_max are dropped,
  $\delta = V\,\mathrm{diag}(\sigma/(\sigma^2 + \lambda))\,U^\top g$. Expensive; never the default.
- `"cg"`: matrix-free conjugate gradients (lineax) on the damped Gram operator of the smaller
  side; each product is one JVP plus one VJP and D is never formed. Memory O(K + M).
  Optional preconditioners (`preconditioner=`): `"jacobi"`, the inverse of the damped Gram
  diagonal (one chunked pass of per-sample Jacobians), and `"nystrom"`, the randomized Nyström
  preconditioner of rank ℓ (Frangella, Tropp & Udell 2023) built from ℓ Gram products,
  $P^{-1} = (\hat\mu_\ell + \lambda)\,U(\hat M + \lambda I)^{-1}U^\top + (I - UU^\top)$, which pays
  when the spectrum decays fast, as NTK spectra do.
- `"eigh"`: the eigendecomposition of the Gram of the smaller side (formed as for
  `"cholesky"`, structured or chunked where that applies), $\delta = D^\top U(\Lambda +
  \lambda I)^{-1}U^\top g$ (wide; the tall side is analogous): rank-revealing like `"svd"` without
  a dense D, accurate to κ(D)²ε. With `"svd"` it is a *spectral* factorization: the optimizer
  factors once per linearization and then solves for every λ it tries in O(n)
  (`SpectralFactor`, DESIGN §6).
- `"lsmr"`: matrix-free LSMR (lineax) on D itself, on $[D;\sqrt\lambda I]$ with right-hand
  side $[g; 0]$ when damped: the minimum-norm least-squares solution, so $D^+g$ even under
  rank loss, with κ(D) rather than κ(D)² governing convergence. One JVP and one VJP per
  iteration; memory O(K + M).
- `"auto"`: see `plan_solve` (the optimizer asks for a spectral factorization on the tall side). From M, K, the dtype and the device's memory (`memory_budget`; the total, so the pick is
  deterministic and a resumed run makes the same one):
  while D fits, `"qr"` for an undamped solve (damping given as the Python number 0) and
  `"cholesky"` otherwise (with the structured Gram when the model has dense layers and the
  wide side is solved); when only the Gram fits, `"cholesky"` on a structured or chunked Gram;
  else matrix-free, `"lsmr"` undamped and `"cg"` damped. The pick is logged (logger
  ``"outmetric"``, level INFO) and reported in the optimizer state.

**Rank.** Every method measures rank on one scale, the singular values σ of D relative to
σ_max: a direction counts when $\sigma_i > \mathrm{rtol}\cdot\sigma_{\max}$ (default rtol =
max(M, K)·ε, as `numpy.linalg.matrix_rank`). `"svd"` and `"qr"` (the SVD of R) compute σ
itself; `"eigh"` and the Gram fallback take $\sigma_i = \sqrt{\mu_i}$ from the Gram's eigenvalues,
with the floor $\sqrt{n\epsilon}\,\sigma_{\max}$ below which μ is round-off of the Gram;
`"cholesky"` counts $\sqrt{p_i - \lambda}$ from its pivots $p_i$ against $\sqrt{\max_i G_{ii}}$
and, since pivots (like R's diagonal) are not rank-revealing, checks the smallest eigenvalue
of the damped Gram, found by three inverse iterations with the factor ($O(n^2)$ each), against
the same cut-off (with the Gram's floor). Undamped, a direction below the cut-off is rank
lost and dropped: the step is the pseudo-inverse's (the SVD or eigh fallback).

Dense factorizations call LAPACK through `jax.numpy.linalg` rather than lineax's dense solvers
because the rank estimate and fallback need the factors themselves; the matrix-free paths are
lineax's `CG` and `LSMR`. A product with a matrix's transpose is written $v^\top U$ (``v @ U``),
never ``U.T @ v``: XLA's CPU backend runs the latter as a slow transposed kernel, 13× slower at
17,970 × 686 in float64 (47 ms against 3.6 ms), which made the Nyström preconditioner cost three
Gram-vector products per CG iteration on the digits theorem run.

Several devices: every piece is a per-sample map (Jacobian rows, activations and signals of
the structured Gram, JVPs) or a reduction over samples (Gram tiles, VJPs), so with inputs and
targets sharded along the sample axis (`outmetric.shard_samples`) a jitted step runs where the
data lives under GSPMD and gives the single-device result up to the order of summation.
"""

import logging
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._gram import (
    GRAM_METHODS,
    gram_diagonal,
    jacobian_gram,
    structured_flops,
    structured_gram,
)
from ._problem import Problem, check_chunk_size

SOLVERS = ("auto", "cholesky", "qr", "svd", "cg", "lsmr", "eigh")

#: The methods that hold a Gram matrix of the smaller side.
GRAM_SOLVERS = ("cholesky", "eigh")

#: The matrix-free methods: D is never formed.
MATRIX_FREE = ("cg", "lsmr")

#: Preconditioners of the "cg" method.
PRECONDITIONERS = (None, "jacobi", "nystrom")

#: "auto" picks the SVD of a dense D for a caller that tries many λ per linearization (the
#: optimizer) on the tall side (K < QN) up to this many parameters: one SVD then serves every λ.
SPECTRAL_MAX_PARAMS = 2048

#: A fixed memory budget in bytes for "auto"; None reads the device's memory (`memory_budget`).
DENSE_BUDGET_BYTES: int | None = None

#: The fraction of the device (or host) memory that "auto" plans to fill.
MEMORY_FRACTION = 0.5

#: "auto" chunks the Gram only while it takes at most this many chunks (else matrix-free).
MAX_AUTO_CHUNKS = 16

#: `gram="auto"` uses the structured Gram when D fits only if multiplying out DDᵀ would take at
#: least this many multiply-adds (M²K) and the structured products at most half as many.
STRUCTURED_MIN_FLOPS = 10**8

#: A rough sustained rate (flop/s) per backend for float64, used only to warn about slow steps
#: (`estimate_step_flops`); the CPU figure is per core. float32 counts twice as fast.
ROUGH_FLOPS_PER_S = {"cpu": 1e10, "gpu": 2e13, "tpu": 5e13}

#: `plan_solve` logs a WARNING when a step's estimated time exceeds this many seconds.
SLOW_STEP_SECONDS = 10.0

#: Gram products of a Nyström sketch computed together (vectorized). At QN = 17,970,
#: K = 71,935 on 2 loaded CPU cores, 32 at a time took the first update as long as 8 at a time
#: (118 s and 122 s with compilation) and peaked 1.0 GiB higher (3.12 and 2.08 GiB).
SKETCH_BATCH = 8

#: ℓ of the Nyström sketch that the optimizer keeps across updates on the wide side
#: (`preconditioner="nystrom"` without a rank, or "auto" picking "cg"; `sketch_rank`).
SKETCH_RANK = 800

#: "auto" picks the matrix-free "cg" (with the kept Nyström sketch) for the optimizer on the wide
#: side when one Cholesky of the M×M Gram, M³/3 flops, costs more than this many Gram-vector
#: products (8NK flops each): measured on digits at QN = 17,970, K = 71,935, one Cholesky is
#: about 1,900 products and a preconditioned update 100–300 plus the sketch's ℓ once.
MATRIX_FREE_PRODUCTS = 1000

#: On the tall side the matrix-free step computes the column norms diag(DᵀD) (its scaling) from
#: per-sample Jacobians in chunks of at most this many bytes (`_column_chunk`).
COLUMN_CHUNK_BYTES = 2**25

#: The CG/LSMR iterations a matrix-free step is assumed to take for that estimate.
ASSUMED_KRYLOV_ITERATIONS = 50

logger = logging.getLogger("outmetric")


class SolveResult(NamedTuple):
    """What a solve returns.

    - `delta`: the solution, a flat vector of length K.
    - `rank`: estimated rank of D (from the factorization; -1 for matrix-free solves).
    - `fallback`: whether the rank-revealing SVD fallback was taken.
    - `converged`: False only when an iterative solve stopped before its tolerance.
    - `num_steps`: iterations of a matrix-free solve (0 for the direct methods).
    - `finite`: False when the data of the solve (D, its products, or the right-hand side) held
      NaN or inf. `delta` is then zero (never NaN), and callers must not read it as a step:
      the flows turn it into a non-finite velocity, `fit` into a `NonFiniteError`.
    """

    delta: Float[Array, " K"]
    rank: Int[Array, ""]
    fallback: Bool[Array, ""]
    converged: Bool[Array, ""]
    num_steps: Int[Array, ""] = np.asarray(0, np.int32)
    finite: Bool[Array, ""] = np.asarray(True)


class Linearization(NamedTuple):
    """D at one point, dense (`jacobian`) or matrix-free (`jvp`, `vjp`), plus the outputs there.

    `gram` caches the Gram matrix of the smaller side (DDᵀ if M ≤ K, else DᵀD) for the Cholesky
    method, so repeated solves with different damping (Levenberg–Marquardt) form it once; it
    may be present without `jacobian` (chunked or structured Gram), products with D then going
    through `jvp`/`vjp`. `diagonal`, when set, computes the diagonal of that Gram on demand (the
    Jacobi preconditioner); `column_diagonal` computes diag(DᵀD), the squared column norms of D
    (the scaled damping and the gtol test). Built by `linearize` inside a traced function; not meant to cross
    a `jit` boundary.
    """

    outputs: Float[Array, "N Q"]
    flat_params: Float[Array, " K"]
    unravel: Callable[[Array], PyTree]
    jacobian: Float[Array, "M K"] | None
    jvp: Callable[[Array], Array] | None
    vjp: Callable[[Array], Array] | None
    gram: Float[Array, "n n"] | None = None
    diagonal: Callable[[], Array] | None = None
    column_diagonal: Callable[[], Array] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.outputs.size, self.flat_params.shape[0])

    def matvec(self, v: Float[Array, " K"]) -> Float[Array, " M"]:
        """D·v."""
        return self.jacobian @ v if self.jacobian is not None else self.jvp(v)

    def rmatvec(self, w: Float[Array, " M"]) -> Float[Array, " K"]:
        """Dᵀ·w."""
        return w @ self.jacobian if self.jacobian is not None else self.vjp(w)


def is_static_zero(damping) -> bool:
    """True when `damping` is the Python number 0 (so the undamped formulas apply statically)."""
    return isinstance(damping, (int, float)) and damping == 0


def check_solver_name(solver) -> None:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not a known solver; choose one of {list(SOLVERS)}")


def _host_total_bytes() -> int:
    """MemTotal from /proc/meminfo (Linux), else the physical pages, else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def memory_budget(device=None) -> int:
    """The bytes that `solver="auto"` plans to fill on `device` (default: the first local device).

    `DENSE_BUDGET_BYTES` when set; else `MEMORY_FRACTION` of the device's memory: on an
    accelerator ``bytes_limit`` from ``device.memory_stats()``, on CPU the host's physical
    memory. Deliberately the total, not what is free right now: the plan, and so the solver
    "auto" picks, is then a function of the shapes, the dtype and the machine only, and a run
    resumed from a checkpoint (or a step retraced later) makes the same choice — what a
    bit-identical resume needs. Pass `memory_budget=` (or set `DENSE_BUDGET_BYTES`) when other
    work shares the memory.
    """
    if DENSE_BUDGET_BYTES is not None:
        return int(DENSE_BUDGET_BYTES)
    device = jax.local_devices()[0] if device is None else device
    total = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats and "bytes_limit" in stats:
        total = int(stats["bytes_limit"])
    if total is None:
        total = _host_total_bytes()
    return int(MEMORY_FRACTION * total)


class SolvePlan(NamedTuple):
    """How a step will be computed; what `plan_solve` returns.

    - `method`: the concrete method, one of `SOLVERS` other than "auto".
    - `chunk_size`: samples per chunk of the per-sample Jacobian (None: all at once).
    - `gram`: for "cholesky", where the Gram comes from: "structured" (dense-layer structure,
      no D) or "jacobian" (D, or its chunks).
    - `reason`: one line saying why, with the sizes.
    """

    method: str
    chunk_size: int | None
    gram: str
    reason: str


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _auto_plan(damping, num_rows, num_params, itemsize, budget, *, structured, num_samples,
               output_dim, chunkable, chunk_size, structured_pays=None,
               many_dampings=False) -> SolvePlan:
    """The "auto" decision from sizes and memory (see `plan_solve`)."""
    small = min(num_rows, num_params)
    wide = num_rows <= num_params
    dense = num_rows * num_params * itemsize
    gram = small * small * itemsize
    sizes = f"M={num_rows}, K={num_params}, budget {_bytes(budget)}"
    undamped = is_static_zero(damping)
    structured_pays = structured if structured_pays is None else structured_pays
    # QR and the SVD fallback each hold about one more copy of D; Cholesky holds the Gram, its
    # factor and the fallback's eigenvectors.
    if undamped and 3 * dense <= budget:
        return SolvePlan("qr", chunk_size, "jacobian",
                         f"D fits ({_bytes(dense)}; the solve needs about {_bytes(3 * dense)}); "
                         f"{sizes}")
    if many_dampings and not wide and num_params <= SPECTRAL_MAX_PARAMS and 3 * dense <= budget:
        return SolvePlan("svd", chunk_size, "jacobian",
                         f"tall side, D fits: one SVD serves every damping tried (about "
                         f"{_bytes(3 * dense)}); {sizes}")
    cholesky_flops = small**3 / 3
    product_flops = 8.0 * num_samples * num_params
    if many_dampings and wide and not undamped and (
            cholesky_flops > MATRIX_FREE_PRODUCTS * product_flops):
        rank = sketch_rank(num_params, itemsize, budget)
        return SolvePlan("cg", chunk_size, "jacobian",
                         f"one Cholesky of the {num_rows}² Gram ({cholesky_flops:.1e} flops) costs "
                         f"more than {MATRIX_FREE_PRODUCTS} Gram-vector products ({product_flops:.1e} "
                         f"flops each): CG on the output side with a kept Nyström sketch of rank "
                         f"{rank} (about {_bytes(sketch_bytes(rank, num_rows, num_params, itemsize))}"
                         f"); {sizes}")
    dense_route_flops = num_rows * num_params**2 + num_params**3 / 3
    if many_dampings and not wide and not undamped and (
            dense_route_flops > MATRIX_FREE_PRODUCTS * product_flops):
        chunk = chunk_size if chunk_size is not None else _column_chunk(
            num_samples, output_dim, num_params, itemsize)
        memory = _bytes(estimate_memory_bytes(
            SolvePlan("cg", chunk, "jacobian", ""), num_rows, num_params, itemsize, num_samples,
            sketch=sketch_rank(num_params, itemsize, budget)))
        return SolvePlan("cg", chunk, "jacobian",
                         f"forming the {num_params}² DᵀD and one Cholesky of it "
                         f"({dense_route_flops:.1e} flops) cost more than {MATRIX_FREE_PRODUCTS} "
                         f"Gram-vector products ({product_flops:.1e} flops each): CG on the "
                         f"parameter side, preconditioned by the column scaling (column norms "
                         f"{chunk} samples at a time) and a kept Nyström sketch of DᵀD (about "
                         f"{memory}); {sizes}")
    if not undamped and structured_pays and wide and 3 * gram <= budget:
        return SolvePlan("cholesky", chunk_size, "structured",
                         f"dense layers found; structured Gram ({_bytes(gram)}; the solve "
                         f"needs about {_bytes(3 * gram)}); {sizes}")
    if not undamped and 2 * dense + 3 * gram <= budget:
        return SolvePlan("cholesky", chunk_size, "jacobian",
                         f"D and its Gram fit ({_bytes(dense + gram)}; the solve needs about "
                         f"{_bytes(2 * dense + 3 * gram)}); {sizes}")
    if structured and wide and 3 * gram <= budget:
        return SolvePlan("cholesky", chunk_size, "structured",
                         f"D does not fit, the structured Gram does; {sizes}")
    if chunkable and 3 * gram <= budget:
        rows_per_sample = output_dim * num_params * itemsize * (2 if wide else 1)
        fit = int((budget - 3 * gram) // max(rows_per_sample, 1))
        size = chunk_size if chunk_size is not None else max(1, min(fit, num_samples))
        if -(-num_samples // size) <= MAX_AUTO_CHUNKS and size <= max(fit, 1):
            return SolvePlan("cholesky", size, "jacobian",
                             f"D does not fit, its Gram does: chunks of {size} samples; {sizes}")
    method = "lsmr" if undamped else "cg"
    return SolvePlan(method, chunk_size, "jacobian", f"neither D nor its Gram fits; {sizes}")


def _column_chunk(num_samples: int, output_dim: int, num_params: int, itemsize: int) -> int:
    """Samples per chunk of the column norms diag(DᵀD) on the matrix-free tall side: the
    chunk's per-sample Jacobians take at most `COLUMN_CHUNK_BYTES`."""
    per_sample = max(output_dim * num_params * itemsize, 1)
    return int(max(1, min(num_samples, COLUMN_CHUNK_BYTES // per_sample)))


def sketch_rank(num_params: int, itemsize: int, budget: int | None = None) -> int:
    """ℓ of the Nyström sketch the optimizer keeps when "auto" may pick "cg": `SKETCH_RANK`, at
    most K/64, and small enough that the kept K×ℓ array takes at most 1/32 of the budget (it is
    allocated at `init`, before the plan is known, and unused when the plan is a dense one)."""
    budget = memory_budget() if budget is None else budget
    return int(max(0, min(SKETCH_RANK, num_params // 64,
                          budget // (32 * num_params * itemsize))))


def sketch_bytes(rank: int, num_rows: int, num_params: int, itemsize: int) -> int:
    """Memory of a kept Nyström sketch of rank ℓ: 2Kℓb for the K×ℓ array in the optimizer
    state (the state and the compiled loop's copy of it; `fit` keeps no previous state), plus
    4Mℓb while sketching (the M×ℓ test matrix, its image, the factor B and U). At M = 17,970,
    K = 71,935, ℓ = 686 this rule gives 1.1 GiB; the first update grew the peak RSS by 1.44 GiB
    when `fit` still carried a previous state (the rule then counted 4Kℓb: 2.0 GiB)."""
    return rank * (2 * num_params + 4 * num_rows) * itemsize


def resolve_solver(solver: str, damping, num_rows: int, num_params: int, dtype, *,
                   budget: int | None = None) -> str:
    """The concrete method that `solver` stands for at this size; validates the name.

    "auto" follows `plan_solve` for a model of unknown structure that is not chunked.
    """
    check_solver_name(solver)
    if solver != "auto":
        return solver
    budget = memory_budget() if budget is None else budget
    return _auto_plan(damping, num_rows, num_params, jnp.dtype(dtype).itemsize, budget,
                      structured=False, num_samples=num_rows, output_dim=1, chunkable=False,
                      chunk_size=None).method


def plan_solve(problem: Problem, params: PyTree, *, solver: str = "auto",
               damping: float | Float[Array, ""] = 0.0, chunk_size: int | None = None,
               gram: str = "auto", memory_budget: int | None = None,
               many_dampings: bool = False) -> SolvePlan:
    r"""Decide how to compute $D^+g$ (damped: $D^\top(DD^\top+\lambda I)^{-1}g$) for `problem` at `params`.

    With $M = QN$ rows, K parameters, $n = \min(M, K)$, b bytes per number and a budget B
    (`memory_budget`, default `MEMORY_FRACTION` of the device's memory), `solver="auto"` picks, in
    order:

    1. undamped (`damping` the Python number 0) and $3MKb \le B$: `"qr"` on the dense D;
       for a caller that tries many λ per linearization (`many_dampings=True`, the optimizer),
       on the tall side ($K < M$, $K \le$ `SPECTRAL_MAX_PARAMS`) with $3MKb \le B$: `"svd"`, one
       SVD of D for every λ (`SpectralFactor`);
    1a. for the optimizer (`many_dampings=True`), damped, on the wide side, when one Cholesky
       of the M×M Gram ($M^3/3$ flops) costs more than `MATRIX_FREE_PRODUCTS` Gram-vector
       products ($8NK$ flops each): `"cg"`, which the optimizer runs on the output side with a
       kept Nyström sketch (`output_space_cg`, `sketch_rank`); on the tall side ($K < M$),
       when forming $D^\top D$ and one Cholesky of it ($MK^2 + K^3/3$ flops) cost more than
       `MATRIX_FREE_PRODUCTS` products: `"cg"`, which the optimizer runs on the parameter side
       (`normal_equations_cg`, warm-started, column-scaled, preconditioned by the kept
       Nyström sketch of $D^\top D$), with `chunk_size` the samples per
       chunk of the column norms (`COLUMN_CHUNK_BYTES`). Measured on digits cross-entropy
       (M = 13,470, K = 9,610): 0.4–1.4 s a step against 352 s for the dense Cholesky one; on
       the first 300 digits a lower cost than the dense Cholesky steps at each of 15 steps
       (and than the SVD's after the first);
       the output-side CG (unpreconditioned; the kept sketch lives on the wide side) took the
       same steps with 5–90 times the iterations;
    2. damped, the wide side ($M \le K$), dense layers found (`gram_structure`) that make the
       structured Gram pay (`STRUCTURED_MIN_FLOPS`) and $3M^2b \le B$: `"cholesky"` on the
       structured Gram (D never formed);
    3. damped and $2MKb + 3n^2b \le B$: `"cholesky"` on $DD^\top$ or $D^\top D$ from a dense D;
    4. the structured Gram fits ($3M^2b \le B$, wide side): `"cholesky"` on it, damped or not;
    5. only the Gram fits: `"cholesky"` on a chunked Gram, with the largest `chunk_size`
       whose Jacobian chunks fit beside it, if that takes at most `MAX_AUTO_CHUNKS` chunks;
    6. otherwise matrix-free: `"lsmr"` undamped, `"cg"` damped.

    An explicit `solver` is kept; then `gram="auto"` means structured for `"cholesky"` on the
    wide side when dense layers are found and it pays: multiplying out $DD^\top$ would take at
    least `STRUCTURED_MIN_FLOPS` multiply-adds and the structured products at most half as
    many (for tiny problems the dense D is faster). The choice for "auto" is logged at INFO
    level on the ``"outmetric"`` logger.

    **Arguments:**

    - `problem`, `params`: the problem and the point.
    - `solver`: one of `SOLVERS`.
    - `damping`: λ; only whether it is the static number 0 matters here.
    - `chunk_size`: a positive int to compute per-sample Jacobians (and the Gram) in chunks of
      that many samples, or None.
    - `gram`: `"auto"`, `"structured"` or `"jacobian"` (see `outmetric.gram_matrix`).
    - `memory_budget`: bytes; default `memory_budget()`.
    - `many_dampings`: the caller solves for several λ per linearization.
    """
    check_solver_name(solver)
    check_chunk_size(chunk_size)
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram={gram!r} is not a Gram method; choose one of {list(GRAM_METHODS)}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or
                                      not isinstance(memory_budget, (int, np.integer))
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    flat, _ = ravel_pytree(params)
    num_rows = problem.num_samples * problem.output_dim
    num_params = flat.shape[0]
    wide = num_rows <= num_params
    per_sample = problem.per_sample

    # Whether the structured Gram applies (dense layers found) and pays (module docstring);
    # the model's jaxpr is read once, and only where the answer matters.
    has_layers = pays = gram == "structured" and wide and per_sample
    if gram == "auto" and wide and per_sample and solver in ("auto", *GRAM_SOLVERS):
        flops = structured_flops(problem, params)
        dense = num_rows * num_rows * num_params
        has_layers = flops is not None
        pays = has_layers and dense >= STRUCTURED_MIN_FLOPS and 2 * flops <= dense
    if solver != "auto":
        kind = "structured" if solver in GRAM_SOLVERS and pays else "jacobian"
        plan = SolvePlan(solver, chunk_size, kind, "chosen by the caller")
        _warn_if_slow(problem, params, plan, num_rows, num_params, flat.dtype)
        return plan
    budget = _get_budget(memory_budget)
    plan = _auto_plan(damping, num_rows, num_params, flat.dtype.itemsize, budget,
                      structured=has_layers, structured_pays=pays,
                      num_samples=problem.num_samples, output_dim=problem.output_dim,
                      chunkable=per_sample, chunk_size=chunk_size, many_dampings=many_dampings)
    logger.info("solver='auto' picked %r (gram=%s, chunk_size=%s): %s", plan.method, plan.gram,
                plan.chunk_size, plan.reason)
    _warn_if_slow(problem, params, plan, num_rows, num_params, flat.dtype)
    return plan


def estimate_step_flops(method: str, num_rows: int, num_params: int, num_samples: int, *,
                        gram_macs: int | None = None) -> float:
    r"""Rough flops of one linearization and solve by `method` (M rows, K parameters, N samples,
    $n = \min(M, K)$): a forward pass costs about 2NK.

    - `"cholesky"`/`"eigh"`: the Gram, $2\cdot$`gram_macs` from the structured products, else the
      Jacobian (about 4MK) and $2n^2\max(M, K)$ for $DD^\top$; then $n^3/3$ (Cholesky) or
      $9n^3$ (eigh).
    - `"qr"`: the Jacobian and $2\max(M,K)n^2$; `"svd"`: the Jacobian and $4\max(M,K)n^2 + 8n^3$.
    - `"cg"`/`"lsmr"`: `ASSUMED_KRYLOV_ITERATIONS` Gram products of about 8NK each (one JVP, one
      VJP).
    """
    n, big = min(num_rows, num_params), max(num_rows, num_params)
    jacobian = 4.0 * num_rows * num_params
    if method in MATRIX_FREE:
        return ASSUMED_KRYLOV_ITERATIONS * 8.0 * num_samples * num_params
    if method in GRAM_SOLVERS:
        gram = 2.0 * gram_macs if gram_macs is not None else jacobian + 2.0 * n * n * big
        return gram + (n**3 / 3 if method == "cholesky" else 9.0 * n**3)
    if method == "qr":
        return jacobian + 2.0 * big * n * n
    return jacobian + 4.0 * big * n * n + 8.0 * n**3


def estimate_memory_bytes(plan: SolvePlan, num_rows: int, num_params: int, itemsize: int,
                          num_samples: int | None = None, sketch: int = 0) -> int:
    """The bytes that the "auto" rule budgets for `plan` (M rows, K parameters, n = min(M, K),
    b bytes a number): 3MKb for "qr"/"svd" (D and about one more copy); 2MKb + 3n²b for a
    Cholesky or eigh Gram from a dense D; 3n²b for a structured Gram; for a chunked one, 3n²b
    plus the chunk's per-sample Jacobians (twice on the wide side); 0 for the matrix-free
    methods (O(K + M)), plus `sketch_bytes` for a kept Nyström sketch of rank `sketch`. On the
    tall side (M > K) "cg" holds one chunk of per-sample Jacobians and their squares while it
    sums the column norms of its scaling, 2·chunk·QKb, and the kept Nyström sketch of the
    K-side Gram, `sketch_bytes` with M = K (2Kℓb in the state and the loop's copy, 4Kℓb while
    sketching): at QN = 13,470, K = 9,610, ℓ = 150 (digits cross-entropy) 129 MiB in float64
    against 113 MiB of peak RSS growth measured over one update (`benchmarks/plan_memory.py`;
    the rule before the sketch was used there, 2Kℓb, gave 85 MiB: 1.28×)."""
    dense = num_rows * num_params * itemsize
    small = min(num_rows, num_params)
    gram = small * small * itemsize
    if plan.method in ("qr", "svd"):
        return 3 * dense
    if plan.method in GRAM_SOLVERS:
        if plan.gram == "structured":
            return 3 * gram
        if plan.chunk_size is not None and num_samples and plan.chunk_size < num_samples:
            per_sample = (num_rows // num_samples) * num_params * itemsize
            return 3 * gram + plan.chunk_size * per_sample * (2 if num_rows <= num_params else 1)
        return 2 * dense + 3 * gram
    if plan.method == "cg" and num_rows > num_params:
        samples = num_samples or num_rows
        chunk = samples if plan.chunk_size is None else min(plan.chunk_size, samples)
        per_sample = (num_rows // samples) * num_params * itemsize
        return 2 * chunk * per_sample + sketch_bytes(sketch, num_params, num_params, itemsize)
    return sketch_bytes(sketch, num_rows, num_params, itemsize) if plan.method == "cg" else 0


def _warn_if_slow(problem, params, plan: SolvePlan, num_rows, num_params, dtype) -> None:
    """Log a WARNING (logger "outmetric") when one step will take over `SLOW_STEP_SECONDS`
    at `ROUGH_FLOPS_PER_S`: a dense solve at QN ~ 10⁴ on a CPU runs for minutes, silently."""
    macs = structured_flops(problem, params) if plan.gram == "structured" else None
    flops = estimate_step_flops(plan.method, num_rows, num_params, problem.num_samples,
                                gram_macs=macs)
    device = jax.local_devices()[0]
    rate = ROUGH_FLOPS_PER_S.get(device.platform, ROUGH_FLOPS_PER_S["gpu"])
    if device.platform == "cpu":
        rate *= os.cpu_count() or 1
    if jnp.dtype(dtype).itemsize <= 4:
        rate *= 2
    seconds = flops / rate
    if seconds > SLOW_STEP_SECONDS:
        logger.warning(
            "one step with solver %r (gram=%s) at M=%d, K=%d will take about %.0f s: about "
            "%.1e flops%s at a rough %.0e flop/s on %s (%s); %s cost less per step",
            plan.method, plan.gram, num_rows, num_params, seconds, flops,
            f" (assuming {ASSUMED_KRYLOV_ITERATIONS} iterations)" if plan.method in MATRIX_FREE
            else "", rate, device.platform, device.device_kind,
            "float32 or mini-batches" if plan.method in MATRIX_FREE
            else "a matrix-free solver (solver='cg'), float32 or mini-batches")


def _get_budget(budget):
    return memory_budget() if budget is None else int(budget)


def linearize(problem: Problem, params: PyTree, *, method: str = "qr",
              chunk_size: int | None = None, gram: str = "jacobian") -> Linearization:
    """Linearize `problem` at `params` for a resolved `method`.

    Dense methods get the Jacobian, computed `chunk_size` samples at a time when given. For
    `"cholesky"` the Gram matrix of the smaller side is cached, and D is not kept when it need
    not be: with `gram="structured"` on the wide side (`outmetric.structured_gram`) or with
    `chunk_size` (`outmetric._gram.jacobian_gram`), the Linearization holds the Gram and JVP/VJP
    closures only. `"cg"` and `"lsmr"` get JVP/VJP closures and never form D; their
    `diagonal` computes the Gram diagonal in chunks on demand (the Jacobi preconditioner).
    """
    check_solver_name(method)
    if method == "auto":
        raise ValueError("linearize needs a concrete method; resolve 'auto' with plan_solve")
    check_chunk_size(chunk_size)
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram={gram!r} is not a Gram method; choose one of {list(GRAM_METHODS)}")
    flat, unravel = ravel_pytree(params)
    num_rows = problem.num_samples * problem.output_dim
    wide = num_rows <= flat.shape[0]
    chunked = chunk_size is not None and chunk_size < problem.num_samples
    structured = method in GRAM_SOLVERS and wide and gram == "structured"
    if method not in MATRIX_FREE and not structured and not (method in GRAM_SOLVERS and chunked):
        x, jac = problem.linearize(params, chunk_size=chunk_size)
        gram_matrix = None
        if method in GRAM_SOLVERS:
            gram_matrix = jac @ jac.T if wide else jac.T @ jac
        diagonal = lambda: jnp.sum(jac**2, axis=1 if wide else 0)  # noqa: E731
        columns = lambda: jnp.sum(jac**2, axis=0)  # noqa: E731
        return Linearization(x, flat, unravel, jac, None, None, gram_matrix, diagonal, columns)

    def stacked(f):
        return problem.outputs(unravel(f)).reshape(-1).astype(flat.dtype)

    out, jvp = jax.linearize(stacked, flat)
    transpose = jax.linear_transpose(jvp, flat)
    x = out.reshape(problem.num_samples, problem.output_dim)
    vjp = lambda w: transpose(w)[0]  # noqa: E731
    gram_matrix = None
    if structured:
        gram_matrix = structured_gram(problem, params, chunk_size=chunk_size)[1]
    elif method in GRAM_SOLVERS:
        gram_matrix = jacobian_gram(problem, params, wide=wide, chunk_size=chunk_size)
    if gram_matrix is not None:
        diagonal = lambda: jnp.diag(gram_matrix)  # noqa: E731
    else:
        diagonal = lambda: gram_diagonal(problem, params, wide=wide, chunk_size=chunk_size)  # noqa: E731
    if gram_matrix is not None and not wide:
        columns = lambda: jnp.diag(gram_matrix)  # noqa: E731
    else:
        columns = lambda: gram_diagonal(problem, params, wide=False, chunk_size=chunk_size)  # noqa: E731
    return Linearization(x, flat, unravel, None, jvp, vjp, gram_matrix, diagonal, columns)


def default_rtol(num_rows: int, num_params: int, dtype) -> float:
    """Relative cut-off for singular values: max(M, K)·ε, as `numpy.linalg.matrix_rank`."""
    return max(num_rows, num_params) * float(jnp.finfo(dtype).eps)


def solve(
    lin: Linearization,
    rhs: Float[Array, " M"],
    *,
    damping: float | Float[Array, ""] = 0.0,
    solver: str = "auto",
    rtol: float | None = None,
    cg_tol: float | None = None,
    cg_max_steps: int | None = None,
    preconditioner: "str | Preconditioner | None" = None,
    preconditioner_rank: int | None = None,
) -> SolveResult:
    r"""Solve $\delta = D^+ g$ (or $D^\top(DD^\top+\lambda I)^{-1}g$ with `damping` λ > 0).

    **Arguments:**

    - `lin`: D at the current point, from `linearize`.
    - `rhs`: g, a vector of length M = N·Q.
    - `damping`: λ ≥ 0 (Python number or traced scalar).
    - `solver`: one of `SOLVERS`; see the module docstring.
    - `rtol`: relative singular-value cut-off for the rank estimate and the SVD pseudo-inverse;
      default max(M, K)·ε.
    - `cg_tol`, `cg_max_steps`: relative tolerance and iteration cap of the matrix-free solves
      (`"cg"` and `"lsmr"`); default 1e-10 in float64 and 1e-5 in float32, and no cap beyond
      lineax's 10·min(M, K).
    - `preconditioner`: for `"cg"` only (ignored by the other methods): None, `"jacobi"`,
      `"nystrom"` (module docstring), or a `Preconditioner` from `prepare_preconditioner`
      (to reuse it across solves with the same `lin`).
    - `preconditioner_rank`: ℓ of the Nyström preconditioner; default min(50, n).

    With `solver="auto"` the method follows `lin`: `"qr"` (undamped) or `"cholesky"` for a dense
    D, `"cholesky"` for a cached Gram without D, else `"lsmr"` (undamped) or `"cg"`.

    **Returns:** a `SolveResult`.

    Rank loss never yields NaN: the Cholesky and QR paths detect it and switch to the SVD
    pseudo-inverse (or, without a dense D, the Gram's eigendecomposition), which drops the null
    directions; LSMR returns the minimum-norm solution.
    """
    check_solver_name(solver)
    if not isinstance(preconditioner, Preconditioner) and preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not known; choose one of "
                         f"{list(PRECONDITIONERS)}")
    _check_rank(preconditioner_rank)
    if isinstance(damping, (int, float)) and not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be >= 0 and finite, got {damping}")
    num_rows, num_params = lin.shape
    dtype = lin.flat_params.dtype
    method = _method_for(lin, solver, damping)
    if method in ("qr", "svd") and lin.jacobian is None:
        raise ValueError(f"solver={method!r} needs a dense Jacobian; linearize with a dense method")
    if method in GRAM_SOLVERS and lin.jacobian is None and lin.gram is None:
        raise ValueError(f"solver={method!r} needs a dense Jacobian or a Gram matrix; linearize "
                         "with method='cholesky'")
    rtol = default_rtol(num_rows, num_params, dtype) if rtol is None else rtol
    rhs = rhs.reshape(-1).astype(dtype)
    lam = jnp.asarray(damping, dtype)
    if method == "cholesky":
        result = _cholesky(lin, rhs, lam, rtol)
    elif method == "qr":
        result = _qr(lin.jacobian, rhs, damping, rtol)
    elif method == "svd":
        result = _svd(lin.jacobian, rhs, lam, rtol, fallback=False)
    elif method == "eigh":
        result = SpectralFactor(lin, rhs, rtol, use_gram=True).step(lam).solve
    else:
        if cg_tol is None:
            cg_tol = 1e-10 if dtype == jnp.float64 else 1e-5
        if method == "lsmr":
            result = _lsmr(lin, rhs, damping, cg_tol, cg_max_steps)
        else:
            result = _cg(lin, rhs, lam, cg_tol, cg_max_steps, preconditioner, preconditioner_rank)
    # Never a NaN step: a non-finite solution (from non-finite data) becomes zero, flagged.
    finite = result.finite & jnp.all(jnp.isfinite(result.delta)) & jnp.all(jnp.isfinite(rhs))
    return result._replace(delta=jnp.where(finite, result.delta, 0.0), finite=finite)


def _method_for(lin: Linearization, solver: str, damping) -> str:
    if solver != "auto":
        return solver
    if lin.jacobian is not None:
        return "qr" if is_static_zero(damping) else "cholesky"
    if lin.gram is not None:
        return "cholesky"
    return "lsmr" if is_static_zero(damping) else "cg"


def _check_rank(rank) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise ValueError(f"preconditioner_rank must be a positive integer or None, got {rank!r}")


def kept_singular_values(s: Float[Array, " r"], rtol: float) -> Bool[Array, " r"]:
    """Which of the descending singular values `s` count towards the rank: σ_i > rtol·σ_1."""
    return s > rtol * s[0]


def singular_values(lin: Linearization) -> Float[Array, " r"]:
    r"""The singular values $\sigma_1 \ge \dots \ge \sigma_{\min(M,K)} \ge 0$ of a dense D."""
    if lin.jacobian is None:
        raise ValueError("singular_values needs a dense Jacobian; linearize with a dense method")
    return jnp.linalg.svd(lin.jacobian, compute_uv=False)


def smallest_singular_value(lin: Linearization, rtol: float | None = None
                            ) -> tuple[Float[Array, ""], Int[Array, ""]]:
    r"""$(\sigma_{\min(M,K)}(D), \operatorname{rank} D)$ from the Gram's eigenvalues; (-1, -1) if matrix-free.

    Uses the Gram matrix of the smaller side (the one the Cholesky solve caches, or formed from
    a dense D): $\sigma_{\min} = \sqrt{\max(\mu_{\min}, 0)}$, and the rank counts the
    eigenvalues above $\max(\mathrm{rtol}^2, n\epsilon)\,\mu_{\max}$ as `_eigh` does. One
    $O(n^3)$ `eigvalsh`, $n = \min(M, K)$, a few times the cost of the Cholesky factorization.
    Unlike the damped Cholesky's pivots, the eigenvalues see rank loss whatever the damping.
    Values below about $\sqrt{n\epsilon}\,\sigma_{\max}$ are round-off of the Gram and read
    as (near) zero, which is what a rank-loss monitor needs. A matrix-free linearization has
    no Gram: (-1, -1) says "not estimated".
    """
    dtype = lin.flat_params.dtype
    if lin.gram is not None:
        gram = lin.gram
    elif lin.jacobian is not None:
        jac = lin.jacobian
        gram = jac @ jac.T if lin.shape[0] <= lin.shape[1] else jac.T @ jac
    else:
        return jnp.asarray(-1.0, dtype), jnp.asarray(-1, jnp.int32)
    rtol = default_rtol(*lin.shape, dtype) if rtol is None else rtol
    mu = jnp.linalg.eigvalsh(0.5 * (gram + gram.T))
    cut = max(rtol**2, gram.shape[0] * float(jnp.finfo(gram.dtype).eps)) * mu[-1]
    rank = jnp.sum(mu > cut).astype(jnp.int32)
    return jnp.sqrt(jnp.maximum(mu[0], 0.0)).astype(dtype), rank


def project_horizontal(lin: Linearization, v: Float[Array, " K"], *, solver: str = "auto",
                       rtol: float | None = None) -> Float[Array, " K"]:
    r"""$D^+D\,v$, the orthogonal projection of $v \in \mathbb{R}^K$ onto range $D^\top$ (= ker D⊥).

    One `solve` with right-hand side $Dv$; rank loss is handled as there (directions whose
    singular value falls below `rtol`·σ_max count as vertical).
    """
    return solve(lin, lin.matvec(v), solver=solver, rtol=rtol).delta


def _svd(jac, rhs, lam, rtol, *, fallback: bool) -> SolveResult:
    u, s, vt = jnp.linalg.svd(jac, full_matrices=False)
    keep = kept_singular_values(s, rtol)
    safe = jnp.where(keep, s, 1.0)
    filt = jnp.where(keep, safe / (safe**2 + lam), 0.0)
    delta = (filt * (rhs @ u)) @ vt
    return SolveResult(delta, jnp.sum(keep).astype(jnp.int32), jnp.asarray(fallback),
                       jnp.asarray(True))


def _cholesky(lin: Linearization, rhs, lam, rtol) -> SolveResult:
    jac = lin.jacobian
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    if lin.gram is not None:
        gram = lin.gram
    else:
        gram = jac @ jac.T if wide else jac.T @ jac
    scale = jnp.max(jnp.diag(gram))
    chol = jnp.linalg.cholesky(gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype))
    pivots = jnp.diag(chol) ** 2
    # A pivot of the damped Gram below n·ε·scale means the factor has lost all accuracy.
    gram_tol = max(gram.shape[0], 1) * float(jnp.finfo(gram.dtype).eps) * scale
    # The rank on the σ scale (module docstring, "Rank"): sqrt(pivot - λ) against rtol·sqrt(scale).
    rank = jnp.sum(jnp.sqrt(jnp.maximum(pivots - lam, 0.0))
                   > rtol * jnp.sqrt(scale)).astype(jnp.int32)
    healthy = jnp.all(jnp.isfinite(chol)) & (jnp.min(pivots) > gram_tol) & (scale > 0)
    # Pivots are not rank-revealing (Kahan's matrix): μ_min of the damped Gram by a few inverse
    # iterations with the factor, O(n²) each, sees what they miss.
    mu_min = _smallest_eigenvalue(chol)
    cut = max(rtol, np.sqrt(max(gram.shape[0], 1) * float(jnp.finfo(gram.dtype).eps)))
    lost = ~(jnp.sqrt(jnp.maximum(mu_min - lam, 0.0)) > cut * jnp.sqrt(scale))
    rank = jnp.where(lost, jnp.minimum(rank, gram.shape[0] - 1), rank).astype(jnp.int32)
    # Undamped, a direction below the cut-off is rank lost: the pseudo-inverse drops it.
    healthy = healthy & ((lam > 0) | (rank == gram.shape[0]))

    def factor_solve(_):
        if wide:
            z = jsl.cho_solve((chol, True), rhs)
            delta = lin.rmatvec(z)
        else:
            delta = jsl.cho_solve((chol, True), lin.rmatvec(rhs))
        return SolveResult(delta, rank, jnp.asarray(False), jnp.asarray(True))

    if jac is not None:
        fallback = lambda _: _svd(jac, rhs, lam, rtol, fallback=True)  # noqa: E731
    else:
        fallback = lambda _: _eigh(lin, gram, rhs, lam, rtol)  # noqa: E731
    return jax.lax.cond(healthy, factor_solve, fallback, None)


def _smallest_eigenvalue(chol, iterations: int = 3) -> Float[Array, ""]:
    """μ_min of LLᵀ from its Cholesky factor L by inverse iteration from a fixed random start
    (a rank loss leaves a large gap below the kept eigenvalues, so a few iterations do)."""
    n = chol.shape[0]
    v = jax.random.normal(jax.random.PRNGKey(0), (n,), chol.dtype)
    v = v / jnp.linalg.norm(v)
    growth = jnp.asarray(1.0, chol.dtype)
    for _ in range(iterations):
        w = jsl.cho_solve((chol, True), v)
        growth = jnp.linalg.norm(w)
        v = w / jnp.where(growth > 0, growth, 1.0)
    return 1.0 / growth


def _eigh(lin: Linearization, gram, rhs, lam, rtol) -> SolveResult:
    r"""The rank-revealing fallback without a dense D, from the Gram's eigendecomposition.

    Wide side, $DD^\top = U\,\mathrm{diag}(\mu)\,U^\top$: $\delta = D^\top U\,\mathrm{diag}(1/(\mu+\lambda))\,U^\top g$;
    tall side, $D^\top D = V\mathrm{diag}(\mu)V^\top$: $\delta = V\mathrm{diag}(1/(\mu+\lambda))V^\top D^\top g$;
    both equal the SVD formula with $\mu = \sigma^2$, over the eigenvalues above
    $\max(\mathrm{rtol}^2, n\epsilon)\,\mu_{\max}$ (below that they are round-off of the Gram).
    """
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    mu, vecs = jnp.linalg.eigh(gram)
    cut = max(rtol**2, gram.shape[0] * float(jnp.finfo(gram.dtype).eps)) * mu[-1]
    keep = mu > cut
    filt = jnp.where(keep, 1.0 / jnp.where(keep, mu + lam, 1.0), 0.0)
    if wide:
        delta = lin.rmatvec(vecs @ (filt * (rhs @ vecs)))
    else:
        delta = vecs @ (filt * (lin.rmatvec(rhs) @ vecs))
    finite = jnp.all(jnp.isfinite(delta))
    return SolveResult(jnp.where(finite, delta, 0.0), jnp.sum(keep).astype(jnp.int32),
                       jnp.asarray(True), finite, finite=finite)


def _qr(jac, rhs, damping, rtol) -> SolveResult:
    num_rows, num_params = jac.shape
    lam = jnp.asarray(damping, jac.dtype)
    wide = num_rows <= num_params
    if not is_static_zero(damping):
        root = jnp.sqrt(lam)
        if wide:  # min-norm solution of [D, √λ I] w = g; δ = w[:K]
            aug = jnp.concatenate([jac, root * jnp.eye(num_rows, dtype=jac.dtype)], axis=1)
        else:  # least squares of [D; √λ I] δ ≈ [g; 0]
            aug = jnp.concatenate([jac, root * jnp.eye(num_params, dtype=jac.dtype)], axis=0)
    else:
        aug = jac
    if wide:
        q, r = jnp.linalg.qr(aug.T)
    else:
        q, r = jnp.linalg.qr(aug)
    # R's diagonal is not rank-revealing (a Kahan matrix keeps it O(1) at σ_min/σ_max = 1e-16);
    # the singular values of the small triangle R are those of D (or of the augmented matrix).
    finite = jnp.all(jnp.isfinite(r))
    sigma = jnp.linalg.svd(jnp.where(finite, r, 0.0), compute_uv=False)
    rank = jnp.sum(kept_singular_values(sigma, rtol)).astype(jnp.int32)
    healthy = finite & (rank == r.shape[0])

    def factor_solve(_):
        if wide:
            z = jsl.solve_triangular(r, rhs, trans="T", lower=False)
            delta = (q @ z)[:num_params]
        else:
            qtg = rhs @ q[:num_rows]
            delta = jsl.solve_triangular(r, qtg, lower=False)
        return SolveResult(delta, rank, jnp.asarray(False), jnp.asarray(True))

    return jax.lax.cond(healthy, factor_solve, lambda _: _svd(jac, rhs, lam, rtol, fallback=True),
                        None)


def _gram_operator(lin: Linearization, wide: bool):
    """v ↦ DDᵀv (wide) or DᵀDv (tall), matrix-free or from the dense D."""
    if wide:
        return lambda z: lin.matvec(lin.rmatvec(z))
    return lambda v: lin.rmatvec(lin.matvec(v))


class Preconditioner(NamedTuple):
    r"""A CG preconditioner of the damped Gram $A + \lambda I$, prepared once per linearization.

    Built by `prepare_preconditioner`; independent of λ, so a Levenberg–Marquardt loop that
    re-solves with several λ prepares it once. Jacobi fills `diagonal` (diag A); Nyström fills
    `basis` U (n×ℓ, orthonormal) and `eigenvalues` $\hat\mu$ (ℓ, descending) of $A \approx
    U\mathrm{diag}(\hat\mu)U^\top$.
    """

    diagonal: Float[Array, " n"] | None = None
    basis: Float[Array, "n l"] | None = None
    eigenvalues: Float[Array, " l"] | None = None


def prepare_preconditioner(lin: Linearization, kind: str | None,
                           rank: int | None = None) -> Preconditioner | None:
    r"""The `"jacobi"` or `"nystrom"` preconditioner of the Gram of `lin`'s smaller side.

    - `"jacobi"`: diag A, from `lin.diagonal` (per-sample Jacobians in chunks when D is not
      dense): one Jacobian evaluation.
    - `"nystrom"`: the randomized Nyström approximation of rank ℓ = `rank` (default
      min(50, n)) of Frangella, Tropp & Udell (2023), Alg. 2.1: with a Gaussian Ω of ℓ
      orthonormal columns, $Y = A\Omega$ (ℓ Gram products, `SKETCH_BATCH` at a time), a shift
      $\nu = \sqrt n\,\epsilon\,\|Y\|$, $B = Y_\nu\,\mathrm{chol}(\Omega^\top Y_\nu)^{-\top}$ and
      $B = U\Sigma V^\top$: $\hat\mu = \max(\Sigma^2 - \nu, 0)$. A non-finite sketch (a Gram too
      singular for this precision) leaves U = 0, i.e. no preconditioning.
    - None: None.
    """
    if kind not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={kind!r} is not known; choose one of "
                         f"{list(PRECONDITIONERS)}")
    _check_rank(rank)
    if kind is None:
        return None
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    dtype = lin.flat_params.dtype
    if kind == "jacobi":
        diag = lin.diagonal() if lin.diagonal is not None else _dense_diagonal(lin, wide)
        return Preconditioner(diagonal=diag.astype(dtype))
    size = num_rows if wide else num_params
    rank = min(rank or 50, size)
    gram_mv = _gram_operator(lin, wide)
    omega = jax.random.normal(jax.random.PRNGKey(0), (size, rank), dtype)
    omega, _ = jnp.linalg.qr(omega)
    y = jax.lax.map(gram_mv, omega.T, batch_size=min(rank, SKETCH_BATCH)).T
    eps = float(jnp.finfo(dtype).eps)
    nu = jnp.sqrt(float(size)) * eps * jnp.linalg.norm(y)
    y_nu = y + nu * omega
    small = omega.T @ y_nu
    chol = jnp.linalg.cholesky(0.5 * (small + small.T))
    b = jsl.solve_triangular(chol, y_nu.T, lower=True).T
    u, sigma, _ = jnp.linalg.svd(b, full_matrices=False)
    mu = jnp.maximum(sigma**2 - nu, 0.0)
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(mu))
    return Preconditioner(basis=jnp.where(ok, u, 0.0), eigenvalues=jnp.where(ok, mu, 0.0))


def _preconditioner_apply(pre: Preconditioner, lam, dtype) -> Callable[[Array], Array]:
    r"""v ↦ $P^{-1}v$ for $A + \lambda I$: Jacobi $\mathrm{diag}(A + \lambda I)^{-1}$, or Nyström
    $(\hat\mu_\ell + \lambda)\,U(\mathrm{diag}\,\hat\mu + \lambda I)^{-1}U^\top + I - UU^\top$
    (Frangella, Tropp & Udell 2023, eq. 5.3)."""
    if pre.diagonal is not None:
        damped = pre.diagonal + lam
        inverse = jnp.where(damped > 0, 1.0 / jnp.where(damped > 0, damped, 1.0), 1.0)
        inverse = inverse.astype(dtype)
        return lambda v: inverse * v
    u, mu = pre.basis, pre.eigenvalues
    floor = jnp.maximum(lam, float(jnp.finfo(dtype).eps) * mu[0])
    scale = ((mu[-1] + floor) / (mu + floor) - 1.0).astype(dtype)
    return lambda v: v + u @ (scale * (v @ u))


def _preconditioner_operator(pre: Preconditioner, lam, structure):
    """`_preconditioner_apply` as a lineax operator."""
    return lx.FunctionLinearOperator(_preconditioner_apply(pre, lam, structure.dtype), structure,
                                     tags=lx.positive_semidefinite_tag)


def _cg(lin: Linearization, rhs, lam, tol, max_steps, preconditioner=None,
        rank=None) -> SolveResult:
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    size = num_rows if wide else num_params
    structure = jax.ShapeDtypeStruct((size,), rhs.dtype)
    gram_mv = _gram_operator(lin, wide)
    operator = lx.FunctionLinearOperator(lambda z: gram_mv(z) + lam * z, structure,
                                         tags=lx.positive_semidefinite_tag)
    vector = rhs if wide else lin.rmatvec(rhs)
    if isinstance(preconditioner, str):
        preconditioner = prepare_preconditioner(lin, preconditioner, rank)
    options = {}
    if preconditioner is not None:
        options["preconditioner"] = _preconditioner_operator(preconditioner, lam, structure)
    cg = lx.CG(rtol=tol, atol=tol * 1e-3, max_steps=max_steps)
    sol = lx.linear_solve(operator, vector, cg, options=options, throw=False)
    delta = lin.rmatvec(sol.value) if wide else sol.value
    converged = sol.result == lx.RESULTS.successful
    # lineax's CG reads a NaN residual norm as converged and returns its zero start; one more
    # Gram product, the final residual, sees non-finite data in D (and checks convergence).
    residual = vector - operator.mv(sol.value)
    finite = jnp.all(jnp.isfinite(delta)) & jnp.all(jnp.isfinite(residual))
    delta = jnp.where(finite, delta, 0.0)
    result = SolveResult(delta, jnp.asarray(-1, jnp.int32), jnp.asarray(False), converged & finite,
                         jnp.asarray(sol.stats["num_steps"], jnp.int32), finite)
    # lineax's CG breaks down (0/0) on a Gram of low numerical rank under tiny damping in float32;
    # then the safeguarded CG of the normal equations (the same vector) answers, finite unless the
    # data are not.
    steps = 10 * min(num_rows, num_params) + 10 if max_steps is None else max_steps

    def safeguarded(_):
        return normal_equations_cg(lin, rhs, lam, initial=jnp.zeros_like(lin.flat_params),
                                   forcing=tol, max_steps=steps).solve

    return jax.lax.cond(finite, lambda _: result, safeguarded, None)


def _dense_diagonal(lin: Linearization, wide: bool):
    if lin.gram is not None:
        return jnp.diag(lin.gram)
    if lin.jacobian is not None:
        return jnp.sum(lin.jacobian**2, axis=1 if wide else 0)
    raise ValueError("preconditioner='jacobi' needs the Gram diagonal; build the Linearization "
                     "with outmetric._solve.linearize")


def _lsmr(lin: Linearization, rhs, damping, tol, max_steps) -> SolveResult:
    r"""Minimum-norm least squares by LSMR: $\min\|D\delta - g\|^2 + \lambda\|\delta\|^2$ from δ = 0."""
    num_rows, num_params = lin.shape
    structure = jax.ShapeDtypeStruct((num_params,), rhs.dtype)
    if is_static_zero(damping):
        fn, vector = lin.matvec, rhs
    else:
        root = jnp.sqrt(jnp.asarray(damping, rhs.dtype))
        fn = lambda v: jnp.concatenate([lin.matvec(v), root * v])  # noqa: E731
        vector = jnp.concatenate([rhs, jnp.zeros(num_params, rhs.dtype)])
    operator = lx.FunctionLinearOperator(fn, structure)
    conlim = 1.0 / float(jnp.finfo(rhs.dtype).eps)
    solver = lx.LSMR(rtol=tol, atol=tol * 1e-3, max_steps=max_steps, conlim=conlim)
    sol = lx.linear_solve(operator, vector, solver, throw=False)
    delta = sol.value
    converged = sol.result == lx.RESULTS.successful
    finite = jnp.all(jnp.isfinite(delta))
    delta = jnp.where(finite, delta, 0.0)
    return SolveResult(delta, jnp.asarray(-1, jnp.int32), jnp.asarray(False), converged & finite,
                       jnp.asarray(sol.stats["num_steps"], jnp.int32), finite)


def output_metric_gradient(
    problem: Problem,
    params: PyTree,
    *,
    damping: float | Float[Array, ""] = 0.0,
    solver: str = "auto",
    chunk_size: int | None = None,
    gram: str = "auto",
    memory_budget: int | None = None,
    **solve_options,
) -> tuple[PyTree, SolveResult, Linearization]:
    r"""$D^+\nabla_x C$ as a pytree shaped like `params` (damped: $D^\top(DD^\top+\lambda I)^{-1}\nabla_x C$).

    The gradient of C in the output metric pulled back to parameter space: the adapted flow is
    its negative, and the optimizer's step is $-\eta N$ times it (for L², $N\nabla_xC = x - y$).
    `solver`, `chunk_size`, `gram` and `memory_budget` are planned by `plan_solve`; the other
    keyword arguments go to `solve`. Returns the pytree, the `SolveResult`, and the
    `Linearization` it was computed from.
    """
    plan = plan_solve(problem, params, solver=solver, damping=damping, chunk_size=chunk_size,
                      gram=gram, memory_budget=memory_budget)
    lin = linearize(problem, params, method=plan.method, chunk_size=plan.chunk_size,
                    gram=plan.gram)
    grad_x = problem.output_gradient(lin.outputs)
    result = solve(lin, grad_x.reshape(-1), damping=damping, solver=plan.method, **solve_options)
    return lin.unravel(result.delta), result, lin


# --------------------------------------------------------------- the damped family δ(λ)
#
# The optimizer solves $(D^\top D + \lambda S)\delta = D^\top r$ for several λ at one
# linearization (DESIGN §6). With $\tilde D = DS^{-1/2}$ this is $\delta = S^{-1/2}\tilde\delta$,
# $\tilde\delta = (\tilde D^\top\tilde D + \lambda I)^{-1}\tilde D^\top r$: every object below works
# on $\tilde D$ (`scale_columns`) and returns $\tilde\delta$, in the scaled coordinates where
# MINPACK measures steps ($\|\tilde\delta\| = \|S^{1/2}\delta\|$).


class DampedStep(NamedTuple):
    r"""One member $\tilde\delta(\lambda)$ of the damped family and the linear model along it.

    - `delta`: $\tilde\delta$, length K (scaled coordinates).
    - `model_linear`: $\langle r, \tilde D\tilde\delta\rangle$; `model_quadratic`:
      $\|\tilde D\tilde\delta\|^2$. For the step $\eta\tilde\delta$ the linear model predicts
      $\|r\|^2 - \|r - \eta\tilde D\tilde\delta\|^2 = 2\eta\,$`model_linear`$ - \eta^2\,$`model_quadratic`.
    - `norm`: $\|\tilde\delta\|$.
    - `solve`: the `SolveResult` (rank, fallback, convergence, finiteness).
    """

    delta: Float[Array, " K"]
    model_linear: Float[Array, ""]
    model_quadratic: Float[Array, ""]
    norm: Float[Array, ""]
    solve: SolveResult


def scale_columns(lin: Linearization, inv_sqrt_scale: Float[Array, " K"]) -> Linearization:
    r"""The linearization of $\tilde D = D\,\mathrm{diag}(d)$, $d = S^{-1/2}$ = `inv_sqrt_scale`.

    Dense D, JVP/VJP closures, the cached Gram of the tall side ($dd^\top\odot D^\top D$) and the
    diagonals follow. On the wide side a cached Gram without a dense D (structured or chunked)
    cannot be rescaled; that is refused (the optimizer uses scaled damping on the tall side).
    """
    d = inv_sqrt_scale
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    jac = None if lin.jacobian is None else lin.jacobian * d
    jvp = None if lin.jvp is None else (lambda v: lin.jvp(d * v))
    vjp = None if lin.vjp is None else (lambda w: d * lin.vjp(w))
    gram = None
    if lin.gram is not None:
        if not wide:
            gram = d[:, None] * lin.gram * d[None, :]
        elif jac is not None:
            gram = jac @ jac.T
        else:
            raise ValueError("scaled damping on the wide side (QN <= K) needs a dense D or a "
                             "matrix-free solver, not a structured or chunked Gram: pass "
                             "scaling='identity', gram='jacobian', or solver='cg'")
    if gram is not None:
        diagonal = lambda: jnp.diag(gram)  # noqa: E731
    elif jac is not None:
        diagonal = lambda: jnp.sum(jac**2, axis=1 if wide else 0)  # noqa: E731
    elif not wide and lin.diagonal is not None:
        diagonal = lambda: d**2 * lin.diagonal()  # noqa: E731
    else:
        diagonal = None
    columns = None
    if lin.column_diagonal is not None:
        columns = lambda: d**2 * lin.column_diagonal()  # noqa: E731
    return lin._replace(jacobian=jac, jvp=jvp, vjp=vjp, gram=gram, diagonal=diagonal,
                        column_diagonal=columns)


def weight_rows(lin: Linearization, root: Float[Array, "N Q Q"], *,
                diagonal: Callable[[], Array] | None = None,
                column_diagonal: Callable[[], Array] | None = None) -> Linearization:
    r"""The linearization of $\hat D = RD$, R block-diagonal with one symmetric Q×Q block $R_j$
    per sample (`root`, N×Q×Q): the loss-Hessian weighting of the optimizer's step
    (`output_metric_descent`'s `loss_hessian`), where $R_j^2 = \hat H_j$.

    Dense D, JVP/VJP closures and a cached Gram of the wide side ($R\,DD^\top R$) follow. A
    cached Gram of the tall side without a dense D (chunked $D^\top D$) cannot be reweighted
    and is refused. Where neither D nor a Gram gives them, the diagonals are the callables
    passed in (`gram_diagonal` with ``row_root``).
    """
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    num_n, num_q = lin.outputs.shape

    def mix(w):
        return jnp.einsum("nqp,np->nq", root, w.reshape(num_n, num_q)).reshape(-1)

    jac = None
    if lin.jacobian is not None:
        jac = jnp.einsum("nqp,npk->nqk", root,
                         lin.jacobian.reshape(num_n, num_q, num_params)).reshape(num_rows, -1)
    jvp = None if lin.jvp is None else (lambda v: mix(lin.jvp(v)))
    vjp = None if lin.vjp is None else (lambda w: lin.vjp(mix(w)))
    gram = None
    if lin.gram is not None:
        if jac is not None:
            gram = jac @ jac.T if wide else jac.T @ jac
        elif wide:
            tiles = lin.gram.reshape(num_n, num_q, num_n, num_q)
            tiles = jnp.einsum("nqp,npmr->nqmr", root, tiles)
            gram = jnp.einsum("nqmr,msr->nqms", tiles, root).reshape(num_rows, num_rows)
        else:
            raise ValueError("the loss-Hessian weighting on the tall side (K < QN) needs a "
                             "dense D or a matrix-free solve, not a chunked Gram: pass "
                             "solver='cg', or loss_hessian=False")
    if gram is not None:
        gram_diagonal_ = lambda: jnp.diag(gram)  # noqa: E731
    elif jac is not None:
        gram_diagonal_ = lambda: jnp.sum(jac**2, axis=1 if wide else 0)  # noqa: E731
    else:
        gram_diagonal_ = diagonal
    if jac is not None:
        columns = lambda: jnp.sum(jac**2, axis=0)  # noqa: E731
    elif gram is not None and not wide:
        columns = lambda: jnp.diag(gram)  # noqa: E731
    else:
        columns = column_diagonal
    return lin._replace(jacobian=jac, jvp=jvp, vjp=vjp, gram=gram, diagonal=gram_diagonal_,
                        column_diagonal=columns)


class SpectralFactor:
    r"""The damped family from one spectral factorization: every λ after it costs O(n) (+ one
    product with $\tilde D^\top$ for the step itself), and the rank comes for free.

    From the SVD of a dense $\tilde D = P\Sigma V^\top$ (QR of D̃ or D̃ᵀ, then the SVD of the
    n×n triangle; accurate to κ(D̃)ε), or without a dense
    D from the eigendecomposition of the Gram of the smaller side ($\tilde D\tilde D^\top = U\Lambda
    U^\top$ wide, $\tilde D^\top\tilde D = V\Lambda V^\top$ tall; accurate to κ(D̃)²ε). With
    $\mu_i = \sigma_i^2$ kept above the rank cut-off (σ > rtol·σ_max; for the Gram also
    μ > nε·μ_max) and weights $w_i = (\sigma_i\,p_i^\top r)^2$:

    $$\tilde\delta(\lambda) = \sum_i \frac{\sigma_i\,p_i^\top r}{\mu_i + \lambda}\,v_i,\qquad
    \|\tilde\delta(\lambda)\|^2 = \sum_i \frac{w_i}{(\mu_i+\lambda)^2},\qquad
    \langle r, \tilde D\tilde\delta\rangle = \sum_i \frac{w_i}{\mu_i+\lambda},\qquad
    \|\tilde D\tilde\delta\|^2 = \sum_i \frac{\mu_i w_i}{(\mu_i+\lambda)^2}.$$

    λ = 0 gives the pseudo-inverse step $\tilde D^+ r$; no λ needs a floor.
    """

    def __init__(self, lin: Linearization, rhs: Float[Array, " M"], rtol: float, *,
                 use_gram: bool = False):
        num_rows, num_params = lin.shape
        self._lin = lin
        if use_gram and lin.gram is None and lin.jacobian is not None:
            jac = lin.jacobian
            lin = lin._replace(gram=jac @ jac.T if num_rows <= num_params else jac.T @ jac)
            self._lin = lin
        if lin.jacobian is not None and not use_gram:
            # QR first, then the SVD of the small triangle (R-bidiagonalization): a few times
            # faster than the SVD of the long matrix, and as accurate.
            jac = lin.jacobian
            wide = num_rows <= num_params
            q, tri = jnp.linalg.qr(jac.T if wide else jac)
            u, s, vt = jnp.linalg.svd(tri)
            keep = kept_singular_values(s, rtol)
            self.mode = "svd"
            self.values = s**2
            if wide:  # D = Rᵀqᵀ = V Σ (q U)ᵀ: left vectors V, right vectors q U
                self.proj = s * (vt @ rhs)
                self.basis = q @ u
            else:  # D = q U Σ Vᵀ
                self.proj = s * ((rhs @ q) @ u)
                self.basis = vt.T
            self.weights = self.proj**2
            self.sigma_min = s[-1]
        elif lin.gram is not None:
            gram = lin.gram
            mu, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
            cut = max(rtol**2, gram.shape[0] * float(jnp.finfo(gram.dtype).eps)) * mu[-1]
            keep = mu > cut
            self.values = jnp.maximum(mu, 0.0)
            self.basis = vecs
            self.sigma_min = jnp.sqrt(self.values[0])
            if num_rows <= num_params:
                self.mode = "wide"
                self.proj = rhs @ vecs
                self.weights = self.values * self.proj**2
            else:
                self.mode = "tall"
                self.proj = lin.rmatvec(rhs) @ vecs
                self.weights = self.proj**2
        else:
            raise ValueError("a spectral factorization needs a dense Jacobian or a Gram matrix")
        self.keep = keep
        self.rank = jnp.sum(keep).astype(jnp.int32)
        self.finite = (jnp.all(jnp.isfinite(self.values)) & jnp.all(jnp.isfinite(self.proj))
                       & jnp.all(jnp.isfinite(self.basis)))

    def _inverse(self, lam):
        return jnp.where(self.keep, 1.0 / jnp.where(self.keep, self.values + lam, 1.0), 0.0)

    def norm(self, lam) -> Float[Array, ""]:
        r"""$\|\tilde\delta(\lambda)\|$ in O(n)."""
        h = self._inverse(lam)
        return jnp.sqrt(jnp.sum(h**2 * self.weights))

    def step(self, lam) -> DampedStep:
        """$\tilde\\delta(\\lambda)$ and its linear model."""
        h = self._inverse(lam)
        coeff = h * self.proj
        if self.mode == "wide":
            delta = self._lin.rmatvec(self.basis @ coeff)
        else:
            delta = self.basis @ coeff
        finite = self.finite & jnp.all(jnp.isfinite(delta))
        result = SolveResult(jnp.where(finite, delta, 0.0), self.rank, jnp.asarray(False),
                             finite, finite=finite)
        return DampedStep(result.delta, jnp.sum(h * self.weights),
                          jnp.sum(self.values * h**2 * self.weights),
                          jnp.sqrt(jnp.sum(h**2 * self.weights)), result)

    def solve_for(self, lam, rhs: Float[Array, " M"]) -> Float[Array, " K"]:
        r"""$(\tilde D^\top\tilde D + \lambda I)^{+}\tilde D^\top b$ for another right-hand
        side b, from the same factorization (O(MK): one product with $\tilde D^\top$)."""
        h = self._inverse(lam)
        if self.mode == "wide":
            return self._lin.rmatvec(self.basis @ (h * (rhs @ self.basis)))
        return self.basis @ (h * (self._lin.rmatvec(rhs) @ self.basis))

    def damping_for_radius(self, radius, iterations: int = 10) -> Float[Array, ""]:
        r"""MINPACK's `lmpar` in closed form: λ = 0 if $\|\tilde\delta(0)\| \le 1.1\Delta$, else
        λ > 0 with $\|\tilde\delta(\lambda)\| \approx \Delta$, by Newton's method on
        $1/\Delta - 1/\|\tilde\delta(\lambda)\|$ from λ = 0 (monotone from the left; Moré 1978):
        $\lambda^+ = \lambda + \frac{\|\tilde\delta\|^2}{\sum_i w_i/(\mu_i+\lambda)^3}\,
        \frac{\|\tilde\delta\| - \Delta}{\Delta}$. A fixed number of O(n) iterations, unrolled
        (a loop of tiny steps costs more in dispatch than in arithmetic); each stops moving once
        within 10 % of Δ, which Newton's method on this nearly linear function reaches in a
        few."""
        dtype = self.values.dtype
        radius = jnp.asarray(radius, dtype)
        tiny = jnp.finfo(dtype).tiny
        lam = jnp.asarray(0.0, dtype)
        size0 = size = self.norm(lam)
        for _ in range(iterations):
            h = self._inverse(lam)
            cubic = jnp.sum(h**3 * self.weights)
            newton = lam + size**2 / jnp.maximum(cubic, tiny) * (size - radius) / radius
            lam = jnp.where(jnp.abs(size - radius) > 0.1 * radius, jnp.maximum(newton, 0.0), lam)
            size = self.norm(lam)
        return jnp.where(size0 <= 1.1 * radius, jnp.asarray(0.0, dtype), lam)


class DirectFactor:
    r"""The damped family by one `solve` per λ (Cholesky of the damped Gram, QR, ...): no
    factorization is shared between λ, but the Gram is formed once (`lin.gram`). The linear
    model needs one product $\tilde D\tilde\delta$ per λ."""

    def __init__(self, lin: Linearization, rhs: Float[Array, " M"], method: str, rtol,
                 **solve_options):
        self._lin, self._rhs, self._method = lin, rhs, method
        self._rtol, self._options = rtol, solve_options

    def step(self, lam) -> DampedStep:
        result = solve(self._lin, self._rhs, damping=lam, solver=self._method, rtol=self._rtol,
                       **self._options)
        image = self._lin.matvec(result.delta)
        return DampedStep(result.delta, jnp.vdot(self._rhs, image), jnp.vdot(image, image),
                          jnp.linalg.norm(result.delta), result)


def normal_equations_cg(lin: Linearization, rhs: Float[Array, " M"], lam, *, initial,
                        forcing, max_steps: int, column_diagonal=None,
                        preconditioner: Preconditioner | None = None) -> DampedStep:
    r"""One inexact solve of $(\tilde D^\top\tilde D + \lambda I)\tilde\delta = \tilde D^\top r$ by
    preconditioned conjugate gradients on the K side, matrix-free (one JVP + one VJP per
    iteration), warm-started at `initial` and stopped by the inexact-Newton forcing rule
    $\|\tilde D^\top r - (\tilde D^\top\tilde D + \lambda I)\tilde\delta\| \le
    \eta\,\|\tilde D^\top r\|$ (η = `forcing`, e.g. Eisenstat–Walker) or `max_steps`.

    The K side holds the same vector as the M side ($\tilde D^\top(\tilde D\tilde D^\top+\lambda
    I)^{-1}r$), and it lets the previous step seed the next solve. `column_diagonal`
    (diag $\tilde D^\top\tilde D$) gives the Jacobi preconditioner; `preconditioner`, a
    `Preconditioner` of $\tilde D^\top\tilde D$ (the Nyström one of the tall side), takes
    precedence. Written here rather than
    with `lineax.CG`, whose stopping test is componentwise in both the residual and the update
    and cannot express a 2-norm forcing rule.
    """
    dtype = lin.flat_params.dtype
    lam = jnp.asarray(lam, dtype)

    def operator(v):
        return lin.rmatvec(lin.matvec(v)) + lam * v

    if preconditioner is None and column_diagonal is not None:
        preconditioner = Preconditioner(diagonal=column_diagonal)
    apply = (lambda v: v) if preconditioner is None else _preconditioner_apply(
        preconditioner, lam, dtype)
    b = lin.rmatvec(rhs)
    bound = forcing * jnp.linalg.norm(b)
    y = jnp.where(jnp.all(jnp.isfinite(initial)), initial, 0.0).astype(dtype)
    steps, y = _preconditioned_cg(operator, apply, y, b - operator(y), bound, max_steps)
    residual = b - operator(y)  # the true residual: round-off, and non-finite data, show here
    image = lin.matvec(y)
    finite = (jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(residual))
              & jnp.all(jnp.isfinite(image)))
    converged = finite & (jnp.linalg.norm(residual) <= 1.01 * bound + jnp.finfo(dtype).tiny)
    y = jnp.where(finite, y, 0.0)
    image = jnp.where(finite, image, 0.0)
    result = SolveResult(y, jnp.asarray(-1, jnp.int32), jnp.asarray(False), converged, steps,
                         finite)
    return DampedStep(y, jnp.vdot(rhs, image), jnp.vdot(image, image), jnp.linalg.norm(y),
                      result)


def _preconditioned_cg(operator: Callable, apply: Callable, x, r, bound, max_steps: int):
    """Preconditioned conjugate gradients for the SPD `operator`, preconditioner `apply`
    (≈ operator⁻¹), from `x` with residual `r` = b − operator(x), until the recurrence's
    residual has ‖r‖ ≤ `bound` or `max_steps`; a non-positive curvature or γ ends it.
    Returns (iterations, x)."""
    w = apply(r)
    gamma = jnp.vdot(r, w)

    def cond(carry):
        i, x, r, p, gamma = carry
        return (i < max_steps) & (jnp.linalg.norm(r) > bound) & (gamma > 0)

    def body(carry):
        i, x, r, p, gamma = carry
        ap = operator(p)
        curvature = jnp.vdot(p, ap)
        alpha = gamma / jnp.where(curvature > 0, curvature, 1.0)
        alpha = jnp.where(curvature > 0, alpha, 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        w = apply(r)
        new_gamma = jnp.vdot(r, w)
        p = w + (new_gamma / jnp.where(gamma > 0, gamma, 1.0)) * p
        return i + 1, x, r, p, new_gamma

    steps, x, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.asarray(0, jnp.int32), x, r, w, gamma))
    return steps, x


def output_space_cg(lin: Linearization, rhs: Float[Array, " M"], lam, *, forcing,
                    max_steps: int, preconditioner: Preconditioner | None = None) -> DampedStep:
    r"""One inexact solve of the damped step on the output side (the wide side, $M \le K$):
    $(\tilde D\tilde D^\top + \lambda I)z = r$ by preconditioned conjugate gradients from z = 0,
    matrix-free (one VJP + one JVP per iteration), stopped when
    $\|r - (\tilde D\tilde D^\top + \lambda I)z\| \le \eta\,\|r\|$ (η = `forcing`) or at
    `max_steps`; then $\tilde\delta = \tilde D^\top z$.

    Why this side: the linear model's residual after the step is
    $r - \tilde D\tilde\delta = \lambda z + s$ with s the CG residual, so η bounds the
    departure from the exact damped step by η‖r‖ in every direction of output space. The K-side
    residual of `normal_equations_cg` is $\tilde D^\top s$, which weighs s by the singular
    values: a relative tolerance there leaves the directions of small singular value unresolved,
    and those are the ones that set the rate once λ is small. `preconditioner` is a
    `Preconditioner` of $\tilde D\tilde D^\top$ (`prepare_preconditioner`: Nyström or Jacobi)
    or None; at small λ the Nyström one is what keeps the iterations few.
    """
    dtype = lin.flat_params.dtype
    lam = jnp.asarray(lam, dtype)
    rhs = rhs.reshape(-1).astype(dtype)

    def operator(z):
        return lin.matvec(lin.rmatvec(z)) + lam * z

    apply = (lambda v: v) if preconditioner is None else _preconditioner_apply(
        preconditioner, lam, dtype)
    bound = forcing * jnp.linalg.norm(rhs)
    steps, z = _preconditioned_cg(operator, apply, jnp.zeros_like(rhs), rhs, bound, max_steps)
    delta = lin.rmatvec(z)
    image = lin.matvec(delta)  # D̃δ̃ = D̃D̃ᵀz: the model, and the true residual below
    residual = rhs - image - lam * z
    finite = (jnp.all(jnp.isfinite(delta)) & jnp.all(jnp.isfinite(image))
              & jnp.all(jnp.isfinite(residual)))
    converged = finite & (jnp.linalg.norm(residual) <= 1.01 * bound + jnp.finfo(dtype).tiny)
    delta = jnp.where(finite, delta, 0.0)
    image = jnp.where(finite, image, 0.0)
    result = SolveResult(delta, jnp.asarray(-1, jnp.int32), jnp.asarray(False), converged, steps,
                         finite)
    return DampedStep(delta, jnp.vdot(rhs, image), jnp.vdot(image, image),
                      jnp.linalg.norm(delta), result)
