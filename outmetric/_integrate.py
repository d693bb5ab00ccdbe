"""Integrating flows with diffrax: a priori stopping time, early stop at a target cost, saved paths."""

import itertools
import math
import threading
import warnings
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._errors import NonFiniteError
from ._flows import AbstractFlow, adapted_flow
from ._problem import AbstractProblem, Problem, check_params, nonfinite_cost_message, static_real
from ._solve import output_metric_gradient
from ._validation import check_problem


def stopping_time(cost0: float, eps: float, num_samples: int) -> float:
    r"""The a priori stopping time $T(\varepsilon) = \frac{N}{2}\ln\frac{C(0)}{\varepsilon}$.

    Along the overparametrised adapted flow $C(s) = e^{-2s/N}C(0)$, so $C(s) \le \varepsilon$
    for every $s \ge T(\varepsilon)$. Returns 0 when $C(0) \le \varepsilon$ already.
    """
    for name, value in (("cost0", cost0), ("eps", eps)):
        if not _is_real(value) and not (hasattr(value, "dtype") and np.ndim(value) == 0):
            raise ValueError(f"{name} must be a real number, got {value!r}")
    cost0, eps = float(cost0), float(eps)
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if not cost0 >= 0 or not math.isfinite(cost0):
        raise ValueError(f"cost0 must be a finite non-negative number, got {cost0}")
    if not (isinstance(num_samples, (int, np.integer)) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if cost0 <= eps:
        return 0.0
    return 0.5 * num_samples * math.log(cost0 / eps)


class Trajectory(NamedTuple):
    """A saved path of a flow.

    - `ts`: saved times, shape `(S,)`; the last one is where integration ended.
    - `params`: the parameters at those times, a pytree whose leaves gain a leading axis S.
    - `costs`: C at those times, shape `(S,)`.
    - `stopping_time`: T(ε) when `eps` was given, else None.
    - `num_steps`: accepted solver steps.
    - `reached_eps`: whether the cost reached ε (None without `eps`).
    - `result`: diffrax's result message ("successful" or the reason it stopped).
    - `rank`, `fallback`: for flows built on the output-metric solve (those with a `solver`,
      such as `adapted_flow`), the solve's rank estimate of D and whether it took the
      rank-revealing SVD fallback (singular or near-singular Gram), at each saved time, shape
      `(S,)`; None for other flows.
    """

    ts: Float[Array, " S"]
    params: PyTree
    costs: Float[Array, " S"]
    stopping_time: float | None
    num_steps: int
    reached_eps: bool | None
    result: str
    rank: Array | None = None
    fallback: Array | None = None

    @property
    def final_params(self) -> PyTree:
        """The parameters at the end of the path."""
        return jax.tree_util.tree_map(lambda a: a[-1], self.params)


class _CostBelow(eqx.Module):
    """Event condition: the cost has reached ε (a Module, so repeated calls reuse the compile)."""

    problem: Problem
    eps: Array

    def __call__(self, t, y, args, **kwargs):
        return self.problem.cost(y) <= self.eps


# Where vector fields report non-finite values: token of an `integrate` call -> [count, first t].
_NONFINITE: dict[int, list] = {}
_NONFINITE_LOCK = threading.Lock()
_TOKENS = itertools.count()


def _record_nonfinite(token, t) -> None:
    with _NONFINITE_LOCK:
        entry = _NONFINITE.setdefault(int(token), [0, float(t)])
        entry[0] += 1


class _GuardedField(eqx.Module):
    """The flow, reporting to the host (only) when its velocity is NaN or inf.

    diffrax rejects a step whose stages are not finite and retries a smaller one, so a trial
    stage that strays where the model is not finite is harmless; only when the integration
    then fails does `integrate` turn these reports into a `NonFiniteError`.
    """

    flow: Any

    def __call__(self, t, params, token):
        velocity = self.flow(t, params, None)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                                    for v in jax.tree_util.tree_leaves(velocity)]))
        jax.lax.cond(finite, lambda: None,
                     lambda: jax.debug.callback(_record_nonfinite, token, t))
        return velocity


@eqx.filter_jit
def _cost(problem, params):
    """C(params), compiled as one program (run op by op, the cost's few dozen primitives each
    compile on their own the first time a shape is seen)."""
    return problem.cost(params)


@eqx.filter_jit
def _saved_path(problem, ys, index, result):
    """From diffrax's two save buffers and its result, in one compiled call: the saved params
    at `index`, their costs, the cost of the end state, whether every saved cost is finite,
    whether the solve finished (reached t1 or the cost event), and whether the event stopped it."""
    path = jax.tree_util.tree_map(lambda a: a[index], ys[0])
    costs = jax.vmap(problem.cost)(path)
    cost_end = problem.cost(jax.tree_util.tree_map(lambda a: a[-1], ys[1]))
    stopped = result == diffrax.RESULTS.event_occurred
    finished = (result == diffrax.RESULTS.successful) | stopped
    return path, costs, cost_end, jnp.all(jnp.isfinite(costs)), finished, stopped


@eqx.filter_jit
def _solve_reports(flow, path):
    """(rank, fallback) of the flow's output-metric solve at each point of `path`."""

    def report(params):
        _, result, _ = output_metric_gradient(
            flow.problem, params, damping=getattr(flow, "damping", 0.0), solver=flow.solver,
            rtol=getattr(flow, "rtol", None))
        return result.rank, result.fallback

    return jax.lax.map(report, path)


def _scaled_atol(flow, params, t1, rtol, residual_ratio, fallback):
    r"""The default absolute tolerance, in the units of the parameters' own motion.

    $\mathrm{atol} = \mathrm{rtol}\cdot\mathrm{rms}(\dot\theta(0))\,\min(t_1, N)\cdot\rho$: the
    initial speed times the flow's time scale (N for the adapted flow, whose residual decays like
    $e^{-s/N}$) is how far θ moves, and ρ (`residual_ratio`, $\sqrt{C_\mathrm{end}/C(0)}$ floored
    at the dtype's ε) is the fraction of that distance still left where the run ends. So the error
    control follows the scale of θ and of the accuracy wanted in C, not a fixed number of units.
    """
    velocity = ravel_pytree(flow(jnp.zeros_like(t1), params, None))[0]
    speed = jnp.sqrt(jnp.mean(velocity**2))
    horizon = jnp.minimum(t1, flow.problem.num_samples)
    atol = (rtol * speed * horizon * residual_ratio).astype(t1.dtype)
    usable = jnp.isfinite(atol) & (atol >= jnp.finfo(t1.dtype).tiny)
    return jnp.where(usable, atol, jnp.asarray(fallback, t1.dtype))


@eqx.filter_jit
def _solve_flow(flow, solver, controller, params, t1, dt0, saveat, eps, max_steps, progress_meter,
                token, residual_ratio):
    if residual_ratio is not None:  # the default PIDController: atol in units of θ's motion
        atol = _scaled_atol(flow, params, t1, controller.rtol, residual_ratio, controller.atol)
        controller = eqx.tree_at(lambda c: c.atol, controller, atol)
    event = None if eps is None else diffrax.Event(_CostBelow(flow.problem, eps))
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_GuardedField(flow)),
        solver,
        t0=jnp.zeros_like(t1),
        t1=t1,
        dt0=dt0,
        y0=params,
        args=token,
        saveat=saveat,
        stepsize_controller=controller,
        event=event,
        max_steps=max_steps,
        throw=False,
        progress_meter=progress_meter,
    )


def integrate(
    problem: Problem,
    params: PyTree,
    *,
    flow: AbstractFlow | Any = None,
    eps: float | None = None,
    t1: float | None = None,
    ts: Array | None = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 16_384,
    num_saves: int = 101,
    progress: bool = False,
    saveat: diffrax.SaveAt | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
) -> Trajectory:
    r"""Integrate a flow (default: the adapted flow) from `params` with diffrax.

    **Arguments:**

    - `problem`, `params`: the problem and the starting parameters θ(0).
    - `flow`: a vector field `flow(t, params, args)`; default `adapted_flow(problem)`.
    - `eps`: target cost. Without `t1`, integrates to the a priori stopping time
      $T(\varepsilon) = \frac{N}{2}\ln(C(0)/\varepsilon)$, and stops early once $C \le \varepsilon$.
    - `t1`: end time (overrides T(ε) as the end; the early stop at ε still applies).
    - `ts`: times at which to save; default `num_saves` equispaced times on [0, t1].
    - `solver`: a diffrax solver, default `Tsit5()` with an adaptive PID controller. A solver
      without an error estimate (`diffrax.Euler()`, say) takes fixed steps of `dt0`.
    - `rtol`, `atol`: tolerances of the default `diffrax.PIDController`. `rtol` defaults to 1e-12
      in float64 and 1e-6 in float32. `atol`, if given, is absolute (in the units of θ); by
      default it scales with the parameters' own motion,
      $\mathrm{atol} = \mathrm{rtol}\cdot\mathrm{rms}(\dot\theta(0))\min(t_1, N)\cdot\rho$ with
      $\rho = \max\big(\sqrt{C_\mathrm{end}/C(0)}, \epsilon_\mathrm{mach}\big)$ and $C_\mathrm{end}$
      the cost predicted where the run ends (ε, or $C(0)e^{-2t_1/N}$): the error control is then
      the same for a model $x = s\,W e_j$ at any scale s, instead of being swamped by a fixed
      atol once θ is of the order of atol.
    - `max_steps`: cap on solver steps; reaching it ends the run with a warning, never silently.
    - `num_saves`: how many equispaced times to save when neither `ts` nor `saveat` is given.
    - `progress`: show diffrax's tqdm progress meter.
    - `saveat`: a `diffrax.SaveAt` saving params (`t0`, `t1`, `ts`, `steps`; the default `fn`),
      instead of `ts`. The trajectory holds exactly what it saves (the end is tracked
      separately, for `reached_eps`).
    - `stepsize_controller`: a diffrax step-size controller instead of the default
      `PIDController(rtol, atol)` (then `rtol` and `atol` are set on it, not here), e.g.
      `diffrax.ConstantStepSize()` with `dt0`.
    - `dt0`: the initial step (fixed steps: the step); default: diffrax picks it (adaptive).

    **Returns:** a `Trajectory`. Saved times after an early stop are dropped; with the default
    saves the final saved point is where integration ended. Its `rank` and `fallback` report, at
    the saved times, whether the solve met a singular or near-singular Gram and took the SVD
    fallback. `reached_eps` is True when the run stopped at the event $C \le \varepsilon$, or
    ended (at T(ε) or t1) with $C \le \varepsilon(1 + \sqrt{\mathrm{rtol}})$: integrating exactly
    to T(ε) lands on ε only up to the solver's error, which the PID tolerances keep near
    $10^{4}\,\mathrm{rtol}$ relative (1e-8 at the float64 default); a controller without an
    `rtol` (fixed steps) is compared exactly.

    **Failures:** bad arguments raise before anything is traced, naming the argument. If the
    flow runs where the model (or its Jacobian) is NaN or inf, diffrax rejects those steps; when
    it therefore cannot reach t1, `NonFiniteError` is raised and its `.result` holds the finite
    path up to that point. Other early ends (`max_steps`, a stiff or too ill-conditioned field)
    return the path with a `RuntimeWarning`; for κ(D) ≳ 1e12 in float64 use
    `adapted_flow(problem, rtol=1e-10)` (or `damping`) as `flow`.
    """
    check_problem(problem)
    check_params(params)
    problem.size_from(params)
    if eps is None and t1 is None:
        raise ValueError("integrate needs eps (to use the a priori stopping time) or t1")
    if eps is not None and (not _is_real(eps) or not eps > 0 or not math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if t1 is not None and (not _is_real(t1) or not t1 > 0 or not math.isfinite(t1)):
        raise ValueError(f"t1 must be a positive finite time, got {t1!r}")
    eps = None if eps is None else float(eps)
    t1 = None if t1 is None else float(t1)
    if solver is not None and not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(f"solver must be a diffrax solver such as diffrax.Tsit5(), got {solver!r}")
    if not _is_positive_int(max_steps):
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    if ts is None and not _is_positive_int(num_saves):
        raise ValueError(f"num_saves must be a positive integer, got {num_saves!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and (not _is_real(tol) or not tol > 0 or not math.isfinite(tol)):
            raise ValueError(f"{name} must be a positive finite tolerance, got {tol!r}")
    solver = diffrax.Tsit5() if solver is None else solver
    controller = _check_stepping(solver, stepsize_controller, dt0, rtol, atol)
    dt0 = None if dt0 is None else float(dt0)
    subsave = _check_saveat(saveat, ts)
    flow = adapted_flow(problem) if flow is None else flow
    if not callable(flow):
        raise TypeError(f"flow must be a vector field flow(t, params, args), got {type(flow).__name__}")
    if not hasattr(flow, "problem"):
        flow = _WrappedField(problem, flow)
    elif isinstance(flow.problem, Problem) and flow.problem is not problem and (
        (flow.problem.num_samples, flow.problem.output_dim)
        != (problem.num_samples, problem.output_dim)
    ):
        raise ValueError(
            f"flow was built for a problem with N={flow.problem.num_samples}, "
            f"Q={flow.problem.output_dim}, but problem has N={problem.num_samples}, "
            f"Q={problem.output_dim}: build the flow from the problem you integrate"
        )

    dtype = ravel_pytree(params)[0].dtype
    double = dtype == jnp.float64

    cost0 = float(_cost(problem, params))
    if not math.isfinite(cost0):
        raise ValueError(nonfinite_cost_message(problem, params))
    t_eps = stopping_time(cost0, eps, problem.num_samples) if eps is not None else None
    end = t1 if t1 is not None else t_eps
    if end == 0.0:  # already at or below eps
        stacked = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], params)
        return Trajectory(jnp.zeros(1, dtype), stacked, jnp.asarray([cost0], dtype), t_eps, 0,
                          True, "successful")
    if subsave is None:
        if ts is None:
            ts = _to_device(np.linspace(0.0, end, int(num_saves)), dtype)
        else:
            ts = _check_times("ts", ts, end, dtype)
        subsave = diffrax.SubSaveAt(ts=ts, t1=True)
    elif subsave.ts is not None:
        subsave = eqx.tree_at(lambda s: s.ts, subsave,
                              _check_times("saveat.ts", subsave.ts, end, dtype))
    if dt0 is not None and isinstance(controller, diffrax.ConstantStepSize) and (
            math.ceil(end / dt0 - 1e-9) > max_steps):
        raise ValueError(f"dt0={dt0} needs {math.ceil(end / dt0)} fixed steps to reach "
                         f"t1={end:.6g}, more than max_steps={max_steps}: raise max_steps or dt0")

    residual_ratio = None
    if controller is None:
        # θ-relative tolerances must sit well below the accuracy wanted in C, which falls by many
        # orders of magnitude; 1e-12 keeps C(s) within ~1e-8 of C(0)e^{-2s/N} down to
        # C = 1e-10·C(0). atol follows the scale of θ's motion (see `_scaled_atol`); a given atol
        # is used as it is.
        rtol = (1e-12 if double else 1e-6) if rtol is None else float(rtol)
        if atol is None:
            cost_end = max(eps or 0.0, cost0 * math.exp(-2.0 * end / problem.num_samples))
            ratio = math.sqrt(cost_end / cost0) if cost0 > 0 else 1.0
            residual_ratio = _to_device(max(ratio, float(jnp.finfo(dtype).eps)), dtype)
            atol = 1e-14 if double else 1e-8  # used where θ'(0) is 0 or not finite
        controller = diffrax.PIDController(rtol=rtol, atol=float(atol))
    saveat = diffrax.SaveAt(subs=(subsave, diffrax.SubSaveAt(t1=True)))

    token = next(_TOKENS)
    try:
        solution = _solve_flow(
            flow,
            solver,
            controller,
            params,
            _to_device(end, dtype),
            None if dt0 is None else _to_device(dt0, dtype),
            saveat,
            None if eps is None else _to_device(eps, dtype),
            int(max_steps),
            diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
            _to_device(token % 2**31, np.int32),
            residual_ratio,
        )
        jax.block_until_ready(solution.ts)
        jax.effects_barrier()
    finally:
        with _NONFINITE_LOCK:
            nonfinite = _NONFINITE.pop(token % 2**31, None)
    saved_ts = np.asarray(solution.ts[0])
    t_end = float(np.asarray(solution.ts[1])[-1])
    # Drop saved times past the end (filled with inf after an early stop, or unused `steps`
    # slots), and a point saved twice at one time (the final point when it coincides with the
    # last requested time).
    keep = np.isfinite(saved_ts) & (saved_ts <= t_end)
    index = np.flatnonzero(keep)
    if index.size >= 2:
        index = index[np.append(saved_ts[index[:-1]] != saved_ts[index[1:]], True)]
    path, costs, cost_end, all_finite, finished, stopped = _saved_path(
        problem, solution.ys, _to_device(index, np.int32), solution.result)
    rank = fallback = None
    if isinstance(getattr(flow, "solver", None), str) and index.size:
        rank, fallback = _solve_reports(flow, path)
    result = "successful" if bool(finished) else diffrax.RESULTS[solution.result]
    reached = None
    if eps is not None:
        cost_end = float(cost_end)
        slack = math.sqrt(float(getattr(controller, "rtol", 0.0) or 0.0))
        reached = bool(stopped) or cost_end <= eps * (1.0 + slack)
    trajectory = Trajectory(jax.device_put(saved_ts[index]), path, costs, t_eps,
                            int(solution.stats["num_steps"]), reached, result, rank, fallback)
    if not bool(all_finite):
        raise NonFiniteError(
            "integrate: the flow produced non-finite costs: the model or the solve broke down "
            "along the path; error.result holds the trajectory", trajectory)
    if not bool(finished):
        t_stop = t_end if math.isfinite(t_end) else float(np.max(saved_ts[np.isfinite(saved_ts)],
                                                                initial=0.0))
        if nonfinite is not None:
            count, first = nonfinite
            raise NonFiniteError(
                f"integrate: the flow's velocity was NaN or inf at {count} evaluation(s), first "
                f"at t={first:.6g}, and the solver could not get past t={t_stop:.6g} (of "
                f"t1={end:.6g}): the model's outputs or Jacobian are not finite there. "
                "error.result holds the trajectory up to that point", trajectory)
        rejected = int(solution.stats["num_rejected_steps"])
        hint = ""
        if rejected > int(solution.stats["num_accepted_steps"]) // 4:
            hint = (f" ({rejected} rejected steps: the vector field is too stiff or too "
                    "ill-conditioned for rtol/atol; try adapted_flow(problem, damping=...) or "
                    "adapted_flow(problem, rtol=...) to cut off tiny singular values, or looser "
                    "tolerances)")
        warnings.warn(f"integrate stopped at t={t_stop:.6g} before t1={end:.6g}: {result}{hint}",
                      RuntimeWarning, stacklevel=2)
    return trajectory


#: The `fn` of a `diffrax.SubSaveAt` that saves the state itself.
_SAVE_Y = diffrax.SubSaveAt(t1=True).fn


def _check_stepping(solver, controller, dt0, rtol, atol):
    """Validate `stepsize_controller` and `dt0` against `solver`; the controller to use (None:
    the default PIDController, built once the dtype is known)."""
    if controller is not None and not isinstance(controller, diffrax.AbstractStepSizeController):
        raise TypeError("stepsize_controller must be a diffrax step-size controller such as "
                        f"diffrax.PIDController(rtol=1e-8, atol=1e-10), got {controller!r}")
    if dt0 is not None and (not _is_real(dt0) or not dt0 > 0 or not math.isfinite(dt0)):
        raise ValueError(f"dt0 must be a positive finite step, got {dt0!r}")
    if controller is not None and (rtol is not None or atol is not None):
        raise ValueError("rtol and atol are the tolerances of the default PIDController; with "
                         "stepsize_controller= set them on that controller instead")
    adaptive_solver = isinstance(solver, diffrax.AbstractAdaptiveSolver)
    if controller is None and not adaptive_solver:
        if rtol is not None or atol is not None:
            raise ValueError(f"solver={type(solver).__name__}() has no error estimate, so it "
                             "takes fixed steps of dt0 and rtol/atol do not apply")
        controller = diffrax.ConstantStepSize()
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController) and not adaptive_solver:
        raise TypeError(f"stepsize_controller={type(controller).__name__} adapts the step from an "
                        f"error estimate, which solver={type(solver).__name__}() does not give: "
                        "use diffrax.ConstantStepSize() with dt0, or an adaptive solver")
    if isinstance(controller, diffrax.ConstantStepSize) and dt0 is None:
        raise ValueError(f"solver={type(solver).__name__}() takes fixed steps here "
                         "(ConstantStepSize): pass dt0, the step size")
    return controller


def _check_saveat(saveat, ts):
    """Validate a user `saveat`; its one `SubSaveAt`, or None for the default saves."""
    if saveat is None:
        return None
    if not isinstance(saveat, diffrax.SaveAt):
        raise TypeError(f"saveat must be a diffrax.SaveAt, got {type(saveat).__name__}")
    if ts is not None:
        raise ValueError("pass either ts or saveat (diffrax.SaveAt(ts=...)), not both")
    for name in ("dense", "solver_state", "controller_state", "made_jump"):
        if getattr(saveat, name, False):
            raise ValueError(f"saveat.{name}=True is not supported: integrate returns the "
                             "saved params and their costs (a Trajectory)")
    sub = saveat.subs
    if not isinstance(sub, diffrax.SubSaveAt):
        raise ValueError("saveat must save one set of times (t0, t1, ts, steps), not several subs")
    if sub.fn is not _SAVE_Y:
        raise ValueError("saveat.fn must be the default (save the params): integrate computes "
                         "costs, ranks and the end state from the saved params")
    return sub


def _check_times(name, times, end, dtype):
    """Saved times as a sorted 1-D array inside [0, end]; a `ValueError` naming `name`.

    Checked on the host (NumPy): a few hundred numbers, and no op-by-op compilation."""
    times = np.asarray(times).astype(dtype)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of times, got shape {times.shape}")
    if not np.all(np.isfinite(times)):
        raise ValueError(f"{name} must be finite times; it contains NaN or inf")
    if np.any(times < 0) or np.any(times > end) or np.any(np.diff(times) < 0):
        raise ValueError(f"{name} must be sorted times inside [0, {end}]")
    return _to_device(times, dtype)


def _to_device(value, dtype) -> jax.Array:
    """A host number or array as a device array of `dtype`, converted on the host:
    `jnp.asarray` would compile a conversion program for each new shape and dtype."""
    return jax.device_put(np.asarray(value, dtype))


def _is_real(value) -> bool:
    """A real number the host can read now (Python, NumPy, or a concrete 0-d array)."""
    return static_real(value) is not None


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


class _WrappedField(eqx.Module):
    """Adapts a plain callable vector field to the flows' `problem` attribute."""

    problem: Problem
    field: Any = eqx.field(static=True)

    def __call__(self, t, params, args=None):
        return self.field(t, params, args)
