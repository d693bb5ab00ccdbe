"""The methods under comparison and the timed runner that traces each of them.

A method builds a `Stepper` for a problem: pure, jittable functions

- `init(params) -> state`,
- `evaluate(state) -> (cost, aux)`: the cost C at the state's parameters (and whatever the
  step reuses, e.g. the gradient),
- `advance(state, aux) -> (state, halt)`: one optimizer step; `halt` is the method's own
  stopping signal (optimistix's termination test, or outmetric finding no decrease at the
  round-off floor),
- `params(state) -> params`.

`run` compiles a chunk of steps (a `lax.while_loop` that stops at the target cost, at a
non-finite cost or at `halt`, and skips `advance` once the target is reached), warms it up, and
then times chunk after chunk with `block_until_ready` until the target, the time budget or the
step cap. Compilation, the warm-up and the error metric (evaluated between chunks) are outside
the timed region. Every method is run through this same loop, so the measured times compare
optimizer work, not harness overhead.
"""

import math
import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import outmetric as om

from .problems import BenchProblem


class Stepper(NamedTuple):
    init: Callable[[Any], Any]
    evaluate: Callable[[Any], tuple[jax.Array, Any]]
    advance: Callable[[Any, Any], tuple[Any, jax.Array]]
    params: Callable[[Any], Any]


class Method(NamedTuple):
    """`name` is unique (e.g. ``adam(lr=1e-3)``); runs of one `family` form a sweep of which the
    best is reported; `make(bench_problem) -> Stepper`."""

    name: str
    family: str
    make: Callable[[BenchProblem], Stepper]
    note: str = ""


# ----------------------------------------------------------------------------- outmetric


def outmetric_stepper(optimizer: optax.GradientTransformationExtraArgs,
                      bp: BenchProblem) -> Stepper:
    """Any outmetric transformation: `update(zeros, state, params, problem=problem)`."""
    problem = bp.problem

    def init(params):
        return params, optimizer.init(params)

    def evaluate(state):
        return problem.cost(state[0]), None

    def advance(state, aux):
        params, opt_state = state
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        updates, opt_state = optimizer.update(zeros, opt_state, params, problem=problem)
        halt = jnp.asarray(False)
        if hasattr(opt_state, "status"):  # the optimizer's own termination (ftol, xtol, stall)
            halt = opt_state.status != om.RESULTS.running
        elif hasattr(opt_state, "step_size"):  # no decrease found: the same step would fail again
            halt = opt_state.step_size == 0
        return (optax.apply_updates(params, updates), opt_state), halt

    return Stepper(init, evaluate, advance, lambda s: s[0])


def _outmetric(name, note, **kwargs):
    return Method(name, name, lambda bp: outmetric_stepper(om.output_metric_descent(**kwargs), bp),
                  note)


# ----------------------------------------------------------------------------- optax


def optax_stepper(optimizer: optax.GradientTransformation, bp: BenchProblem) -> Stepper:
    """A first-order optax optimizer on C(θ): one `value_and_grad` per step."""
    cost = bp.problem.cost

    def init(params):
        return params, optimizer.init(params)

    def evaluate(state):
        return jax.value_and_grad(cost)(state[0])

    def advance(state, grads):
        params, opt_state = state
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), jnp.asarray(False)

    return Stepper(init, evaluate, advance, lambda s: s[0])


def lbfgs_stepper(bp: BenchProblem) -> Stepper:
    """`optax.lbfgs()` (memory 10, zoom line search) with `value_and_grad_from_state`."""
    cost = bp.problem.cost
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(cost)

    def init(params):
        return params, optimizer.init(params)

    def evaluate(state):
        params, opt_state = state
        value, grads = value_and_grad(params, state=opt_state)
        return value, (value, grads)

    def advance(state, value_grad):
        params, opt_state = state
        value, grads = value_grad
        updates, opt_state = optimizer.update(grads, opt_state, params, value=value, grad=grads,
                                              value_fn=cost)
        return (optax.apply_updates(params, updates), opt_state), jnp.asarray(False)

    return Stepper(init, evaluate, advance, lambda s: s[0])


# ----------------------------------------------------------------------------- optimistix


def optimistix_stepper(solver_cls, bp: BenchProblem, *, rtol=1e-14, atol=1e-16) -> Stepper:
    """An optimistix least-squares solver driven through its `init`/`step`/`terminate` API.

    The residual is r(θ) = x(θ) − y (optimistix minimises ½‖r‖², the same minimiser as C).
    Optimistix forms the Jacobian of the stacked residual itself: reverse mode
    (``options={"jac": "bwd"}``, materialised by `jax.jacrev`) when QN ≤ K and its default
    forward mode otherwise, whichever of its two options needs fewer passes.
    """
    import optimistix as optx

    problem = bp.problem
    solver = solver_cls(rtol=rtol, atol=atol)
    options = {"jac": "bwd" if bp.num_outputs <= bp.num_params else "fwd"}
    tags = frozenset()

    def fn(params, args):
        del args
        return (problem.outputs(params) - problem.targets).reshape(-1), None

    def init(params):
        f_struct, aux_struct = jax.eval_shape(lambda: fn(params, None))
        return params, solver.init(fn, params, None, options, f_struct, aux_struct, tags)

    def evaluate(state):
        return problem.cost(state[0]), None

    def advance(state, aux):
        params, solver_state = state
        params, solver_state, _ = solver.step(fn, params, None, options, solver_state, tags)
        done, _ = solver.terminate(fn, params, None, options, solver_state, tags)
        return (params, solver_state), done

    return Stepper(init, evaluate, advance, lambda s: s[0])


# ----------------------------------------------------------------------------- the registry


def _fmt(lr: float) -> str:
    return f"{lr:g}"


SGD_RATES = (1e-2, 1e-1, 1.0)
ADAM_RATES = (1e-4, 1e-3, 1e-2)


def all_methods(quick: bool = False) -> list[Method]:
    """Every method of the comparison.

    `quick` (the smoke run) keeps one learning rate per sweep and drops the variants whose code
    paths the others already exercise (outmetric-bt, outmetric-cg-plain, sgd), since compiling
    dominates a smoke run.
    """
    import optimistix as optx

    sgd_rates = () if quick else SGD_RATES
    adam_rates = (1e-3,) if quick else ADAM_RATES
    methods = [
        _outmetric("outmetric", "output_metric_descent(): the default — solver 'auto' "
                   "(here Cholesky of the Gram, built from the dense-layer structure when the wide "
                   "side is solved), adaptive (Levenberg–Marquardt) damping"),
        _outmetric("outmetric-bt", "output_metric_descent(damping=1e-6): dense, fixed damping "
                   "with backtracking", damping=1e-6),
        _outmetric("outmetric-plain", "output_metric_descent(damping=0, linesearch=None): "
                   "the undamped Euler step η = 1, no safeguard", damping=0.0, linesearch=None),
        _outmetric("outmetric-cg", "output_metric_descent(solver='cg'): matrix-free CG, "
                   "adaptive damping", solver="cg"),
        _outmetric("outmetric-cg-plain", "output_metric_descent(damping=0, solver='cg', "
                   "linesearch=None): matrix-free, no safeguard", damping=0.0, solver="cg",
                   linesearch=None),
    ]
    methods += [Method(f"sgd(lr={_fmt(lr)})", "sgd",
                       lambda bp, lr=lr: optax_stepper(optax.sgd(lr), bp)) for lr in sgd_rates]
    methods += [Method(f"adam(lr={_fmt(lr)})", "adam",
                       lambda bp, lr=lr: optax_stepper(optax.adam(lr), bp)) for lr in adam_rates]
    methods += [
        Method("lbfgs", "lbfgs", lbfgs_stepper, "optax.lbfgs() (memory 10, zoom line search)"),
        Method("optx-gn", "optx-gn", lambda bp: optimistix_stepper(optx.GaussNewton, bp),
               "optimistix.GaussNewton (lineax AutoLinearSolver); Jacobian "
               "by jacrev of the stacked residual when QN ≤ K, else optimistix's forward mode"),
        Method("optx-lm", "optx-lm", lambda bp: optimistix_stepper(optx.LevenbergMarquardt, bp),
               "optimistix.LevenbergMarquardt (lineax QR); Jacobian as for "
               "optx-gn"),
    ]
    if quick:
        methods = [m for m in methods if m.name not in ("outmetric-bt", "outmetric-cg-plain")]
    return methods


# ----------------------------------------------------------------------------- the runner


class Run(NamedTuple):
    """One method on one problem.

    - `costs`: C before each step (and at the end), one entry per step taken.
    - `trace`: chunk boundaries `(step, seconds, cost, error)`; `seconds` is the accumulated
      timed wall time (compilation and error evaluation excluded).
    - `status`: "target" (reached the target cost), "budget", "max_steps", "halted" (the
      method's own stop), or "non-finite".
    - `memory_bytes`: XLA's buffer assignment for a compiled chunk (arguments + temporaries +
      outputs − aliased), the peak memory a step can need.
    - `params`: the parameters where the run ended (for held-out metrics).
    """

    method: str
    family: str
    costs: np.ndarray
    trace: list
    status: str
    seconds: float
    steps: int
    compile_seconds: float
    memory_bytes: int
    budget_s: float
    params: Any = None  # the parameters where the run ended


def _make_chunk(stepper: Stepper, static_state, max_chunk: int):
    """The jitted chunk of steps on the array part of the state (optimistix keeps jaxprs in its
    state: those stay outside, in `static_state`)."""

    def evaluate(dyn):
        return stepper.evaluate(eqx.combine(dyn, static_state))

    def advance(dyn, aux):
        state, halt = stepper.advance(eqx.combine(dyn, static_state), aux)
        return eqx.filter(state, eqx.is_array), halt

    def chunk(dyn, num, target):
        cost_dtype = jax.eval_shape(lambda d: evaluate(d)[0], dyn).dtype
        costs = jnp.full(max_chunk, jnp.nan, cost_dtype)

        def cond(carry):
            i, _, _, stop = carry
            return (i < num) & ~stop

        def body(carry):
            i, dyn, costs, _ = carry
            cost, aux = evaluate(dyn)
            costs = costs.at[i].set(cost)
            go = jnp.isfinite(cost) & (cost > target)
            new_dyn, halt = jax.lax.cond(go, advance, lambda d, a: (d, jnp.asarray(False)),
                                         dyn, aux)
            return i + go.astype(i.dtype), new_dyn, costs, ~go | halt

        init = (jnp.asarray(0), dyn, costs, jnp.asarray(False))
        return jax.lax.while_loop(cond, body, init)

    return jax.jit(chunk)


def _memory(compiled) -> int:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # memory analysis is not available on every backend
        return -1


def run(method: Method, bp: BenchProblem, *, budget_s: float | None = None,
        max_steps: int | None = None, max_chunk: int = 512,
        chunk_seconds: float | None = None) -> Run:
    """Time `method` on `bp` (see the module docstring); returns a `Run`."""
    budget_s = bp.budget_s if budget_s is None else budget_s
    max_steps = bp.max_steps if max_steps is None else max_steps
    chunk_seconds = min(0.25, budget_s / 100) if chunk_seconds is None else chunk_seconds
    stepper = method.make(bp)
    state, static_state = eqx.partition(stepper.init(bp.params), eqx.is_array)
    dtype = jax.flatten_util.ravel_pytree(bp.params)[0].dtype
    target = jnp.asarray(-jnp.inf if bp.target is None else bp.target, dtype)
    chunk = _make_chunk(stepper, static_state, max_chunk)
    params_of = lambda s: stepper.params(eqx.combine(s, static_state))  # noqa: E731
    cost_fn = jax.jit(lambda s: bp.problem.cost(params_of(s)))
    error_fn = None if bp.error_fn is None else jax.jit(lambda s: bp.error_fn(params_of(s)))

    start = time.perf_counter()
    compiled = chunk.lower(state, jnp.asarray(1), target).compile()
    jax.block_until_ready(compiled(state, jnp.asarray(1), target))  # warm-up
    cost0 = float(cost_fn(state))
    error0 = None if error_fn is None else float(error_fn(state))
    compile_seconds = time.perf_counter() - start

    costs: list[float] = []
    trace = [(0, 0.0, cost0, error0)]
    seconds, steps, num, status = 0.0, 0, 1, None
    while status is None:
        num = int(min(num, max_chunk, max_steps - steps))
        t0 = time.perf_counter()
        out = compiled(state, jnp.asarray(num), target)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        taken, state, chunk_costs, stop = out
        taken, stop = int(taken), bool(stop)
        seconds += dt
        chunk_costs = np.asarray(chunk_costs)
        costs.extend(chunk_costs[:taken].tolist())
        steps += taken
        cost_now = float(cost_fn(state))
        error_now = None if error_fn is None else float(error_fn(state))
        trace.append((steps, seconds, cost_now, error_now))
        if stop:
            # A halting step is counted (its update applied), so the cost where the run
            # stands is cost_now; a non-finite cost stops the loop without a step.
            if not math.isfinite(cost_now):
                status = "non-finite"
            elif bp.target is not None and cost_now <= bp.target:
                status = "target"
            else:
                status = "halted"
        elif steps >= max_steps:
            status = "max_steps"
        elif seconds >= budget_s:
            status = "budget"
        per_step = dt / max(taken, 1)
        num = max(1, min(2 * num, int(chunk_seconds / max(per_step, 1e-9))))
    costs.append(trace[-1][2])
    return Run(method.name, method.family, np.asarray(costs), trace, status, seconds, steps,
               compile_seconds, _memory(compiled), budget_s, params_of(state))


# ----------------------------------------------------------------------------- reading a run


def time_to_cost(run: Run, threshold: float) -> tuple[int, float] | None:
    """(steps, seconds) at which C first fell to `threshold`, or None.

    Within a chunk the time is interpolated linearly in the step count; a run stopped at its
    target ends its last chunk there, so that time is exact.
    """
    costs = run.costs
    hits = np.nonzero(costs <= threshold)[0]
    if len(hits) == 0:
        return None
    k = int(hits[0])  # C(θ_k) ≤ threshold: k steps were needed
    for (s0, t0, *_), (s1, t1, *_) in zip(run.trace[:-1], run.trace[1:]):
        if s0 <= k <= s1:
            frac = 0.0 if s1 == s0 else (k - s0) / (s1 - s0)
            return k, t0 + frac * (t1 - t0)
    return k, run.trace[-1][1]


def time_to_error(run: Run, threshold: float) -> tuple[int, float] | None:
    """(steps, seconds) at the first chunk boundary where the error metric was ≤ `threshold`."""
    for step, seconds, _, error in run.trace:
        if error is not None and error <= threshold:
            return step, seconds
    return None


def rank(bp: BenchProblem, r: Run) -> tuple:
    """Sort key within a sweep: earliest time to the tightest error target, then to the cost
    target, then the final error (or cost)."""
    inf = float("inf")
    key = []
    for e in sorted(bp.error_targets):
        hit = time_to_error(r, e)
        key.append(inf if hit is None else hit[1])
    if bp.target is not None:
        hit = time_to_cost(r, bp.target)
        key.append(inf if hit is None else hit[1])
    final = r.trace[-1][3] if bp.error_fn is not None else r.trace[-1][2]
    key.append(final if final is not None and math.isfinite(final) else inf)
    return tuple(key)


def run_family(members: list[Method], bp: BenchProblem, budget_s: float, *,
               screen_fraction: float = 0.2, report=None) -> list[Run]:
    """Run a method family; a sweep (several members) is screened first.

    Every member runs for `screen_fraction`·`budget_s`; the best (by `rank`) then runs again
    with the whole budget, unless it already stopped on its own, and replaces its screening
    run. Runs are deterministic, so the rerun extends the screening run's trace.
    """
    if len(members) == 1:
        runs = [run(members[0], bp, budget_s=budget_s)]
    else:
        screen = budget_s * screen_fraction
        runs = []
        for m in members:
            runs.append(run(m, bp, budget_s=screen))
            if report:
                report(runs[-1], screened=True)
        i = min(range(len(runs)), key=lambda j: rank(bp, runs[j]))
        if runs[i].status == "budget":
            runs[i] = run(members[i], bp, budget_s=budget_s)
    if report:
        for r in runs:
            if r.budget_s == budget_s:
                report(r, screened=False)
    return runs
