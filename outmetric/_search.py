r"""Searches along the damped family: accept, reject, adapt λ (or the trust radius), and stop.

The descent is $\delta(\lambda) = S^{-1/2}\tilde\delta(\lambda)$ from a factorization in
`outmetric._solve` (`SpectralFactor`, `DirectFactor`, or one matrix-free CG solve); a search
decides which member, if any, becomes the step, as optimistix splits a solver into a descent and
a search. Each trial is judged by the gain ratio

$$\rho = \frac{C(\theta) - C(\theta - \eta\delta)}{\mathrm{pred}},\qquad
\mathrm{pred} = \frac{2\eta\langle r, D\delta\rangle - \eta^2\|D\delta\|^2}{2N}$$

(the Gauss–Newton model of C; $r = N\nabla_xC$, $= x - y$ for L²), and MINPACK's termination
tests run on every trial (DESIGN §6): **ftol** — actual and predicted relative reductions both
≤ ftol and ρ ≤ 2; **xtol** — the scaled step (or the trust radius) ≤ xtol·‖S^{1/2}θ‖; **gtol**
(`gradient_test`) — the largest cosine between r and a column of D ≤ gtol. A search that finds
no decrease within its trials, the tests silent, reports `stalled`. Round-off never counts as
progress: a trial whose reductions are both below ftol ends the run instead of being taken as a
step of a continuing one.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._results import RESULTS
from ._solve import DampedStep, SolveResult

#: A trial is accepted when ρ exceeds this (MINPACK's 1e-4).
ACCEPT_RATIO = 1e-4

#: The geodesic acceleration is tried when 2η‖ã‖ ≤ this·‖δ̃‖ (Transtrum & Sethna's test; they
#: suggest 0.75, which sends NIST's MGH17 from its first start to another minimum).
ACCELERATION_RATIO = 0.25

#: The trust radius doubles after a trial with ρ at least this (MINPACK's 0.75).
EXPAND_RATIO = 0.75


class Trial(NamedTuple):
    """What one member of the damped family did: its relative actual and predicted reductions,
    gain ratio, scaled length, the step in θ coordinates, and its solve."""

    step: Float[Array, " K"]
    actual: Float[Array, ""]
    predicted: Float[Array, ""]
    directional: Float[Array, ""]
    ratio: Float[Array, ""]
    length: Float[Array, ""]
    blew_up: Array
    solve: SolveResult


class Outcome(NamedTuple):
    """A search's result: the step to subtract from θ (zero if none), the fraction of the
    proposed step taken (0 or 1; α for backtracking), the damping, Nielsen growth and trust
    radius to carry to the next update, the status, and the last solve."""

    step: Float[Array, " K"]
    taken: Float[Array, ""]
    damping: Float[Array, ""]
    growth: Float[Array, ""]
    radius: Float[Array, ""]
    status: Int[Array, ""]
    solve: SolveResult


def evaluate(damped: DampedStep, inv_sqrt_scale, eta, cost0, trial_cost: Callable,
             num_samples: int, correction=None) -> Trial:
    """Try the step η·δ(λ) (η·(δ(λ) + `correction`) when given, in scaled coordinates): its cost
    and its reductions relative to C(θ) (MINPACK's actred, prered, dirder; the predictions are
    those of the linear model along δ(λ))."""
    dtype = damped.delta.dtype
    direction = damped.delta if correction is None else damped.delta + correction
    step = (eta * inv_sqrt_scale * direction).astype(dtype)
    value = trial_cost(step)
    scale = 2.0 * num_samples * cost0
    safe = jnp.where(scale > 0, scale, 1.0)
    blew_up = ~jnp.isfinite(value) | (value >= 100.0 * cost0)
    actual = jnp.where(blew_up, -1.0, (cost0 - value) / jnp.where(cost0 > 0, cost0, 1.0))
    predicted = (2.0 * eta * damped.model_linear - eta**2 * damped.model_quadratic) / safe
    directional = -eta * damped.model_linear / safe
    ratio = jnp.where(predicted > 0, actual / jnp.where(predicted > 0, predicted, 1.0), 0.0)
    return Trial(step, actual.astype(dtype), predicted.astype(dtype), directional.astype(dtype),
                 ratio.astype(dtype), (eta * damped.norm).astype(dtype), blew_up, damped.solve)


def _accepted(trial: Trial) -> Array:
    return trial.solve.finite & ~trial.blew_up & (trial.actual > 0) & (trial.ratio >= ACCEPT_RATIO)


def _ftol(trial: Trial, ftol) -> Array:
    return ((jnp.abs(trial.actual) <= ftol) & (trial.predicted <= ftol)
            & (0.5 * trial.ratio <= 1.0) & trial.solve.finite)


def _status(ftol_hit, xtol_hit) -> Array:
    return jnp.where(ftol_hit, RESULTS.ftol_reached,
                     jnp.where(xtol_hit, RESULTS.xtol_reached, RESULTS.running)).astype(jnp.int32)


def gradient_test(gradient, column_norms, residual_norm, gtol) -> Array:
    r"""MINPACK's gtol: $\max_j |(D^\top r)_j| / (\|D_{:j}\|\,\|r\|) \le$ gtol over the
    non-zero columns (a zero residual passes: it is the minimum)."""
    safe = jnp.where(column_norms > 0, column_norms, 1.0)
    cosines = jnp.where(column_norms > 0, jnp.abs(gradient) / safe, 0.0)
    largest = jnp.max(cosines) / jnp.where(residual_norm > 0, residual_norm, 1.0)
    return largest <= gtol


def trust_region(factor, inv_sqrt_scale, eta, cost0, trial_cost, num_samples, *, radius,
                 first: Array, xnorm, ftol, xtol, max_trials: int,
                 initial_factor: float = 1.0, acceleration=None) -> Outcome:
    r"""MINPACK's `lmder` trust-region iteration on a `SpectralFactor` (every λ is cheap), with
    an optional geodesic acceleration of each trial (`_accelerated`).

    λ solves $\|\tilde\delta(\lambda)\| \approx \Delta$ (`damping_for_radius`; λ = 0, the
    Gauss–Newton step, when that lies inside). The first radius is `initial_factor`·‖S^{1/2}θ‖ (MINPACK: 100),
    cut to the first step's length. After each trial: ρ ≤ 1/4 shrinks Δ to
    $t\min(\Delta, 10\|p\|)$ with t = 1/2, or MINPACK's interpolated $\tfrac12 d/(d + \tfrac12
    a)$ when C rose, never below 1/10; ρ ≥ 3/4 (or λ = 0) sets Δ = 2‖p‖. The trial is taken
    when ρ ≥ 1e-4; rejected trials repeat with the smaller Δ, at most `max_trials` times.
    `acceleration` (u ↦ the outputs' second directional derivative along u, flattened), when
    given, makes each trial the better of the step and its accelerated version; ρ, ‖p‖ and the
    tests stay those of δ(λ).
    """
    dtype = inv_sqrt_scale.dtype
    start = jnp.where(xnorm > 0, initial_factor * xnorm, initial_factor)
    radius = jnp.where(first | ~(radius > 0), start, radius).astype(dtype)

    def try_one(i, carry):
        radius, _ = carry
        lam = factor.damping_for_radius(radius)
        damped = factor.step(lam)
        if acceleration is None:
            trial = evaluate(damped, inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
        else:
            trial = _accelerated(factor, lam, damped, acceleration, inv_sqrt_scale, eta, cost0,
                                 trial_cost, num_samples)
        radius = jnp.where(first & (i == 0), jnp.minimum(radius, trial.length), radius)
        shrink = jnp.where(trial.actual >= 0, 0.5,
                           0.5 * trial.directional / (trial.directional + 0.5 * trial.actual))
        shrink = jnp.where(trial.blew_up | ~(shrink >= 0.1), 0.1, shrink)
        radius = jnp.where(
            trial.ratio <= 0.25, shrink * jnp.minimum(radius, trial.length / 0.1),
            jnp.where((lam == 0) | (trial.ratio >= EXPAND_RATIO), trial.length / 0.5, radius))
        status = _status(_ftol(trial, ftol), radius <= xtol * xnorm)
        return (radius.astype(dtype), lam.astype(dtype)), trial, status

    (radius, lam), accepted, status, step, solve = _trials(
        try_one, (radius, jnp.asarray(0.0, dtype)), max_trials, inv_sqrt_scale)
    status = jnp.where(~accepted & (status == RESULTS.running), RESULTS.stalled, status)
    return Outcome(step, accepted.astype(dtype), lam, jnp.asarray(2.0, dtype), radius,
                   status.astype(jnp.int32), solve)


def _accelerated(factor, lam, damped: DampedStep, acceleration: Callable, inv_sqrt_scale, eta,
                 cost0, trial_cost, num_samples) -> Trial:
    r"""The trial at λ with geodesic acceleration (Transtrum & Sethna, arXiv:1201.5885), the
    better of the plain step and the accelerated one.

    Along $\theta(t) = \theta - t\,u$, $u = S^{-1/2}\tilde\delta(\lambda)$, the outputs are
    $x - tDu + \tfrac12 t^2 x''_u$ with $x''_u = \frac{d^2}{dt^2}x(\theta + tu)|_0$ (a JVP of a
    JVP: a few forward passes, no Jacobian). The linear model assumes the last term away; the
    acceleration $\tilde a = (\tilde D^\top\tilde D + \lambda I)^+\tilde D^\top x''_u$ (the same
    factorization, `SpectralFactor.solve_for`) cancels it to second order: the step
    $$\eta\,S^{-1/2}\big(\tilde\delta + \tfrac12\eta\,\tilde a\big)$$
    moves the outputs by $-\eta Du$, as the model predicted, up to the part of $x''_u$ outside
    the range of $\tilde D$ (and λ's damping of the rest) and $O(\eta^3)$; so on curved valleys
    (PINNs) ρ comes near 1 on many updates and the radius grows, where the plain step's ρ
    between ¼ and ¾ only ever holds or halves it. It is tried when $2\eta\|\tilde a\| \le$ `ACCELERATION_RATIO`$\cdot\|\tilde\delta\|$
    (the expansion is trusted only while the correction is small) and taken when its cost is
    lower than the plain step's (one more cost evaluation per trial). ρ is against the
    prediction for δ(λ), which the acceleration is there to realise.
    """
    plain = evaluate(damped, inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
    accel = factor.solve_for(lam, acceleration(inv_sqrt_scale * damped.delta))
    usable = ((2.0 * eta * jnp.linalg.norm(accel) <= ACCELERATION_RATIO * damped.norm)
              & jnp.all(jnp.isfinite(accel)))
    correction = jnp.where(usable, 0.5 * eta * accel, 0.0)
    fast = evaluate(damped, inv_sqrt_scale, eta, cost0, trial_cost, num_samples, correction)
    pick = usable & (fast.actual > plain.actual)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pick, a, b), fast, plain)


def _trials(try_one: Callable, carry, max_trials: int, like):
    """Trials `try_one(i, carry) -> (carry, trial, status)` until one is accepted (ρ ≥ 1e-4 and
    C decreased), a termination test fires, or `max_trials` ran. Returns (carry, accepted,
    status, the accepted step or zero, the last solve)."""
    zero = jnp.zeros_like(like)
    empty = SolveResult(zero, jnp.asarray(-1, jnp.int32), jnp.asarray(False), jnp.asarray(True))

    def cond(loop):
        i, _, accepted, status, _, _ = loop
        return (i < max_trials) & ~accepted & (status == RESULTS.running)

    def body(loop):
        i, carry, _, _, _, _ = loop
        carry, trial, status = try_one(i, carry)
        accepted = _accepted(trial)
        return (i + 1, carry, accepted, status, jnp.where(accepted, trial.step, zero),
                trial.solve)

    init = (0, carry, jnp.asarray(False), jnp.asarray(RESULTS.running, jnp.int32), zero, empty)
    _, carry, accepted, status, step, solve = jax.lax.while_loop(cond, body, init)
    return carry, accepted, status, step, solve


def levenberg_marquardt(factor, inv_sqrt_scale, eta, cost0, trial_cost, num_samples, *,
                        damping, growth, floor, cap, xnorm, ftol, xtol,
                        max_trials: int) -> Outcome:
    r"""Levenberg–Marquardt with Nielsen's damping rule, for factorizations that pay per λ
    (`DirectFactor`: a Cholesky of the damped Gram each).

    Accept when ρ ≥ 1e-4 and shrink λ by $\max(1/3, 1 - (2\rho - 1)^3)$; otherwise multiply λ
    by ν and double ν. λ stays in [`floor`, `cap`]: the floor is what the Cholesky factorization
    of the damped Gram needs (its pivots lose all accuracy below n·ε times the Gram's scale),
    not a limit on progress, which the scaled damping keeps out of the way.
    """
    dtype = inv_sqrt_scale.dtype

    def try_one(i, carry):
        lam, nu = carry
        trial = evaluate(factor.step(lam), inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
        new_lam, new_nu = _nielsen(trial, lam, nu, floor, cap)
        status = _status(_ftol(trial, ftol), trial.length <= xtol * xnorm)
        return (new_lam.astype(dtype), new_nu.astype(dtype)), trial, status

    lam0 = jnp.clip(damping, floor, cap).astype(dtype)
    (lam, nu), accepted, status, step, solve = _trials(
        try_one, (lam0, jnp.asarray(growth, dtype)), max_trials, inv_sqrt_scale)
    # No decrease within the budget: restart from the λ this update began with.
    lam = jnp.where(accepted, lam, lam0)
    nu = jnp.where(accepted, nu, 2.0)
    status = jnp.where(~accepted & (status == RESULTS.running), RESULTS.stalled, status)
    return Outcome(step, accepted.astype(dtype), lam, nu.astype(dtype),
                   jnp.asarray(-1.0, dtype), status.astype(jnp.int32), solve)


def _nielsen(trial: Trial, lam, nu, floor, cap):
    """Nielsen's update of (λ, ν) after a trial: shrink λ by max(1/3, 1 − (2ρ − 1)³) and reset
    ν = 2 when accepted, else λ ← ν·λ and ν ← 2ν; λ kept in [floor, cap]."""
    accepted = _accepted(trial)
    shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * trial.ratio - 1.0) ** 3)
    new_lam = jnp.clip(jnp.where(accepted, lam * shrink, lam * nu), floor, cap)
    return new_lam, jnp.where(accepted, 2.0, 2.0 * nu)


def one_solve_levenberg_marquardt(factor, inv_sqrt_scale, eta, cost0, trial_cost, num_samples,
                                  *, damping, growth, floor, cap, xnorm, ftol, xtol,
                                  max_backtracks: int) -> Outcome:
    r"""One solve per update, λ adapted between updates, as Hessian-free optimisation does: the
    matrix-free path, where every λ costs a Krylov solve.

    The step δ(λ) is solved once at the carried λ. If it is accepted (ρ ≥ 1e-4) it is taken and
    λ shrinks by Nielsen's factor; if not, λ ← ν·λ, ν ← 2ν for the next update, and the same
    direction is backtracked, α ∈ {1/2, 1/4, …} (at most `max_backtracks` cost evaluations, no
    solve), taking the first α·δ that lowers C. Neither is a stall: the next update solves at
    the larger λ. MINPACK's ftol and xtol tests run on the full step's trial.
    """
    dtype = inv_sqrt_scale.dtype
    lam = jnp.clip(damping, floor, cap).astype(dtype)
    trial = evaluate(factor.step(lam), inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
    accepted = _accepted(trial)
    new_lam, new_nu = _nielsen(trial, lam, jnp.asarray(growth, dtype), floor, cap)
    status = _status(_ftol(trial, ftol), trial.length <= xtol * xnorm)
    one = jnp.asarray(1.0, dtype)

    def cond(carry):
        i, _, found = carry
        return (i < max_backtracks) & ~found

    def body(carry):
        i, alpha, _ = carry
        alpha = 0.5 * alpha
        value = trial_cost(alpha * trial.step)
        return i + 1, alpha, jnp.isfinite(value) & (value < cost0)

    search = trial.solve.finite & ~accepted & (status == RESULTS.running)
    _, alpha, found = jax.lax.cond(
        search, lambda: jax.lax.while_loop(cond, body, (0, one, jnp.asarray(False))),
        lambda: (0, one, accepted))
    found = found & trial.solve.finite
    # Not α·step: a non-finite step times α = 0 would be NaN.
    step = jnp.where(found, alpha * trial.step, jnp.zeros_like(trial.step))
    taken = jnp.where(found, alpha, 0.0)
    return Outcome(step, taken.astype(dtype), new_lam.astype(dtype), new_nu.astype(dtype),
                   jnp.asarray(-1.0, dtype), status.astype(jnp.int32), trial.solve)


def backtracking(damped: DampedStep, inv_sqrt_scale, eta, cost0, trial_cost, num_samples, *,
                 xnorm, ftol, xtol, max_trials: int, enabled: bool = True) -> Outcome:
    r"""A fixed-λ step with backtracking: the largest α in {1, 1/2, 1/4, …} with
    $C(\theta - \alpha\eta\delta) < C(\theta)$ (α = 0 if none within `max_trials`); with
    `enabled=False` the plain step (α = 1), which runs no stopping test (it is the Euler
    discretisation of the flow: `eps` and `max_steps` end it). The tests run on the full step's
    trial."""
    dtype = inv_sqrt_scale.dtype
    trial = evaluate(damped, inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
    status = _status(_ftol(trial, ftol), trial.length <= xtol * xnorm)
    full = trial.step
    one = jnp.asarray(1.0, dtype)
    if not enabled:  # the plain Euler step: no safeguard, and no stopping test either
        alpha = jnp.where(trial.solve.finite, one, 0.0)
        return Outcome(jnp.where(trial.solve.finite, full, 0.0), alpha, jnp.asarray(-1.0, dtype),
                       jnp.asarray(2.0, dtype), jnp.asarray(-1.0, dtype),
                       jnp.asarray(RESULTS.running, jnp.int32), trial.solve)

    def cond(carry):
        i, _, done = carry
        return (i < max_trials) & ~done

    def body(carry):
        i, alpha, _ = carry
        value = trial_cost(alpha * full)
        ok = jnp.isfinite(value) & (value < cost0)
        return i + 1, jnp.where(ok, alpha, 0.5 * alpha), ok

    first_ok = trial.solve.finite & ~trial.blew_up & (trial.actual > 0)
    _, alpha, found = jax.lax.cond(
        first_ok, lambda: (1, one, jnp.asarray(True)),
        lambda: jax.lax.while_loop(cond, body, (1, 0.5 * one, jnp.asarray(False))))
    found = found & trial.solve.finite
    alpha = jnp.where(found, alpha, 0.0)
    status = jnp.where(~found & (status == RESULTS.running), RESULTS.stalled, status)
    # Not α·step: a non-finite step times α = 0 would be NaN.
    step = jnp.where(found, alpha * full, jnp.zeros_like(full))
    return Outcome(step, alpha, jnp.asarray(-1.0, dtype), jnp.asarray(2.0, dtype),
                   jnp.asarray(-1.0, dtype), status.astype(jnp.int32), trial.solve)


#: The step fractions `grid_search` tries: 1, 1/2, …, 2^-30 (the ENGD codes' grid).
STEP_GRID = tuple(2.0**-k for k in range(31))


def grid_search(damped: DampedStep, inv_sqrt_scale, eta, cost0, trial_cost, num_samples, *,
                xnorm, ftol, xtol, grid=STEP_GRID) -> Outcome:
    r"""ENGD's line search over α in `grid` (1, 1/2, …, 2^-30) for the step αηδ, scanned from
    the top: halve α until C falls below C(θ), then keep halving while C keeps falling, and take
    the last α before it rises again (the first local minimum along the grid: the grid's
    lowest cost when C is unimodal along the ray, in a few cost evaluations instead of 31).
    Unlike backtracking it does not stop at the first decrease: on a freshly drawn batch the
    longest decreasing step is rarely the best one. None when no α lowers C (`stalled`).
    MINPACK's ftol and xtol tests run on the full step's trial."""
    dtype = inv_sqrt_scale.dtype
    trial = evaluate(damped, inv_sqrt_scale, eta, cost0, trial_cost, num_samples)
    status = _status(_ftol(trial, ftol), trial.length <= xtol * xnorm)
    alphas = jnp.asarray(grid, dtype)
    zero = jnp.asarray(0.0, dtype)

    def cond(carry):
        i, _, _, done = carry
        return (i < alphas.shape[0]) & ~done

    def body(carry):
        i, best_alpha, best_value, _ = carry
        value = trial_cost(alphas[i] * trial.step)
        lower = jnp.isfinite(value) & (value < best_value)
        done = ~lower & (best_alpha > 0)  # C rose again after falling
        return (i + 1, jnp.where(lower, alphas[i], best_alpha),
                jnp.where(lower, value, best_value), done)

    init = (0, zero, jnp.asarray(cost0, dtype), ~trial.solve.finite)
    _, alpha, _, _ = jax.lax.while_loop(cond, body, init)
    found = trial.solve.finite & (alpha > 0)
    alpha = jnp.where(found, alpha, 0.0)
    status = jnp.where(~found & (status == RESULTS.running), RESULTS.stalled, status)
    # Not α·step: a non-finite step times α = 0 would be NaN.
    step = jnp.where(found, alpha * trial.step, jnp.zeros_like(trial.step))
    return Outcome(step, alpha.astype(dtype), jnp.asarray(-1.0, dtype), jnp.asarray(2.0, dtype),
                   jnp.asarray(-1.0, dtype), status.astype(jnp.int32), trial.solve)
