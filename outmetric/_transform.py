r"""Output-metric descent as optax gradient transformations (DESIGN §3).

The Euler step of the adapted flow with time step $h = \eta N$ is

$$\Delta\theta = -\eta\,D^+(x - y)\qquad(\text{damped: }-\eta\,D^\top(DD^\top + \lambda I)^{-1}(x - y)),$$

and in general $-\eta\,D^+(N\nabla_x C)$. Both transformations take the current batch as the
keyword extra argument ``problem`` (an `outmetric.Problem`), as `optax.lbfgs` takes
``value_fn``:

    updates, state = opt.update(grads, state, params, problem=problem)

The ordinary gradient ``grads`` is accepted so the transformations compose with the rest of
optax (`optax.apply_if_finite` inspects it, for instance); the step itself does not use it.
"""

import weakref
from typing import NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from ._gram import GRAM_METHODS, gram_diagonal
from ._loss import apply_sample_blocks, get_loss, output_hessian_roots
from ._masking import unmasked_problem
from ._problem import Problem, check_chunk_size, check_params, static_real
from ._results import RESULTS
from ._search import (
    backtracking,
    gradient_test,
    grid_search,
    levenberg_marquardt,
    one_solve_levenberg_marquardt,
    trust_region,
)
from ._solve import (
    MATRIX_FREE,
    PRECONDITIONERS,
    SKETCH_RANK,
    SOLVERS,
    SPECTRAL_MAX_PARAMS,
    DampedStep,
    DirectFactor,
    Preconditioner,
    SolveResult,
    SpectralFactor,
    check_solver_name,
    default_rtol,
    linearize,
    normal_equations_cg,
    output_space_cg,
    plan_solve,
    prepare_preconditioner,
    scale_columns,
    sketch_rank,
    smallest_singular_value,
    solve,
    weight_rows,
)
from ._validation import check_flag, check_nonnegative, check_problem, check_rtol, check_scalar


#: Update functions that ignore their `grads` argument; `fit` skips the backward pass for them.
GRADIENT_FREE: "weakref.WeakSet" = weakref.WeakSet()


def _require_problem(name: str, extra_args: dict) -> Problem:
    problem = extra_args.get("problem")
    if problem is None:
        raise ValueError(
            f"{name}.update needs the current batch as an extra argument: "
            "opt.update(grads, state, params, problem=problem)"
        )
    check_problem(problem)
    return problem


_check_nonnegative = check_nonnegative


def _check_solve_options(rtol, cg_tol, cg_max_steps) -> None:
    """Static checks of the options passed through to the solve; arrays pass unchecked."""
    check_rtol(rtol)
    if cg_tol is not None and not hasattr(cg_tol, "dtype") and (
            isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not 0 < cg_tol):
        raise ValueError(f"cg_tol must be a number in (0, inf) or None, got {cg_tol!r}")
    if cg_max_steps is not None and not hasattr(cg_max_steps, "dtype") and (
        isinstance(cg_max_steps, bool) or not isinstance(cg_max_steps, int) or cg_max_steps < 1
    ):
        raise ValueError(f"cg_max_steps must be a positive integer or None, got {cg_max_steps!r}")


def _check_scale_options(solver, chunk_size, gram, preconditioner, preconditioner_rank,
                         memory_budget) -> None:
    """Static checks of the scale options (chunking, Gram, preconditioner, memory budget)."""
    check_chunk_size(chunk_size)
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram={gram!r} is not a Gram method; choose one of {list(GRAM_METHODS)}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not known; choose one of "
                         f"{list(PRECONDITIONERS)}")
    if preconditioner is not None and solver not in ("cg", "auto"):
        raise ValueError(f"preconditioner={preconditioner!r} applies to solver='cg' (or 'auto' "
                         f"when it picks 'cg'), not solver={solver!r}")
    if preconditioner_rank is not None and (isinstance(preconditioner_rank, bool) or not
                                            isinstance(preconditioner_rank, int)
                                            or preconditioner_rank < 1):
        raise ValueError(f"preconditioner_rank must be a positive integer or None, got "
                         f"{preconditioner_rank!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not
                                      isinstance(memory_budget, int) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got "
                         f"{memory_budget!r}")


def _solver_code(method: str) -> Array:
    return jnp.asarray(SOLVERS.index(method), jnp.int32)


def _residual_vector(problem: Problem, outputs: Array) -> Array:
    """N·∇ₓC, flattened: x − y for the L² loss."""
    return (problem.num_samples * problem.output_gradient(outputs)).reshape(-1)


class ScaleByOutputMetricState(NamedTuple):
    """State of `scale_by_output_metric`: what the last solve reported.

    `solver` is the method the last update used, as an index into `outmetric.SOLVERS`
    (``om.SOLVERS[int(state.solver)]``; -1 before the first update), so what `"auto"` picked
    can be read back. `min_singular_value` is σ_min(D) at the last update when
    `track_min_singular_value=True` (-1 when not estimated). `finite` is False when the last
    solve met NaN or inf in D or the residual (the direction is then zero).
    """

    rank: Int[Array, ""]
    fallback: Bool[Array, ""]
    converged: Bool[Array, ""]
    solver: Int[Array, ""] = np.asarray(-1, np.int32)
    min_singular_value: Float[Array, ""] = np.asarray(-1.0)
    finite: Bool[Array, ""] = np.asarray(True)


def scale_by_output_metric(
    *,
    damping: float = 0.0,
    solver: str = "auto",
    rtol: float | None = None,
    cg_tol: float | None = None,
    cg_max_steps: int | None = None,
    chunk_size: int | None = None,
    gram: str = "auto",
    preconditioner: str | None = None,
    preconditioner_rank: int | None = None,
    memory_budget: int | None = None,
    track_min_singular_value: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Replace the gradient by the output-metric direction $D^+ (N\nabla_x C)$.

    $$u = D^+ (x - y)\qquad(\text{damped: } u = D^\top(DD^\top + \lambda I)^{-1}(x - y)),$$

    with D the output Jacobian of the `problem` extra argument at `params`. Like `scale_by_adam`
    it returns a descent *direction*: chain it with `optax.scale_by_learning_rate` (which
    multiplies by $-\eta$) for the step $-\eta D^+(x - y)$. No safeguards: see
    `output_metric_descent` for backtracking and adaptive damping.

    **Arguments:**

    - `damping`: fixed λ ≥ 0.
    - `solver`: `"auto"`, `"cholesky"`, `"qr"`, `"svd"`, `"cg"` or `"lsmr"`
      (`outmetric._solve`); the solve works on the smaller side (QN×QN or K×K). `"auto"`
      decides from the sizes, dtype and device memory (`outmetric.plan_solve`) and
      `state.solver` says what it picked.
    - `rtol`, `cg_tol`, `cg_max_steps`: passed to the solve (the last two to CG and LSMR).
    - `chunk_size`: compute per-sample Jacobians (and the Cholesky Gram, without holding D)
      this many samples at a time.
    - `gram`: where the Cholesky Gram comes from: `"auto"` (the dense-layer structure when the
      model has dense layers and the wide side is solved), `"structured"` or `"jacobian"`.
    - `preconditioner`, `preconditioner_rank`: for CG: None, `"jacobi"` or `"nystrom"`.
    - `memory_budget`: bytes that `"auto"` may plan for (default: half the device's memory).
    - `track_min_singular_value`: also record σ_min(D) in the state each update, so rank loss
      shows before it happens, and take `state.rank` from the same eigenvalues
      (`outmetric._solve.smallest_singular_value`: an `eigvalsh` of the Gram, dense solves
      only; -1 for matrix-free ones). Without it the rank is the solve's estimate, which under
      damping λ counts the directions λ props up (Cholesky pivots cannot tell them apart).
    """
    check_solver_name(solver)
    _check_nonnegative("damping", damping)
    _check_flag("track_min_singular_value", track_min_singular_value)
    _check_solve_options(rtol, cg_tol, cg_max_steps)
    _check_scale_options(solver, chunk_size, gram, preconditioner, preconditioner_rank,
                         memory_budget)

    def init_fn(params):
        check_params(params)
        dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
        return ScaleByOutputMetricState(jnp.asarray(-1, jnp.int32), jnp.asarray(False),
                                        jnp.asarray(True), jnp.asarray(-1, jnp.int32),
                                        jnp.asarray(-1.0, dtype), jnp.asarray(True))

    def update_fn(updates, state, params=None, **extra_args):
        del updates, state
        if params is None:
            raise ValueError("scale_by_output_metric.update needs params")
        problem = _require_problem("scale_by_output_metric", extra_args)
        problem = unmasked_problem(problem, params, extra_args, "scale_by_output_metric")
        lin, method, _ = _linearize(problem, params, damping, solver, chunk_size, gram,
                                 memory_budget)
        result = solve(lin, _residual_vector(problem, lin.outputs), damping=damping,
                       solver=method, rtol=rtol, cg_tol=cg_tol, cg_max_steps=cg_max_steps,
                       preconditioner=preconditioner if method == "cg" else None,
                       preconditioner_rank=preconditioner_rank)
        direction = lin.unravel(result.delta)
        direction = jax.tree_util.tree_map(lambda d, p: d.astype(p.dtype), direction, params)
        rank, sigma = _spectrum_report(lin, result, track_min_singular_value, rtol)
        return direction, ScaleByOutputMetricState(rank, result.fallback, result.converged,
                                                   _solver_code(method), sigma, result.finite)

    GRADIENT_FREE.add(update_fn)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_check_flag = check_flag


def _spectrum_report(lin, result: SolveResult, track: bool, rtol) -> tuple[Array, Array]:
    """(rank, σ_min(D)) for the state: the solve's rank and -1 untracked, else both from the
    Gram's eigenvalues (where there is a Gram; the solve's rank otherwise)."""
    dtype = lin.flat_params.dtype
    if not track:
        return result.rank, jnp.asarray(-1.0, dtype)
    sigma, rank = smallest_singular_value(lin, rtol)
    return jnp.where(rank >= 0, rank, result.rank), sigma


def _linearize(problem, params, damping, solver, chunk_size=None, gram="auto",
               memory_budget=None, many_dampings=False):
    plan = plan_solve(problem, params, solver=solver, damping=damping, chunk_size=chunk_size,
                      gram=gram, memory_budget=memory_budget, many_dampings=many_dampings)
    lin = linearize(problem, params, method=plan.method, chunk_size=plan.chunk_size,
                    gram=plan.gram)
    return lin, plan.method, plan.chunk_size


class OutputMetricDescentState(NamedTuple):
    """State of `output_metric_descent`, all arrays (checkpointable with any pytree tool).

    - `count`: updates made (including those that found no decrease and took no step).
    - `damping`: λ of the last trial (adaptive: the next update starts from it).
    - `damping_growth`: the Levenberg–Marquardt growth factor ν for the next rejection.
    - `step_size`: the fraction of the step finally taken (0 when no decrease was found).
    - `rank`, `fallback`: what the last solve reported (`rank` from the Gram eigenvalues with
      `track_min_singular_value=True`; a spectral factorization reports the numerical rank and
      `fallback=True` where it is below min(QN, K)).
    - `cost`: C before the last update.
    - `solver`: the method of the last step, an index into `outmetric.SOLVERS`
      (``om.SOLVERS[int(state.solver)]``; -1 before the first step): what `"auto"` picked.
    - `min_singular_value`: σ_min(D) before the last step with `track_min_singular_value=True`
      (-1 when not estimated).
    - `finite`: False when the last solve met NaN or inf in D or the residual; no step was
      taken then, and `fit` stops with a `NonFiniteError`.
    - `status`: an `outmetric.RESULTS` code: `running`, or why the run should end
      (``om.RESULTS(int(state.status))``); `fit` stops on it.
    - `scale`: the damping scale S (MINPACK's running maximum of diag DᵀD), 0 before the first
      update; ones under isotropic damping.
    - `radius`: the trust radius Δ in the scaled norm (-1 before the first update, or when
      the trust region is not used).
    - `direction`: the last scaled direction $S^{1/2}\\delta$, the matrix-free solve's warm
      start.
    - `forcing`: the matrix-free solve's relative tolerance for the next update
      (Eisenstat–Walker), and `gradient_norm` the norm it was computed from: ‖S^{-1/2}Dᵀr‖,
      or ‖r‖ for the solve on the output side.
    - `solve_converged`, `solve_steps`: whether the last solve reached its tolerance (False
      only for an iterative solve stopped by its iteration cap) and its iterations.
    - `sketch_basis`, `sketch_values`: the Nyström preconditioner of the matrix-free solve on
      the wide side (`preconditioner="nystrom"`), kept across updates: an orthonormal basis U
      of the output side's Gram in the first QN of its K rows, and its ℓ eigenvalues μ̂
      (all 0: none yet). Shapes (K, ℓ) and (ℓ,), ℓ = 0 without it.
    - `sketch_refresh`: sketch anew at the next update; `sketch_effort`: the normalized CG
      iterations of the first solve after the last sketch (see `_reuse_sketch`).
    - `gram_average`: the Gram $D^\top D$ averaged over the updates (`gram_average` > 0 on the
      tall side), shape (K, K); (0, 0) without it.
    - `momentum`: SPRING's direction φ of the last update (`momentum` > 0: the step
      taken was −ηφ), in parameter coordinates, shape (K,); (0,) without it.
    """

    count: Int[Array, ""]
    damping: Float[Array, ""]
    damping_growth: Float[Array, ""]
    step_size: Float[Array, ""]
    rank: Int[Array, ""]
    fallback: Bool[Array, ""]
    cost: Float[Array, ""]
    solver: Int[Array, ""] = np.asarray(-1, np.int32)
    min_singular_value: Float[Array, ""] = np.asarray(-1.0)
    finite: Bool[Array, ""] = np.asarray(True)
    status: Int[Array, ""] = np.asarray(0, np.int32)
    scale: Float[Array, " K"] | None = None
    radius: Float[Array, ""] = np.asarray(-1.0)
    direction: Float[Array, " K"] | None = None
    forcing: Float[Array, ""] = np.asarray(0.5)
    gradient_norm: Float[Array, ""] = np.asarray(-1.0)
    solve_converged: Bool[Array, ""] = np.asarray(True)
    solve_steps: Int[Array, ""] = np.asarray(0, np.int32)
    sketch_basis: Float[Array, "K l"] | None = None
    sketch_values: Float[Array, " l"] | None = None
    sketch_refresh: Bool[Array, ""] = np.asarray(True)
    sketch_effort: Float[Array, ""] = np.asarray(-1.0)
    gram_average: Float[Array, "K K"] | None = None
    momentum: Float[Array, " K"] | None = None


#: Adaptive damping rules: "auto" (the trust region where a spectral factorization makes
#: every λ cheap), MINPACK's "trust_region", or Nielsen's "levenberg_marquardt".
STEP_RULES = ("auto", "trust_region", "levenberg_marquardt")

#: λ of the averaged-Gram rule (`gram_average` > 0), relative to the scaled Gram's unit
#: diagonal: light damping; the average over batches keeps the small eigenvalues in check.
AVERAGED_DAMPING = 1e-8

#: Scaled damping: "auto" (column scaling on the tall side under adaptive damping), or either.
SCALINGS = ("auto", "jacobian", "identity")

#: Halvings of the matrix-free step's α when its one solve gives no decrease (cost evaluations
#: only; the next update solves at a larger λ).
MATRIX_FREE_BACKTRACKS = 10

#: The inexact-Newton (Eisenstat–Walker, choice 2) forcing rule of the matrix-free solve:
#: η_k = γ(‖g_k‖/‖g_{k-1}‖)² (safeguarded by γη_{k-1}² when that exceeds 0.1), at most
#: `FORCING_MAX`, at least the solve tolerance.
FORCING_GAMMA, FORCING_MAX = 0.9, 0.01  # 0.5 gave steps too crude on small fits


def _default_tolerance(value, dtype) -> float:
    """xtol, gtol and the CG floor: 1e-10 in float64, 1e-5 in float32."""
    if value is not None:
        return value
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def _default_ftol(value, dtype) -> float:
    """ftol: 10ε, so the test fires where a reduction is round-off, not before (a relative
    cost reduction of 1e-10 can leave parameters wrong in the fourth digit)."""
    if value is not None:
        return value
    return 10.0 * float(jnp.finfo(dtype).eps)


def output_metric_descent(
    learning_rate: float | optax.Schedule = 1.0,
    *,
    damping: float | str = "adaptive",
    initial_damping: float = 1e-3,
    scaling: str = "auto",
    step_rule: str = "auto",
    solver: str = "auto",
    linesearch: str | None = "backtracking",
    max_linesearch_steps: int = 30,
    ftol: float | None = None,
    xtol: float | None = None,
    gtol: float | None = None,
    rtol: float | None = None,
    cg_tol: float | None = None,
    cg_max_steps: int | None = None,
    chunk_size: int | None = None,
    gram: str = "auto",
    preconditioner: str | None = None,
    preconditioner_rank: int | None = None,
    memory_budget: int | None = None,
    track_min_singular_value: bool = False,
    geodesic_acceleration: bool | None = None,
    gram_average: float = 0.0,
    loss_hessian: bool | None = None,
    momentum: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Output-metric descent: the discretised adapted flow with safeguards and stopping tests.

    $$\theta_{k+1} = \theta_k - \eta_k\,\alpha_k\,\delta_k,\qquad
    (D^\top D + \lambda_k S_k)\,\delta_k = D^\top r,\quad r = N\nabla_x C\ (= x - y\text{ for L}^2),$$

    computed on the smaller side of the solve ($\delta = S^{-1/2}\tilde D^\top(\tilde D\tilde
    D^\top + \lambda I)^{-1}r$ with $\tilde D = DS^{-1/2}$; DESIGN §6). $\eta_k$ is the learning
    rate (or schedule). S is the damping scale:

    - `scaling="jacobian"`: MINPACK's $S = \mathrm{diag}(D^\top D)$, kept as the running maximum
      of the squared column norms. The step is then invariant to a diagonal rescaling of θ,
      which is what fits with parameters of very different magnitudes need (NIST's span
      1e-9 … 1e3).
    - `scaling="identity"`: S = I, the isotropic output-space damping of the theory; as λ → 0 it
      gives the minimum-norm step $D^+r$ of the adapted flow (on the wide side, QN ≤ K, a
      scaled λ → 0 limit is a different, $S$-weighted minimum-norm step).
    - `scaling="auto"` (default): "jacobian" on the tall side (K < QN, curve fits and PINNs)
      under adaptive damping, where every S gives the same Gauss–Newton limit and only the path
      of the damping changes; "identity" on the wide side, under fixed damping, and for a
      step weighted by the loss's Hessian (`loss_hessian`, below), whose column norms fall by
      orders of magnitude as the fit saturates (digits cross-entropy: 0.07141 after 40 s with
      the running maximum, 0.07113 without, the minimum being 0.07113).

    Damping and step:

    - `damping="adaptive"` (default), with a spectral factorization (`solver="svd"` or
      `"eigh"`, or `"auto"` on the tall side while D fits): MINPACK's trust region. One SVD of
      $\tilde D$ (or eigendecomposition of its Gram) per update serves every λ, λ solving
      $\|\tilde\delta(\lambda)\| = \Delta$ in closed form, Δ adapted from the gain ratio ρ
      (`outmetric._search.trust_region`); rank loss is read off the spectrum. With
      `geodesic_acceleration` on (the default on fixed data) each trial is the better of $\delta_k$ and
      $\delta_k + \tfrac12\eta_k a_k$, $a_k$ the geodesic acceleration: the damped solve, on
      the same factorization, of the outputs' second directional derivative along
      $\delta_k$ (one JVP of a JVP per trial; `outmetric._search._accelerated`), which keeps
      the outputs on the model's straight line to second order (on the heat PINN it takes
      the L² error to 1e-7 in ≈ 330 updates instead of > 1 000).
    - `damping="adaptive"` with `"cholesky"` (the wide side's default) or `"qr"`: Levenberg–
      Marquardt with Nielsen's rule, one Cholesky of the damped Gram per λ tried; λ starts at
      `initial_damping` times the mean diagonal of the (scaled) Gram (`_search.levenberg_marquardt`).
    - `damping="adaptive"` with a matrix-free solver (`"cg"`): one inexact CG solve per update
      on the K side, warm-started from the previous direction and stopped by the
      Eisenstat–Walker forcing rule (or at `cg_tol` when given); λ is adapted from ρ between
      updates, as in Hessian-free optimisation, and a rejected direction is backtracked
      (α = 1/2, 1/4, …: cost evaluations, no second solve) while the next update solves at
      the larger λ (`_search.one_solve_levenberg_marquardt`). One solve per update, the first
      included. On the wide side with `preconditioner="nystrom"`, or when `"auto"` picks
      `"cg"` there (`plan_solve`: one M×M Cholesky would cost more than
      `MATRIX_FREE_PRODUCTS` Gram-vector products), the solve is instead on the output side
      (`output_space_cg`, forcing on ‖r‖, from z = 0), preconditioned by a Nyström sketch of
      rank ℓ (`preconditioner_rank`, default `SKETCH_RANK`; under `"auto"` `sketch_rank`)
      that the state keeps across updates and renews when CG slows (`_reuse_sketch`). On the
      tall side `"auto"` picks `"cg"` when forming DᵀD and its Cholesky would cost more than
      `MATRIX_FREE_PRODUCTS` products (digits cross-entropy, K = 9,610 < QN = 13,470); the
      K-side solve above then runs on the column-scaled D̃ (the explicit step; the
      loss-Hessian weighted one is damped isotropically), preconditioned by the same kept
      Nyström sketch, here of D̃ᵀD̃. λ's unit, the mean Gram diagonal, is then a one-probe
      Hutchinson estimate (`_mean_gram_diagonal`).
    - `damping=λ` (a number ≥ 0): fixed damping; with `linesearch="backtracking"` the step
      fraction $\alpha_k$ is the largest of 1, 1/2, 1/4, … that decreases C; with
      `linesearch=None` the plain Euler step ($\alpha_k = 1$; for a model linear in θ with
      λ = 0 the residual shrinks by exactly $(1 - \eta)$ per step).

    With adaptive damping or backtracking the cost never increases: an update that finds no
    decrease takes no step (`state.step_size == 0`).

    Termination (MINPACK's tests, DESIGN §6), reported as `state.status` (an
    `outmetric.RESULTS` code) and acted on by `fit`: `ftol` (actual and predicted relative
    reductions of C both ≤ ftol), `xtol` (the scaled step or trust radius ≤ xtol·‖S^{1/2}θ‖),
    `gtol` (largest cosine between r and a column of D ≤ gtol; tested where the column norms
    are at hand: a dense D, the tall side's Gram, or scaled damping), and `stalled` (no decrease
    found within the update's trials). Defaults: ftol = 10ε (the reductions are round-off), xtol
    = gtol = 1e-10 in float64 and 1e-5 in float32. The trust region starts at Δ = ‖S^{1/2}θ₀‖
    (MINPACK's `factor` = 1; its usual 100 lets the first step leap onto plateaus, as on NIST's
    BoxBOD from its first start).

    **Arguments:**

    - `learning_rate`: η in (0, 1], or an optax schedule of the step count.
    - `damping`: `"adaptive"` or a fixed λ ≥ 0.
    - `initial_damping`: the Levenberg–Marquardt λ's start, relative to the mean Gram diagonal.
    - `scaling`: `"auto"`, `"jacobian"` or `"identity"` (above).
    - `solver`: as in `scale_by_output_metric`, plus `"eigh"` (eigendecomposition of the Gram,
      without a dense D). `"auto"` picks `"svd"` on the tall side while D fits
      (`plan_solve(..., many_dampings=True)`), else Cholesky of the damped Gram, else CG.
    - `linesearch`: `"backtracking"` or None (fixed damping only).
    - `max_linesearch_steps`: trials per update (halvings, λ increases or radius cuts).
    - `ftol`, `xtol`, `gtol`: the termination tolerances (above).
    - `rtol`, `cg_tol`, `cg_max_steps`, `chunk_size`, `gram`, `preconditioner`,
      `preconditioner_rank`, `memory_budget`: as in `scale_by_output_metric`. The Gram (or the
      factorization) is formed once per update and reused by every λ tried.
    - `track_min_singular_value`: record σ_min(D) in `state.min_singular_value` each step (as
      in `scale_by_output_metric`); `fit` collects it into `FitResult.min_singular_values`.
    - `geodesic_acceleration`: try the second-order correction of each trust-region trial
      (above; needs a model that forward-mode AD can differentiate twice). No effect on the
      other step rules. None (default): on, except for an update told that its batch is newly
      drawn (the ``fresh_data=True`` extra argument, which `fit` passes with `batches=`):
      there the correction, fitted to one batch, makes the next batch's error worse (on the
      5-D Poisson PINN with redrawn points, 1.4–3× at equal steps).
    - `gram_average`: β in [0, 1). With β > 0, on the tall side (K < QN, K ≤
      `SPECTRAL_MAX_PARAMS`) and adaptive damping, the rule for data redrawn every update
      (`fit`'s default with `batches=` uses β = 0.3): the Gram $D^\top D$ is averaged over the
      updates, $G_k = \beta G_{k-1} + (1-\beta)D_k^\top D_k$ ($G_0 = D_0^\top D_0$; the
      energy natural gradient codes' exponential moving average), the step solves
      $(\tilde G_k + \lambda I)\tilde\delta = S^{-1/2}D_k^\top r_k$ with the columns scaled
      by $S = \mathrm{diag}\,G_k$ (unit diagonal) and a light fixed λ = `AVERAGED_DAMPING`,
      one eigendecomposition per update, and its length is ENGD's line search on the current
      batch over α in {1, 1/2, …, 2^-30}, scanned from the top to the first local minimum of
      the cost (`_search.grid_search`; a few cost evaluations). A batch's own
      Gram is nearly singular (κ ≈ 1e10 on that PINN) in directions that differ from batch to
      batch; its Gauss–Newton step fits that batch's noise there, and the trust region's
      damping, tuned on one batch, is wrong on the next; the average is better conditioned and
      what it resolves carries over. On the 5-D Poisson PINN: L² error 1e-6 in ≈ 160 updates,
      where the trust region is still near 1e-5 after 350–400 (`benchmarks.pinn_batch_rules`).
      The state then holds the K×K average (`state.gram_average`); β is read at `init`, where
      it sets that shape (under `optax.inject_hyperparams` with a jitted `init`, name it in
      ``static_args``).

    - `loss_hessian`: for a loss other than L² (cross-entropy), weigh the output space by the
      loss's Hessian $\hat H = N\nabla_x^2C$ (block-diagonal, one Q×Q block per sample): the
      step solves $(D^\top\hat HD + \lambda S)\delta = D^\top r$, i.e. everything above runs
      on $\hat D = \hat H^{1/2}D$ and $\hat r = \hat H^{+1/2}r$ (`weight_rows`,
      `output_hessian_roots`), and the gain ratio compares the actual decrease with that of
      the loss's quadratic model. This is the limit, as the time step h grows, of the linearly
      implicit Euler step of the same adapted flow: $\theta' = F(\theta) = -D^+\nabla_xC$
      has $\partial F \approx -D^+\hat HD/N$, and $(I - h\,\partial F)\Delta\theta =
      hF$ is, on either side, $D^\top(I + \tfrac hN\hat H)D\,\Delta\theta = -\tfrac hN
      D^\top r$. For L² ($\hat H = I$) that is the step with η = (h/N)/(1 + h/N), so
      η = 1 is its h → ∞ limit and nothing changes; for cross-entropy the h → ∞ limit is the
      generalized Gauss–Newton step (Newton's method in output space, $\Delta x =
      -\hat H^+r$ on the wide side), where the explicit step $\Delta x = -(p - y)$ shrinks
      the error of a class of probability p by only about (1 − p) per update (on digits,
      p ≈ 0.001 for the wrong classes). The flow, its equilibria and the conserved logit
      sums are the same. None (default): on, except on the tall side with a chunked Gram
      and no dense D, which cannot be reweighted (True there is an error); False: the
      explicit step.
    - `momentum`: μ in [0, 1), for a fixed `damping` λ only. With μ > 0 the update is
      SPRING's (the rule of the mini-batch natural-gradient codes for wide batches, QB ≤ K):
      a direction kept across updates, $\varphi_k = \mu\varphi_{k-1} + \delta_k$ with δ_k the
      damped step for the residual $r_k - \mu D_k\varphi_{k-1}$, and the step $-\eta\varphi_k$
      (`_with_momentum`; backtracking, unless `linesearch=None`, shortens it and what the
      state keeps). It costs one more Jacobian-vector product per update and K numbers of
      state (`state.momentum`). μ sets the state's shape, so it is read when the optimizer is
      made (a traced μ, from `optax.inject_hyperparams` under a jitted `init`, is no momentum:
      name it in ``static_args``).

    Use as any optax optimizer: ``opt.update(grads, state, params, problem=problem)``.
    """
    check_solver_name(solver)
    adaptive = isinstance(damping, str)
    if adaptive and damping != "adaptive":
        raise ValueError(f"damping must be 'adaptive' or a number >= 0, got {damping!r}")
    if not adaptive:
        _check_nonnegative("damping", damping)
    if isinstance(learning_rate, bool):
        raise TypeError(f"learning_rate must be a number in (0, 1] or an optax schedule, got {learning_rate!r}")
    rate = static_real(learning_rate)
    if rate is not None and not 0 < rate <= 1:
        raise ValueError(f"learning_rate must lie in (0, 1], got {learning_rate}")
    if not (callable(learning_rate) or isinstance(learning_rate, (int, float))
            or hasattr(learning_rate, "dtype")):
        raise TypeError(f"learning_rate must be a number or an optax schedule, got {learning_rate!r}")
    if not callable(learning_rate):
        check_scalar("learning_rate", learning_rate)
    if linesearch not in ("backtracking", None):
        raise ValueError(f"linesearch must be 'backtracking' or None, got {linesearch!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {list(STEP_RULES)}, got {step_rule!r}")
    # Numbers may arrive as arrays (optax.inject_hyperparams injects every numeric argument).
    tries = static_real(max_linesearch_steps)
    if (tries is None and not hasattr(max_linesearch_steps, "dtype")) or (
        tries is not None and not (tries.is_integer() and tries >= 1)
    ):
        raise ValueError(f"max_linesearch_steps must be a positive integer, got {max_linesearch_steps!r}")
    max_trials = int(tries) if tries is not None else 30
    _check_nonnegative("initial_damping", initial_damping)
    _check_flag("track_min_singular_value", track_min_singular_value)
    if geodesic_acceleration is not None:
        _check_flag("geodesic_acceleration", geodesic_acceleration)
    if loss_hessian is not None:
        _check_flag("loss_hessian", loss_hessian)
    average = static_real(gram_average)  # (an array under optax.inject_hyperparams)
    if isinstance(gram_average, bool) or (
            average is None and not hasattr(gram_average, "dtype")) or (
            average is not None and not 0 <= average < 1):
        raise ValueError(f"gram_average must be a number in [0, 1), got {gram_average!r}")
    mu = static_real(momentum)  # (an array under optax.inject_hyperparams, like gram_average)
    if isinstance(momentum, bool) or (mu is None and not hasattr(momentum, "dtype")) or (
            mu is not None and not 0 <= mu < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    spring = mu is not None and mu > 0
    if spring and adaptive:
        raise ValueError("momentum > 0 is SPRING's rule, for a fixed damping: pass damping=λ "
                         "(a number), not 'adaptive'")
    _check_solve_options(rtol, cg_tol, cg_max_steps)
    _check_tolerances(ftol=ftol, xtol=xtol, gtol=gtol)
    _check_scale_options(solver, chunk_size, gram, preconditioner, preconditioner_rank,
                         memory_budget)
    solve_damping = 1.0 if adaptive else damping  # any non-zero traced λ picks a damped path
    # The kept Nyström sketch of the adaptive matrix-free path (ℓ columns; none otherwise).
    # Under solver="auto" the plan is made at the first update; the sketch is allocated here
    # in case it picks "cg" (`sketch_rank` bounds what that costs when it does not).
    if adaptive and preconditioner == "nystrom":
        kept_rank = preconditioner_rank or SKETCH_RANK
    elif adaptive and solver == "auto" and preconditioner is None:
        kept_rank = None  # sketch_rank(K, itemsize, budget), at init
    else:
        kept_rank = 0

    def init_fn(params):
        check_params(params)
        flat = jax.flatten_util.ravel_pytree(params)[0]
        dtype = flat.dtype
        lam = jnp.asarray(-1.0 if adaptive else damping, dtype)  # -1: set at the first step
        num_params = flat.shape[0]
        rank = min(num_params, kept_rank if kept_rank is not None else sketch_rank(
            num_params, dtype.itemsize, memory_budget))
        return OutputMetricDescentState(
            jnp.asarray(0, jnp.int32), lam, jnp.asarray(2.0, dtype), jnp.asarray(0.0, dtype),
            jnp.asarray(-1, jnp.int32), jnp.asarray(False), jnp.asarray(jnp.inf, dtype),
            jnp.asarray(-1, jnp.int32), jnp.asarray(-1.0, dtype), jnp.asarray(True),
            jnp.asarray(RESULTS.running, jnp.int32), jnp.zeros_like(flat),
            jnp.asarray(-1.0, dtype), jnp.zeros_like(flat), jnp.asarray(FORCING_MAX, dtype),
            jnp.asarray(-1.0, dtype), jnp.asarray(True), jnp.asarray(0, jnp.int32),
            jnp.zeros((num_params, rank), dtype), jnp.zeros((rank,), dtype), jnp.asarray(True),
            jnp.asarray(-1.0, dtype),
            jnp.zeros((num_params, num_params) if _keeps_gram(gram_average, num_params)
                      else (0, 0), dtype),
            jnp.zeros((num_params if spring else 0,), dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del updates
        if params is None:
            raise ValueError("output_metric_descent.update needs params")
        problem = _require_problem("output_metric_descent", extra_args)
        problem = unmasked_problem(problem, params, extra_args, "output_metric_descent")
        fresh_data = _fresh_data(extra_args)
        num_rows = problem.num_samples * problem.output_dim
        flat0 = jax.flatten_util.ravel_pytree(params)[0]
        wide = num_rows <= flat0.shape[0]
        scaled = scaling == "jacobian" or (scaling == "auto" and adaptive and not wide)
        plan_gram = "jacobian" if scaled and wide and gram == "auto" else gram
        averaged = (adaptive and not wide
                    and state.gram_average.shape[0] == flat0.shape[0] > 0)
        lin, method, plan_chunk = _linearize(problem, params, solve_damping,
                                             "eigh" if averaged else solver, chunk_size,
                                             plan_gram, memory_budget, many_dampings=adaptive)
        dtype = lin.flat_params.dtype
        weighted = _weighs_loss_hessian(loss_hessian, problem, lin)
        if weighted:
            lin, root, pinv_root = _weighted(problem, params, lin, plan_chunk)
            # Ĥ falls by orders of magnitude as the fit saturates (p(1 − p) → 0), so a running
            # maximum of the weighted column norms would overstate the curvature and let λS
            # swamp the step: under "auto" the weighted step is damped isotropically.
            scaled = scaled and scaling == "jacobian"
        gram_kept = state.gram_average
        if averaged:
            first = state.count == 0
            ema = jnp.where(first, lin.gram, gram_average * state.gram_average.astype(dtype)
                            + (1.0 - gram_average) * lin.gram)
            lin = lin._replace(gram=ema)
            gram_kept = ema.astype(state.gram_average.dtype)
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        if callable(learning_rate):
            _check_schedule_value(eta)
        eta = jnp.asarray(eta, dtype)
        if not isinstance(learning_rate, (int, float)):  # a schedule or an injected array
            eta = eqx.error_if(eta, ~((eta > 0) & (eta <= 1)),
                               "output_metric_descent: the learning_rate (schedule) gave a value "
                               "outside (0, 1]")
        # In the parameters' dtype (float32 params on float64 data: the Problem casts the data,
        # so outputs, D and the state are float32).
        residual = _residual_vector(problem, lin.outputs).astype(dtype)
        if weighted:
            residual = apply_sample_blocks(pinv_root, residual)  # R⁺r
        cost0 = problem.cost_from_outputs(lin.outputs).astype(dtype)
        ftol_ = _default_ftol(ftol, dtype)
        xtol_ = _default_tolerance(xtol, dtype)
        gtol_ = _default_tolerance(gtol, dtype)

        # The damping scale S and the columns of D (the gtol test), where they are at hand.
        columns_at_hand = scaled or lin.jacobian is not None or (lin.gram is not None
                                                                  and not wide)
        flat = lin.flat_params
        if columns_at_hand:
            column_sq = lin.column_diagonal().astype(dtype)
            # Computed once: matrix-free, each call is a pass of per-sample Jacobians.
            lin = lin._replace(column_diagonal=lambda: column_sq)
            scale = jnp.maximum(state.scale.astype(dtype), column_sq) if scaled else None
        if averaged:  # the averaged Gram's own diagonal: the scaled Gram has a unit diagonal
            scale = jnp.diag(lin.gram).astype(dtype)
            scaled = True
        if scaled:
            scale = jnp.where(scale > 0, scale, 1.0)
            inv_sqrt = 1.0 / jnp.sqrt(scale)
            scaled_lin = scale_columns(lin, inv_sqrt)
            xnorm = jnp.linalg.norm(jnp.sqrt(scale) * flat)
        else:
            scale = jnp.ones_like(flat)
            inv_sqrt = scale
            scaled_lin = lin
            xnorm = jnp.linalg.norm(flat)
        gradient = scaled_lin.rmatvec(residual)  # S^{-1/2} Dᵀ r
        solve_rhs = residual
        if spring:  # SPRING: solve for what the last direction leaves of r (`_with_momentum`)
            previous = state.momentum.astype(dtype) / inv_sqrt  # S^{1/2}φ
            pushed = scaled_lin.matvec(previous)
            solve_rhs = residual - mu * pushed
        gradient_norm = jnp.linalg.norm(gradient)
        if columns_at_hand:
            gtol_hit = gradient_test(gradient * jnp.sqrt(scale) if scaled else gradient,
                                     jnp.sqrt(column_sq), jnp.linalg.norm(residual), gtol_)
        else:
            gtol_hit = jnp.asarray(False)

        def trial_cost(step):
            return problem.cost(lin.unravel(flat - step)).astype(dtype)

        common = (inv_sqrt, eta, cost0, trial_cost, problem.num_samples)
        spectral = method in ("svd", "eigh")
        matrix_free = method in MATRIX_FREE
        forcing = state.forcing
        forcing_norm = gradient_norm
        output_side = kept_sketch = False
        if spectral:
            factor = SpectralFactor(scaled_lin, solve_rhs,
                                    _rtol(rtol, lin.shape, dtype), use_gram=method == "eigh")
        elif method == "cg" and adaptive:
            # The output side when preconditioned by Nyström on the wide side
            # (`output_space_cg`); the forcing then follows ‖r‖, else ‖S^{-1/2}Dᵀr‖.
            # The kept Nyström sketch preconditions either side (`_kept_sketch`).
            kept_sketch = state.sketch_values.shape[0] > 0 and (
                preconditioner == "nystrom" or (solver == "auto" and preconditioner is None))
            output_side = wide and kept_sketch
            forcing_norm = jnp.linalg.norm(residual) if output_side else gradient_norm
            if cg_tol is None:
                ratio = forcing_norm / jnp.where(state.gradient_norm > 0, state.gradient_norm,
                                                 forcing_norm)
                forcing = jnp.where(state.gradient_norm > 0, FORCING_GAMMA * ratio**2,
                                    FORCING_MAX)
                safeguard = FORCING_GAMMA * state.forcing**2
                forcing = jnp.where(safeguard > 0.1, jnp.maximum(forcing, safeguard), forcing)
                forcing = jnp.clip(forcing, _default_tolerance(None, dtype), FORCING_MAX)
            else:
                forcing = jnp.asarray(cg_tol, dtype)
            max_cg = cg_max_steps or 10 * min(lin.shape) + 10
            if output_side:
                pre, sketched = _kept_sketch(scaled_lin, state, dtype)
                factor = _OutputKrylovFactor(scaled_lin, residual, forcing.astype(dtype), max_cg,
                                             pre)
            else:
                column_diag = (scaled_lin.column_diagonal() if preconditioner == "jacobi"
                               else None)
                pre, sketched = (_kept_sketch(scaled_lin, state, dtype) if kept_sketch
                                 else (None, None))
                factor = _KrylovFactor(scaled_lin, residual, state.direction.astype(dtype),
                                       forcing.astype(dtype), max_cg, column_diag, pre)
        else:
            pre = prepare_preconditioner(scaled_lin, preconditioner, preconditioner_rank) if (
                method == "cg") else None
            factor = DirectFactor(scaled_lin, solve_rhs, method, rtol, cg_tol=cg_tol,
                                  cg_max_steps=cg_max_steps, preconditioner=pre)

        if averaged:
            outcome = grid_search(factor.step(jnp.asarray(AVERAGED_DAMPING, dtype)), *common,
                                  xnorm=xnorm, ftol=ftol_, xtol=xtol_)
        elif not adaptive:
            damped = factor.step(jnp.asarray(damping, dtype))
            if spring:
                damped = _with_momentum(damped, previous, mu, scaled_lin, residual)
            outcome = backtracking(damped, *common,
                                   xnorm=xnorm, ftol=ftol_, xtol=xtol_, max_trials=max_trials,
                                   enabled=linesearch == "backtracking")
        elif spectral and step_rule in ("auto", "trust_region"):
            accelerate = (not fresh_data if geodesic_acceleration is None
                          else geodesic_acceleration)
            accel = _second_derivative(problem, lin, dtype) if accelerate else None
            if weighted and accel is not None:
                second = accel
                accel = lambda direction: apply_sample_blocks(root, second(direction))  # noqa: E731
            outcome = trust_region(factor, *common, radius=state.radius,
                                   first=state.radius < 0, xnorm=xnorm, ftol=ftol_, xtol=xtol_,
                                   max_trials=max_trials, acceleration=accel)
        else:
            mean_diagonal = _mean_gram_diagonal(scaled_lin, columns_at_hand)
            lam0 = jnp.where(state.damping < 0, initial_damping * mean_diagonal, state.damping)
            # The Cholesky factorization of the damped Gram needs λ above round-off of the Gram;
            # CG and the rest only need λ > 0 for the multiplicative rule.
            unit = max(lin.shape) * 10.0 if method == "cholesky" else 1.0
            floor = unit * float(jnp.finfo(dtype).eps) * mean_diagonal
            solve_lambda = jnp.clip(lam0, floor, 1e16 * mean_diagonal)  # the first trial's
            options = dict(damping=lam0, growth=state.damping_growth, floor=floor,
                           cap=1e16 * mean_diagonal, xnorm=xnorm, ftol=ftol_, xtol=xtol_)
            if matrix_free:  # one Krylov solve per update; λ adapts between updates
                outcome = one_solve_levenberg_marquardt(
                    factor, *common, max_backtracks=MATRIX_FREE_BACKTRACKS, **options)
            else:
                outcome = levenberg_marquardt(factor, *common, max_trials=max_trials, **options)

        result = outcome.solve
        status = jnp.where(gtol_hit, RESULTS.gtol_reached, outcome.status).astype(jnp.int32)
        # D finite, its squares not (|D| ≳ 1e154 in float64): a named failure, not a stall.
        overflow = _squares_overflow(lin, column_sq if columns_at_hand else None, gradient,
                                     cost0)
        status = jnp.where(overflow, RESULTS.overflow, status).astype(jnp.int32)
        # A solve that met NaN or inf returned a zero δ: no step is taken, and none is claimed.
        ok = result.finite & ~gtol_hit & ~overflow
        step = jnp.where(ok, outcome.step, 0.0)
        taken = jnp.where(ok, outcome.taken, 0.0).astype(dtype)
        new_updates = lin.unravel(-step)
        new_updates = jax.tree_util.tree_map(lambda u, p: u.astype(p.dtype), new_updates, params)
        rank, sigma = _spectrum_report(lin, result, track_min_singular_value, rtol)
        fallback = result.fallback
        if spectral:
            fallback = factor.rank < min(lin.shape)
        damping_out = outcome.damping if adaptive else state.damping
        sketch = (state.sketch_basis, state.sketch_values, state.sketch_refresh,
                  state.sketch_effort)
        if matrix_free and adaptive and kept_sketch:
            sketch = _reuse_sketch(pre, sketched, result.num_steps, solve_lambda, state,
                                   min(lin.shape))
        new_state = OutputMetricDescentState(
            state.count + 1, damping_out.astype(dtype), outcome.growth.astype(dtype), taken,
            rank, fallback, cost0, _solver_code(method), sigma,
            result.finite & jnp.isfinite(cost0), status,
            scale.astype(state.scale.dtype) if scaled else jnp.ones_like(state.scale),
            outcome.radius.astype(dtype), result.delta.astype(state.direction.dtype),
            forcing.astype(dtype), forcing_norm.astype(dtype), result.converged,
            jnp.asarray(result.num_steps, jnp.int32), *sketch, gram_kept,
            (step / eta).astype(state.momentum.dtype) if spring else state.momentum,
        )
        return new_updates, new_state

    GRADIENT_FREE.add(update_fn)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_momentum(damped: DampedStep, previous, momentum, lin, residual) -> DampedStep:
    r"""SPRING's direction (Goldshtein, Mahoney & Tubman 2024, for mini-batches of a wide
    problem): $\varphi_k = \mu\varphi_{k-1} + \delta$, where δ is the damped step for the
    residual the last direction leaves, $(D^\top D + \lambda I)\delta =
    D^\top(r - \mu D\varphi_{k-1})$; i.e. $\varphi_k$ minimizes
    $\|D\varphi - r\|^2 + \lambda\|\varphi - \mu\varphi_{k-1}\|^2$. Each batch's solve
    keeps what earlier batches resolved instead of restarting from 0: on a consistent linear
    system with μ → 1 it is randomized block Kaczmarz's iteration towards the
    minimum-norm solution of the whole system, so the direction stops fitting one batch's
    noise. The linear model along $\varphi_k$ (`model_linear`, `model_quadratic`) is the
    current residual's. `damped` is δ's solve, `previous` is $S^{1/2}\varphi_{k-1}$, `lin` the
    (scaled) linearization, `residual` r."""
    direction = momentum * previous + damped.delta
    image = lin.matvec(direction)
    return DampedStep(direction, jnp.vdot(residual, image), jnp.vdot(image, image),
                      jnp.linalg.norm(direction), damped.solve)


def _keeps_gram(gram_average, num_params: int) -> bool:
    """Whether the state keeps a K×K averaged Gram: `gram_average` > 0 and K small enough for
    the spectral solve (`SPECTRAL_MAX_PARAMS`); otherwise the option has no effect. β sets the
    state's shape, so it is read at `init`: a traced β (`optax.inject_hyperparams` under a
    jitted `init`) keeps none; pass it in ``static_args`` there to average."""
    average = static_real(gram_average)
    return average is not None and average > 0 and num_params <= SPECTRAL_MAX_PARAMS


def _weighs_loss_hessian(loss_hessian, problem, lin) -> bool:
    """Whether this update weighs the output space by the loss's Hessian (`loss_hessian`): not
    for L² (Ĥ = I: nothing to weigh); under None (default) not where `weight_rows` cannot
    reweigh the linearization (a chunked Gram of the tall side without a dense D)."""
    if problem.loss == "l2" or loss_hessian is False:
        return False
    tall_gram_only = (lin.shape[0] > lin.shape[1] and lin.gram is not None
                      and lin.jacobian is None)
    return loss_hessian is True or not tall_gram_only


def _weighted(problem, params, lin, chunk_size):
    r"""(the linearization of $\hat D = RD$, R, R⁺) with $R_j^2 = \hat H_j$ the loss's output
    Hessian per sample (`output_hessian_roots`, `weight_rows`). The step then solves
    $(D^\top\hat HD + \lambda S)\delta = D^\top r$ (``loss_hessian`` of
    `output_metric_descent`)."""
    targets = problem.targets.astype(lin.outputs.dtype)
    root, pinv_root = output_hessian_roots(get_loss(problem.loss), lin.outputs, targets)
    wide = lin.shape[0] <= lin.shape[1]

    def rows():
        return gram_diagonal(problem, params, wide=wide, chunk_size=chunk_size, row_root=root)

    def columns():
        return gram_diagonal(problem, params, wide=False, chunk_size=chunk_size, row_root=root)

    return weight_rows(lin, root, diagonal=rows, column_diagonal=columns), root, pinv_root


def _fresh_data(extra_args) -> bool:
    """The ``fresh_data`` extra argument: True when this update's batch is newly drawn (`fit`
    with `batches=` passes it), so the step will be judged on other data than it was fitted
    to. A Python bool: it changes what is traced."""
    value = extra_args.get("fresh_data", False)
    if not isinstance(value, bool):
        raise TypeError(f"output_metric_descent.update: fresh_data must be True or False, got "
                        f"{value!r}")
    return value


def _second_derivative(problem, lin, dtype):
    r"""u ↦ $x''_u = \frac{d^2}{dt^2}x(\theta + tu)|_{t=0}$, flattened: the outputs' second
    directional derivative at the linearization point, a JVP of a JVP (the geodesic
    acceleration's right-hand side, `_search._accelerated`). None when the model has no
    forward-mode derivative (a `jax.custom_vjp` inside): the trust region then runs without
    the acceleration, as it would with `geodesic_acceleration=False`."""

    def outputs(flat):
        return problem.outputs(lin.unravel(flat))

    def second(direction):
        def tangent(flat):
            return jax.jvp(outputs, (flat,), (direction,))[1]
        return jax.jvp(tangent, (lin.flat_params,), (direction,))[1].reshape(-1).astype(dtype)

    try:  # traced once, abstractly, at compile time
        jax.eval_shape(second, lin.flat_params)
    except (TypeError, NotImplementedError):
        return None
    return second


def _squares_overflow(lin, column_sq, gradient, cost) -> Array:
    """True when D (and Dᵀr, and C) are finite but the Gram or D's squared column norms are
    not: the dtype's range, not the model, is at fault (`RESULTS.overflow`)."""
    squares = [jnp.all(jnp.isfinite(x)) for x in (column_sq, lin.gram) if x is not None]
    if not squares:
        return jnp.asarray(False)
    finite = jnp.isfinite(cost) & jnp.all(jnp.isfinite(gradient))
    if lin.jacobian is not None:
        finite = finite & jnp.all(jnp.isfinite(lin.jacobian))
    return finite & ~jnp.all(jnp.stack(squares))


class _KrylovFactor:
    """One matrix-free CG solve per λ (`normal_equations_cg`), warm-started and forced."""

    def __init__(self, lin, residual, initial, forcing, max_steps, column_diagonal,
                 preconditioner=None):
        self._args = (lin, residual)
        self._options = dict(initial=initial, forcing=forcing, max_steps=max_steps,
                             column_diagonal=column_diagonal, preconditioner=preconditioner)

    def step(self, lam):
        return normal_equations_cg(*self._args, lam, **self._options)


#: A kept sketch is renewed when a solve's effort (`_reuse_sketch`) exceeds `SKETCH_GROWTH`
#: times that of the first solve after it, and the solve took more than `SKETCH_MIN_FRACTION`·ℓ
#: iterations (a new sketch costs ℓ products: below that it cannot pay for itself soon).
SKETCH_GROWTH, SKETCH_MIN_FRACTION = 2.0, 0.5


def _kept_sketch(lin, state, dtype):
    """The Nyström preconditioner of the smaller side's Gram for this update (D̃D̃ᵀ on the wide
    side, D̃ᵀD̃ on the tall side): the one kept in the state, or, when it is marked for renewal
    (or there is none yet), a new sketch of ℓ Gram products (`prepare_preconditioner`).
    Returns it and whether it is new."""
    n = min(lin.shape)
    rank = min(state.sketch_values.shape[0], n)
    kept = Preconditioner(basis=state.sketch_basis[:n, :rank].astype(dtype),
                          eigenvalues=state.sketch_values[:rank].astype(dtype))
    fresh = state.sketch_refresh | ~(state.sketch_values[0] > 0)
    pre = jax.lax.cond(fresh, lambda: prepare_preconditioner(lin, "nystrom", rank),
                       lambda: kept)
    return pre, fresh


def _reuse_sketch(pre, sketched, steps, lam, state, num_rows):
    r"""(basis, values, refresh, effort) for the next update.

    The Gram of a network changes slowly, so one sketch serves many updates. With it, CG
    needs about $\sqrt{\kappa}$ iterations, $\kappa = 1 + \hat\mu_\ell/\lambda$ for a fresh
    sketch: the *effort* $e = \text{iterations}/\sqrt{1 + \hat\mu_\ell/\lambda}$ discounts the
    growth that falling λ causes (which a new sketch of the same ℓ cannot undo). The sketch is
    renewed at the next update when e exceeds `SKETCH_GROWTH` times the effort of the first solve
    after the sketch, and the solve took more than `SKETCH_MIN_FRACTION`·ℓ iterations: the
    eigenvectors it holds have drifted from the Gram's, and enough to be worth ℓ products."""
    dtype = state.sketch_values.dtype
    smallest = pre.eigenvalues[-1].astype(dtype)
    lam = jnp.asarray(lam, dtype)
    effort = steps / jnp.sqrt(1.0 + smallest / jnp.where(lam > 0, lam, 1.0))
    base = jnp.where(sketched, effort, state.sketch_effort)
    rank = pre.eigenvalues.shape[0]
    refresh = ~sketched & (effort > SKETCH_GROWTH * base) & (steps > SKETCH_MIN_FRACTION * rank)
    basis = state.sketch_basis.at[:num_rows, :rank].set(
        pre.basis.astype(state.sketch_basis.dtype))
    values = state.sketch_values.at[:rank].set(pre.eigenvalues.astype(dtype))
    return basis, values, refresh, base.astype(dtype)


class _OutputKrylovFactor:
    """One matrix-free CG solve per λ on the output side (`output_space_cg`), preconditioned."""

    def __init__(self, lin, residual, forcing, max_steps, preconditioner):
        self._args = (lin, residual)
        self._options = dict(forcing=forcing, max_steps=max_steps, preconditioner=preconditioner)

    def step(self, lam):
        return output_space_cg(*self._args, lam, **self._options)


def _check_schedule_value(value) -> None:
    if isinstance(value, (bool, np.bool_)) or not (isinstance(value, (int, float))
                                                   or hasattr(value, "dtype")):
        raise TypeError(f"output_metric_descent: the learning_rate schedule returned "
                        f"{value!r}; it must return a number in (0, 1]")
    check_scalar("the learning_rate schedule's value", value)
    number = static_real(value)
    if number is not None and not 0 < number <= 1:
        raise ValueError(f"output_metric_descent: the learning_rate schedule returned {value}; "
                         "it must return a number in (0, 1]")


def _rtol(rtol, shape, dtype):
    return default_rtol(*shape, dtype) if rtol is None else rtol


def _mean_gram_diagonal(lin, columns_at_hand: bool):
    """The mean diagonal of the Gram of the smaller side, ‖D‖_F²/min(QN, K): λ's unit. Exact
    where D, the Gram or the column norms are at hand; else a Hutchinson estimate (one VJP),
    not a pass of per-sample Jacobians (0.5–0.9 s an update on digits cross-entropy, most of
    an update's fixed cost)."""
    dtype = lin.flat_params.dtype
    size = min(lin.shape)
    if lin.gram is not None:
        total = jnp.trace(lin.gram)
    elif lin.jacobian is not None:
        total = jnp.sum(lin.jacobian**2)
    elif columns_at_hand and lin.column_diagonal is not None and lin.shape[0] > lin.shape[1]:
        total = jnp.sum(lin.column_diagonal())
    else:  # matrix-free: Hutchinson estimate of ‖D‖_F² from one Rademacher probe
        probe = jax.random.rademacher(jax.random.PRNGKey(0), (lin.shape[0],), dtype)
        total = jnp.sum(lin.rmatvec(probe) ** 2)
    return jnp.maximum(total / size, jnp.finfo(dtype).tiny).astype(dtype)


def _check_tolerances(**tolerances) -> None:
    for name, value in tolerances.items():
        if value is None or hasattr(value, "dtype"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1) or None, got {value!r}")
