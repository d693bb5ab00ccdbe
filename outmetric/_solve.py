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
  Its pivots give a rank estimate; a non-finite or numerically zero pivot (rank loss with too
  little damping) switches to `"svd"`, and the result says so (`fallback=True`).
- `"qr"`: QR of $D^\top$ (or $D$), on the matrix augmented by $\sqrt\lambda I$ when damped.
  Accurate to $\kappa(D)\,\epsilon$ rather than $\kappa(D)^2\epsilon$; the default of the
  undamped flows. A zero diagonal of R (rank loss) switches to `"svd"`.
- `"svd"`: the rank-revealing reference: singular values below `rtol`·σ_max are dropped,
  $\delta = V\,\mathrm{diag}(\sigma/(\sigma^2 + \lambda))\,U^\top g$. Expensive; never the default.
- `"cg"`: matrix-free conjugate gradients (lineax) on the damped Gram operator of the smaller
  side; each product is one JVP plus one VJP and D is never formed. Memory O(K + M).
- `"auto"`: `"cg"` when D would not fit the dense budget, else `"qr"` for an undamped solve
  (damping given as the Python number 0) and `"cholesky"` otherwise.

Dense factorizations call LAPACK through `jax.numpy.linalg` rather than lineax's dense solvers
because the rank estimate and fallback need the factors themselves; the matrix-free path is
lineax's `CG`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._problem import Problem

SOLVERS = ("auto", "cholesky", "qr", "svd", "cg")

#: Largest dense Jacobian (in bytes) that "auto" will materialise before going matrix-free.
DENSE_BUDGET_BYTES = 2 * 1024**3


class SolveResult(NamedTuple):
    """What a solve returns.

    - `delta`: the solution, a flat vector of length K.
    - `rank`: estimated rank of D (from the factorization; -1 for matrix-free solves).
    - `fallback`: whether the rank-revealing SVD fallback was taken.
    - `converged`: False only when an iterative solve stopped before its tolerance.
    """

    delta: Float[Array, " K"]
    rank: Int[Array, ""]
    fallback: Bool[Array, ""]
    converged: Bool[Array, ""]


class Linearization(NamedTuple):
    """D at one point, dense (`jacobian`) or matrix-free (`jvp`, `vjp`), plus the outputs there.

    `gram` caches the Gram matrix of the smaller side (DDᵀ if M ≤ K, else DᵀD) for the Cholesky
    method, so repeated solves with different damping (Levenberg–Marquardt) form it once.
    Built by `linearize` inside a traced function; not meant to cross a `jit` boundary.
    """

    outputs: Float[Array, "N Q"]
    flat_params: Float[Array, " K"]
    unravel: Callable[[Array], PyTree]
    jacobian: Float[Array, "M K"] | None
    jvp: Callable[[Array], Array] | None
    vjp: Callable[[Array], Array] | None
    gram: Float[Array, "n n"] | None = None

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


def resolve_solver(solver: str, damping, num_rows: int, num_params: int, dtype) -> str:
    """The concrete method that `solver` stands for at this size; validates the name."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not a known solver; choose one of {list(SOLVERS)}")
    if solver != "auto":
        return solver
    if num_rows * num_params * jnp.dtype(dtype).itemsize > DENSE_BUDGET_BYTES:
        return "cg"
    return "qr" if is_static_zero(damping) else "cholesky"


def linearize(problem: Problem, params: PyTree, *, method: str = "qr") -> Linearization:
    """Linearize `problem` at `params` for a resolved `method`.

    Dense methods get the Jacobian (and, for `"cholesky"`, the Gram matrix of the smaller side);
    `"cg"` gets JVP/VJP closures and never forms D.
    """
    flat, unravel = ravel_pytree(params)
    if method != "cg":
        x, jac = problem.linearize(params)
        gram = None
        if method == "cholesky":
            gram = jac @ jac.T if jac.shape[0] <= jac.shape[1] else jac.T @ jac
        return Linearization(x, flat, unravel, jac, None, None, gram)

    def stacked(f):
        return problem.outputs(unravel(f)).reshape(-1)

    out, jvp = jax.linearize(stacked, flat)
    transpose = jax.linear_transpose(jvp, flat)
    x = out.reshape(problem.num_samples, problem.output_dim)
    return Linearization(x, flat, unravel, None, jvp, lambda w: transpose(w)[0])


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
) -> SolveResult:
    r"""Solve $\delta = D^+ g$ (or $D^\top(DD^\top+\lambda I)^{-1}g$ with `damping` λ > 0).

    **Arguments:**

    - `lin`: D at the current point, from `linearize`.
    - `rhs`: g, a vector of length M = N·Q.
    - `damping`: λ ≥ 0 (Python number or traced scalar).
    - `solver`: one of `SOLVERS`; see the module docstring.
    - `rtol`: relative singular-value cut-off for the rank estimate and the SVD pseudo-inverse;
      default max(M, K)·ε.
    - `cg_tol`, `cg_max_steps`: relative tolerance and iteration cap of the CG solve; default
      1e-10 in float64 and 1e-5 in float32, and no cap beyond lineax's 10·M.

    **Returns:** a `SolveResult`.

    Rank loss never yields NaN: the Cholesky and QR paths detect it and switch to the SVD
    pseudo-inverse, which drops the null directions.
    """
    num_rows, num_params = lin.shape
    dtype = lin.flat_params.dtype
    method = resolve_solver(solver, damping, num_rows, num_params, dtype)
    if method != "cg" and lin.jacobian is None:
        raise ValueError(f"solver={method!r} needs a dense Jacobian; linearize with a dense method")
    rtol = default_rtol(num_rows, num_params, dtype) if rtol is None else rtol
    rhs = rhs.reshape(-1).astype(dtype)
    lam = jnp.asarray(damping, dtype)
    if method == "cholesky":
        return _cholesky(lin, rhs, lam, rtol)
    if method == "qr":
        return _qr(lin.jacobian, rhs, damping, rtol)
    if method == "svd":
        return _svd(lin.jacobian, rhs, lam, rtol, fallback=False)
    if cg_tol is None:
        cg_tol = 1e-10 if dtype == jnp.float64 else 1e-5
    return _cg(lin, rhs, lam, cg_tol, cg_max_steps)


def _svd(jac, rhs, lam, rtol, *, fallback: bool) -> SolveResult:
    u, s, vt = jnp.linalg.svd(jac, full_matrices=False)
    keep = s > rtol * s[0]
    safe = jnp.where(keep, s, 1.0)
    filt = jnp.where(keep, safe / (safe**2 + lam), 0.0)
    delta = vt.T @ (filt * (u.T @ rhs))
    return SolveResult(delta, jnp.sum(keep).astype(jnp.int32), jnp.asarray(fallback),
                       jnp.asarray(True))


def _cholesky(lin: Linearization, rhs, lam, rtol) -> SolveResult:
    jac = lin.jacobian
    num_rows, num_params = jac.shape
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
    healthy = jnp.all(jnp.isfinite(chol)) & (jnp.min(pivots) > gram_tol) & (scale > 0)

    def factor_solve(_):
        if wide:
            z = jsl.cho_solve((chol, True), rhs)
            delta = jac.T @ z
        else:
            delta = jsl.cho_solve((chol, True), jac.T @ rhs)
        rank = jnp.sum(pivots - lam > rtol * scale).astype(jnp.int32)
        return SolveResult(delta, rank, jnp.asarray(False), jnp.asarray(True))

    return jax.lax.cond(healthy, factor_solve, lambda _: _svd(jac, rhs, lam, rtol, fallback=True),
                        None)


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
    diag = jnp.abs(jnp.diag(r))
    rank = jnp.sum(diag > rtol * jnp.max(diag)).astype(jnp.int32)
    healthy = jnp.all(jnp.isfinite(r)) & (rank == r.shape[0])

    def factor_solve(_):
        if wide:
            z = jsl.solve_triangular(r, rhs, trans="T", lower=False)
            delta = (q @ z)[:num_params]
        else:
            qtg = q[:num_rows].T @ rhs
            delta = jsl.solve_triangular(r, qtg, lower=False)
        return SolveResult(delta, rank, jnp.asarray(False), jnp.asarray(True))

    return jax.lax.cond(healthy, factor_solve, lambda _: _svd(jac, rhs, lam, rtol, fallback=True),
                        None)


def _cg(lin: Linearization, rhs, lam, tol, max_steps) -> SolveResult:
    num_rows, num_params = lin.shape
    wide = num_rows <= num_params
    if wide:
        structure = jax.ShapeDtypeStruct((num_rows,), rhs.dtype)
        operator = lx.FunctionLinearOperator(
            lambda z: lin.matvec(lin.rmatvec(z)) + lam * z, structure,
            tags=lx.positive_semidefinite_tag,
        )
        vector = rhs
    else:
        structure = jax.ShapeDtypeStruct((num_params,), rhs.dtype)
        operator = lx.FunctionLinearOperator(
            lambda v: lin.rmatvec(lin.matvec(v)) + lam * v, structure,
            tags=lx.positive_semidefinite_tag,
        )
        vector = lin.rmatvec(rhs)
    cg = lx.CG(rtol=tol, atol=tol * 1e-3, max_steps=max_steps)
    sol = lx.linear_solve(operator, vector, cg, throw=False)
    delta = lin.rmatvec(sol.value) if wide else sol.value
    converged = sol.result == lx.RESULTS.successful
    finite = jnp.all(jnp.isfinite(delta))
    delta = jnp.where(finite, delta, 0.0)
    return SolveResult(delta, jnp.asarray(-1, jnp.int32), jnp.asarray(False), converged & finite)


def output_metric_gradient(
    problem: Problem,
    params: PyTree,
    *,
    damping: float | Float[Array, ""] = 0.0,
    solver: str = "auto",
    **solve_options,
) -> tuple[PyTree, SolveResult, Linearization]:
    r"""$D^+\nabla_x C$ as a pytree shaped like `params` (damped: $D^\top(DD^\top+\lambda I)^{-1}\nabla_x C$).

    The gradient of C in the output metric pulled back to parameter space: the adapted flow is
    its negative, and the optimizer's step is $-\eta N$ times it (for L², $N\nabla_xC = x - y$).
    Returns the pytree, the `SolveResult`, and the `Linearization` it was computed from.
    """
    flat, _ = ravel_pytree(params)
    method = resolve_solver(solver, damping, problem.num_samples * problem.output_dim,
                            flat.shape[0], flat.dtype)
    lin = linearize(problem, params, method=method)
    grad_x = problem.output_gradient(lin.outputs)
    result = solve(lin, grad_x.reshape(-1), damping=damping, solver=method, **solve_options)
    return lin.unravel(result.delta), result, lin
