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

from ._gram import GRAM_METHODS
from ._problem import Problem, check_chunk_size, check_params, static_real
from ._solve import (
    PRECONDITIONERS,
    SOLVERS,
    SolveResult,
    check_solver_name,
    linearize,
    plan_solve,
    prepare_preconditioner,
    smallest_singular_value,
    solve,
)


#: Update functions that ignore their `grads` argument; `fit` skips the backward pass for them.
GRADIENT_FREE: "weakref.WeakSet" = weakref.WeakSet()


def _require_problem(name: str, extra_args: dict) -> Problem:
    problem = extra_args.get("problem")
    if problem is None:
        raise ValueError(
            f"{name}.update needs the current batch as an extra argument: "
            "opt.update(grads, state, params, problem=problem)"
        )
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an outmetric.Problem, got {type(problem).__name__}")
    return problem


def _check_nonnegative(name: str, value) -> None:
    # Numbers may arrive as arrays (optax.inject_hyperparams injects every numeric argument).
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "dtype")):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    number = static_real(value)
    if number is not None and not 0 <= number < float("inf"):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")


def _check_solve_options(rtol, cg_tol, cg_max_steps) -> None:
    """Static checks of the options passed through to the solve; arrays pass unchecked."""
    for name, value, upper in (("rtol", rtol, 1.0), ("cg_tol", cg_tol, float("inf"))):
        if value is None or hasattr(value, "dtype"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < upper:
            raise ValueError(f"{name} must be a number in (0, {upper:g}) or None, got {value!r}")
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
      decides from the sizes and free memory (`outmetric.plan_solve`) and `state.solver` says
      what it picked.
    - `rtol`, `cg_tol`, `cg_max_steps`: passed to the solve (the last two to CG and LSMR).
    - `chunk_size`: compute per-sample Jacobians (and the Cholesky Gram, without holding D)
      this many samples at a time.
    - `gram`: where the Cholesky Gram comes from: `"auto"` (the dense-layer structure when the
      model has dense layers and the wide side is solved), `"structured"` or `"jacobian"`.
    - `preconditioner`, `preconditioner_rank`: for CG: None, `"jacobi"` or `"nystrom"`.
    - `memory_budget`: bytes that `"auto"` may plan for (default: half the free memory).
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
        lin, method = _linearize(problem, params, damping, solver, chunk_size, gram,
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


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _spectrum_report(lin, result: SolveResult, track: bool, rtol) -> tuple[Array, Array]:
    """(rank, σ_min(D)) for the state: the solve's rank and -1 untracked, else both from the
    Gram's eigenvalues (where there is a Gram; the solve's rank otherwise)."""
    dtype = lin.flat_params.dtype
    if not track:
        return result.rank, jnp.asarray(-1.0, dtype)
    sigma, rank = smallest_singular_value(lin, rtol)
    return jnp.where(rank >= 0, rank, result.rank), sigma


def _linearize(problem, params, damping, solver, chunk_size=None, gram="auto",
               memory_budget=None):
    plan = plan_solve(problem, params, solver=solver, damping=damping, chunk_size=chunk_size,
                      gram=gram, memory_budget=memory_budget)
    lin = linearize(problem, params, method=plan.method, chunk_size=plan.chunk_size,
                    gram=plan.gram)
    return lin, plan.method


class OutputMetricDescentState(NamedTuple):
    """State of `output_metric_descent`, all arrays (checkpointable with any pytree tool).

    - `count`: steps taken.
    - `damping`: λ used by the last accepted step (adaptive: the next try starts from it).
    - `damping_growth`: the Levenberg–Marquardt growth factor ν for the next rejection.
    - `step_size`: the fraction of the step finally taken (0 when no decrease was found).
    - `rank`, `fallback`: what the last solve reported (`rank` from the Gram eigenvalues with
      `track_min_singular_value=True`; the Cholesky estimate, blind to damped directions,
      otherwise).
    - `cost`: C before the last step.
    - `solver`: the method of the last step, an index into `outmetric.SOLVERS`
      (``om.SOLVERS[int(state.solver)]``; -1 before the first step): what `"auto"` picked.
    - `min_singular_value`: σ_min(D) before the last step with `track_min_singular_value=True`
      (-1 when not estimated).
    - `finite`: False when the last solve met NaN or inf in D or the residual; no step was
      taken then, and `fit` stops with a `NonFiniteError`.
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


def output_metric_descent(
    learning_rate: float | optax.Schedule = 1.0,
    *,
    damping: float | str = "adaptive",
    initial_damping: float = 1e-3,
    solver: str = "auto",
    linesearch: str | None = "backtracking",
    max_linesearch_steps: int = 30,
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
    r"""Output-metric descent: the discretised adapted flow with safeguards.

    $$\theta_{k+1} = \theta_k - \eta_k\,\alpha_k\,D^\top(DD^\top + \lambda_k I)^{-1}(x - y)$$

    (for a general loss, $N\nabla_x C$ replaces $x - y$), computed on the smaller side of the
    solve. $\eta_k$ is the learning rate (or schedule) and:

    - `damping="adaptive"` (default): Levenberg–Marquardt. λ starts at `initial_damping` times
      the mean diagonal of the Gram matrix and follows the gain ratio
      $\rho = (C(\theta) - C(\theta + s)) / (\langle\nabla_xC, -Ds\rangle - \|Ds\|^2/2N)$ of the
      trial step $s$: accept when $\rho > 10^{-4}$ and decrease λ by
      $\max(1/3, 1 - (2\rho - 1)^3)$, otherwise multiply λ by ν and double ν (Nielsen's rule),
      re-solving with the same Jacobian. Here $\alpha_k = 1$ or 0.
    - `damping=λ` (a number ≥ 0): fixed damping; with `linesearch="backtracking"` the step
      fraction $\alpha_k$ is the largest of 1, 1/2, 1/4, … that decreases C.
    - `linesearch=None` with fixed damping: the plain Euler step ($\alpha_k = 1$).

    With adaptive damping or backtracking the cost never increases: a step that finds no
    decrease is not taken (`state.step_size == 0`). For a model linear in θ with λ = 0 and no
    line search the residual shrinks by exactly $(1 - \eta)$ per step.

    **Arguments:**

    - `learning_rate`: η in (0, 1], or an optax schedule of the step count.
    - `damping`: `"adaptive"` or a fixed λ ≥ 0.
    - `initial_damping`: the adaptive λ's start, relative to the mean Gram diagonal.
    - `solver`: as in `scale_by_output_metric`; `"auto"` picks Cholesky of the damped Gram.
    - `linesearch`: `"backtracking"` or None (ignored under adaptive damping, which already
      accepts or rejects each step).
    - `max_linesearch_steps`: trials per update (halvings, or λ increases).
    - `rtol`, `cg_tol`, `cg_max_steps`, `chunk_size`, `gram`, `preconditioner`,
      `preconditioner_rank`, `memory_budget`: as in `scale_by_output_metric`. The Gram (or
      the preconditioner) is formed once per update and reused by every λ tried.
    - `track_min_singular_value`: record σ_min(D) in `state.min_singular_value` each step (as
      in `scale_by_output_metric`); `fit` collects it into `FitResult.min_singular_values`.

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
    if linesearch not in ("backtracking", None):
        raise ValueError(f"linesearch must be 'backtracking' or None, got {linesearch!r}")
    # Numbers may arrive as arrays (optax.inject_hyperparams injects every numeric argument).
    tries = static_real(max_linesearch_steps)
    if (tries is None and not hasattr(max_linesearch_steps, "dtype")) or (
        tries is not None and not (tries.is_integer() and tries >= 1)
    ):
        raise ValueError(f"max_linesearch_steps must be a positive integer, got {max_linesearch_steps!r}")
    _check_nonnegative("initial_damping", initial_damping)
    _check_flag("track_min_singular_value", track_min_singular_value)
    _check_solve_options(rtol, cg_tol, cg_max_steps)
    _check_scale_options(solver, chunk_size, gram, preconditioner, preconditioner_rank,
                         memory_budget)
    solve_damping = 1.0 if adaptive else damping  # any non-zero traced λ picks the Cholesky path

    def init_fn(params):
        check_params(params)
        dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
        lam = jnp.asarray(-1.0 if adaptive else damping, dtype)  # -1: set at the first step
        return OutputMetricDescentState(
            jnp.asarray(0, jnp.int32), lam, jnp.asarray(2.0, dtype), jnp.asarray(0.0, dtype),
            jnp.asarray(-1, jnp.int32), jnp.asarray(False), jnp.asarray(jnp.inf, dtype),
            jnp.asarray(-1, jnp.int32), jnp.asarray(-1.0, dtype), jnp.asarray(True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del updates
        if params is None:
            raise ValueError("output_metric_descent.update needs params")
        problem = _require_problem("output_metric_descent", extra_args)
        lin, method = _linearize(problem, params, solve_damping, solver, chunk_size, gram,
                                 memory_budget)
        pre = prepare_preconditioner(lin, preconditioner, preconditioner_rank) if (
            method == "cg") else None
        dtype = lin.flat_params.dtype
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        eta = jnp.asarray(eta, dtype)
        if not isinstance(learning_rate, (int, float)):  # a schedule or an injected array
            eta = eqx.error_if(eta, ~((eta >= 0) & (eta <= 1)),
                               "output_metric_descent: the learning_rate (schedule) gave a value "
                               "outside [0, 1]")
        # In the parameters' dtype: float32 params on float64 data compute in float64 but keep a
        # float32 state.
        residual = _residual_vector(problem, lin.outputs).astype(dtype)
        grad_x = residual / problem.num_samples
        cost0 = problem.cost_from_outputs(lin.outputs).astype(dtype)

        def solve_with(lam):
            return solve(lin, residual, damping=lam, solver=method, rtol=rtol, cg_tol=cg_tol,
                         cg_max_steps=cg_max_steps, preconditioner=pre)

        def trial_cost(step):
            return problem.cost(lin.unravel(lin.flat_params - step)).astype(dtype)

        if adaptive:
            step, lam, nu, taken, result = _levenberg_marquardt(
                lin, solve_with, trial_cost, state, eta, grad_x, cost0, problem.num_samples,
                initial_damping, max_linesearch_steps,
            )
        else:
            result = solve_with(jnp.asarray(damping, dtype))
            lam, nu = state.damping, state.damping_growth
            if linesearch == "backtracking":
                step, taken = _backtrack(eta * result.delta, trial_cost, cost0,
                                         max_linesearch_steps)
            else:
                step, taken = eta * result.delta, jnp.asarray(1.0, dtype)
        # A solve that met NaN or inf returned a zero δ: no step is taken, and none is claimed.
        step = jnp.where(result.finite, step, 0.0)
        taken = jnp.where(result.finite, taken, 0.0).astype(dtype)
        new_updates = lin.unravel(-step)
        new_updates = jax.tree_util.tree_map(lambda u, p: u.astype(p.dtype), new_updates, params)
        rank, sigma = _spectrum_report(lin, result, track_min_singular_value, rtol)
        new_state = OutputMetricDescentState(
            state.count + 1, lam, nu, taken, rank, result.fallback, cost0, _solver_code(method),
            sigma, result.finite & jnp.isfinite(cost0),
        )
        return new_updates, new_state

    GRADIENT_FREE.add(update_fn)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _backtrack(step, trial_cost, cost0, max_steps):
    """Largest α in {1, 1/2, …} with C(θ − α·step) < C(θ); α = 0 if none within `max_steps`."""

    def cond(carry):
        i, alpha, done = carry
        return (i < max_steps) & ~done

    def body(carry):
        i, alpha, _ = carry
        value = trial_cost(alpha * step)
        ok = jnp.isfinite(value) & (value < cost0)
        return i + 1, jnp.where(ok, alpha, 0.5 * alpha), ok

    one = jnp.asarray(1.0, step.dtype)
    _, alpha, found = jax.lax.while_loop(cond, body, (0, one, jnp.asarray(False)))
    alpha = jnp.where(found, alpha, 0.0)
    # Not α·step: a non-finite step (from a non-finite Jacobian) times α = 0 would be NaN.
    return jnp.where(found, alpha * step, jnp.zeros_like(step)), alpha


def _levenberg_marquardt(lin, solve_with, trial_cost, state, eta, grad_x, cost0, num_samples,
                         initial_damping, max_tries):
    """Adapt λ by the gain ratio, re-solving with the same linearization until C decreases."""
    dtype = lin.flat_params.dtype
    num_rows, num_params = lin.shape
    if lin.gram is not None:
        scale = jnp.trace(lin.gram) / num_rows
    elif lin.jacobian is not None:
        scale = jnp.sum(lin.jacobian**2) / num_rows
    else:  # matrix-free: Hutchinson estimate of ‖D‖_F² from one Rademacher probe
        probe = jax.random.rademacher(jax.random.PRNGKey(0), (num_rows,), dtype)
        scale = jnp.sum(lin.rmatvec(probe) ** 2) / num_rows
    scale = jnp.maximum(scale, jnp.finfo(dtype).tiny).astype(dtype)
    # Below this floor the damped Gram's Cholesky pivots lose all accuracy (and would send the
    # solve to its SVD fallback); above the cap the step underflows.
    floor = 10.0 * max(num_rows, num_params) * float(jnp.finfo(dtype).eps) * scale
    cap = 1e16 * scale
    lam0 = jnp.where(state.damping < 0, initial_damping * scale, state.damping)
    lam0 = jnp.clip(lam0, floor, cap)
    zero_step = jnp.zeros_like(lin.flat_params)
    no_result = SolveResult(zero_step, jnp.asarray(-1, jnp.int32), jnp.asarray(False),
                            jnp.asarray(True))

    def cond(carry):
        i, lam, nu, accepted, step, result = carry
        return (i < max_tries) & ~accepted

    def body(carry):
        i, lam, nu, _, _, _ = carry
        result = solve_with(lam)
        step = eta * result.delta
        d_step = lin.matvec(step)
        predicted = jnp.vdot(grad_x.reshape(-1), d_step) - jnp.vdot(d_step, d_step) / (
            2 * num_samples)
        value = trial_cost(step)
        actual = cost0 - value
        gain = jnp.where(predicted > 0, actual / jnp.where(predicted > 0, predicted, 1.0), -1.0)
        accepted = jnp.isfinite(value) & (actual > 0) & (gain > 1e-4)
        shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
        new_lam = jnp.where(accepted, lam * shrink, lam * nu)
        new_nu = jnp.where(accepted, 2.0, 2.0 * nu)
        lam_out = jnp.clip(new_lam, floor, cap)
        return (i + 1, lam_out.astype(dtype), new_nu.astype(dtype), accepted,
                jnp.where(accepted, step, zero_step).astype(dtype), result)

    init = (0, lam0, state.damping_growth, jnp.asarray(False), zero_step, no_result)
    _, lam, nu, accepted, step, result = jax.lax.while_loop(cond, body, init)
    # No decrease within the budget (at the round-off floor, or at a stationary point): keep the
    # λ this update started from rather than leave it at the escalated value.
    lam = jnp.where(accepted, lam, lam0)
    nu = jnp.where(accepted, nu, 2.0)
    return step, lam, nu, accepted.astype(dtype), result
