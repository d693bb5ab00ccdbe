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
from ._problem import Problem, check_params, static_real
from ._solve import output_metric_gradient


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
def _solve_reports(flow, path):
    """(rank, fallback) of the flow's output-metric solve at each point of `path`."""

    def report(params):
        _, result, _ = output_metric_gradient(
            flow.problem, params, damping=getattr(flow, "damping", 0.0), solver=flow.solver,
            rtol=getattr(flow, "rtol", None))
        return result.rank, result.fallback

    return jax.lax.map(report, path)


@eqx.filter_jit
def _solve_flow(flow, solver, controller, params, t1, ts, eps, max_steps, progress_meter, token):
    event = None if eps is None else diffrax.Event(_CostBelow(flow.problem, eps))
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_GuardedField(flow)),
        solver,
        t0=jnp.zeros_like(t1),
        t1=t1,
        dt0=None,
        y0=params,
        args=token,
        saveat=diffrax.SaveAt(ts=ts, t1=True),
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
) -> Trajectory:
    r"""Integrate a flow (default: the adapted flow) from `params` with diffrax.

    **Arguments:**

    - `problem`, `params`: the problem and the starting parameters θ(0).
    - `flow`: a vector field `flow(t, params, args)`; default `adapted_flow(problem)`.
    - `eps`: target cost. Without `t1`, integrates to the a priori stopping time
      $T(\varepsilon) = \frac{N}{2}\ln(C(0)/\varepsilon)$, and stops early once $C \le \varepsilon$.
    - `t1`: end time (overrides T(ε) as the end; the early stop at ε still applies).
    - `ts`: times at which to save; default `num_saves` equispaced times on [0, t1].
    - `solver`: a diffrax solver, default `Tsit5()` with an adaptive PID controller.
    - `rtol`, `atol`: controller tolerances; default 1e-12/1e-14 in float64, 1e-6/1e-8 in float32.
    - `max_steps`: cap on solver steps; reaching it ends the run with a warning, never silently.
    - `progress`: show diffrax's tqdm progress meter.

    **Returns:** a `Trajectory`. Saved times after an early stop are dropped; the final saved
    point is always where integration ended. Its `rank` and `fallback` report, at the saved
    times, whether the solve met a singular or near-singular Gram and took the SVD fallback.

    **Failures:** bad arguments raise before anything is traced, naming the argument. If the
    flow runs where the model (or its Jacobian) is NaN or inf, diffrax rejects those steps; when
    it therefore cannot reach t1, `NonFiniteError` is raised and its `.result` holds the finite
    path up to that point. Other early ends (`max_steps`, a stiff or too ill-conditioned field)
    return the path with a `RuntimeWarning`; for κ(D) ≳ 1e12 in float64 use
    `adapted_flow(problem, rtol=1e-10)` (or `damping`) as `flow`.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an outmetric.Problem, got {type(problem).__name__}")
    check_params(params)
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
    # θ-relative tolerances must sit well below the accuracy wanted in C, which falls by many
    # orders of magnitude; 1e-12 keeps C(s) within ~1e-8 of C(0)e^{-2s/N} down to C = 1e-10·C(0).
    rtol = (1e-12 if double else 1e-6) if rtol is None else rtol
    atol = (1e-14 if double else 1e-8) if atol is None else atol

    cost0 = float(problem.cost(params))
    if not math.isfinite(cost0):
        raise ValueError("params give a non-finite initial cost: the model returns NaN or inf "
                         "at the initial params")
    t_eps = stopping_time(cost0, eps, problem.num_samples) if eps is not None else None
    end = t1 if t1 is not None else t_eps
    if end == 0.0:  # already at or below eps
        stacked = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], params)
        return Trajectory(jnp.zeros(1, dtype), stacked, jnp.asarray([cost0], dtype), t_eps, 0,
                          True, "successful")
    if ts is None:
        ts = jnp.linspace(0.0, end, int(num_saves), dtype=dtype)
    else:
        ts = jnp.asarray(ts, dtype)
        if ts.ndim != 1 or ts.size == 0:
            raise ValueError(f"ts must be a non-empty 1-D array of times, got shape {ts.shape}")
        if not bool(jnp.all(jnp.isfinite(ts))):
            raise ValueError("ts must be finite times; it contains NaN or inf")
        if bool(jnp.any(ts < 0)) or bool(jnp.any(ts > end)) or bool(jnp.any(jnp.diff(ts) < 0)):
            raise ValueError(f"ts must be sorted times inside [0, {end}]")

    token = next(_TOKENS)
    try:
        solution = _solve_flow(
            flow,
            diffrax.Tsit5() if solver is None else solver,
            diffrax.PIDController(rtol=rtol, atol=atol),
            params,
            jnp.asarray(end, dtype),
            ts,
            None if eps is None else jnp.asarray(eps, dtype),
            int(max_steps),
            diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
            jnp.asarray(token % 2**31, jnp.int32),
        )
        jax.block_until_ready(solution.ts)
        jax.effects_barrier()
    finally:
        with _NONFINITE_LOCK:
            nonfinite = _NONFINITE.pop(token % 2**31, None)
    saved_ts = np.asarray(solution.ts)
    keep = np.isfinite(saved_ts)
    t_end = saved_ts[-1]
    # Drop saved times past the end (filled with inf after an early stop), and a duplicate of
    # the final point when it coincides with the last requested time.
    keep[:-1] &= saved_ts[:-1] <= t_end
    if keep.sum() >= 2 and saved_ts[keep][-2] == t_end:
        keep[np.flatnonzero(keep)[-2]] = False
    index = np.flatnonzero(keep)
    path = jax.tree_util.tree_map(lambda a: a[index], solution.ys)
    costs = jax.vmap(problem.cost)(path)
    finished = (solution.result == diffrax.RESULTS.successful) | (
        solution.result == diffrax.RESULTS.event_occurred
    )
    rank = fallback = None
    if isinstance(getattr(flow, "solver", None), str):
        rank, fallback = _solve_reports(flow, path)
    result = "successful" if bool(finished) else diffrax.RESULTS[solution.result]
    reached = None if eps is None else bool(costs[-1] <= eps)
    trajectory = Trajectory(jnp.asarray(saved_ts[index]), path, costs, t_eps,
                            int(solution.stats["num_steps"]), reached, result, rank, fallback)
    if not bool(jnp.all(jnp.isfinite(costs))):
        raise NonFiniteError(
            "integrate: the flow produced non-finite costs: the model or the solve broke down "
            "along the path; error.result holds the trajectory", trajectory)
    if not bool(finished):
        t_stop = float(np.max(saved_ts[np.isfinite(saved_ts)]))
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
