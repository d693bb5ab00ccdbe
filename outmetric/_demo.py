"""The `outmetric demo` job: an overparametrised MLP fitted by the adapted flow and method, and
by a standard-gradient baseline, on the bundled dataset (or a user's CSV/NPZ)."""

import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from ._data import load_dataset
from ._fit import fit
from ._integrate import integrate, stopping_time
from ._models import mlp
from ._problem import Problem, num_parameters
from ._transform import output_metric_descent


class DemoRow(NamedTuple):
    method: str
    steps: int
    wall_time: float
    final_cost: float
    predicted_cost: float | None


class DemoReport(NamedTuple):
    rows: list[DemoRow]
    plot_path: str
    json_path: str
    num_samples: int
    num_params: int
    flow_samples: int


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - start


def run_demo(
    data: str | None = None,
    *,
    eps: float = 1e-10,
    out: str = "outmetric-demo",
    width: int = 64,
    flow_samples: int = 64,
    baseline_steps: int = 3000,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    compare: bool = False,
    compare_seconds: float = 60.0,
) -> DemoReport:
    r"""Fit an MLP $d$-`width`-`width`-Q (K ≥ QN) three ways and write a table and a plot.

    1. **Adapted flow** (diffrax) on the first `flow_samples` samples, integrated to the a priori
       stopping time $T(\varepsilon) = \frac N2\ln(C(0)/\varepsilon)$: measured C(T) against the
       prediction ε, and the whole path against $C(0)e^{-2s/N}$.
    2. **Output-metric descent** (`output_metric_descent`, adaptive damping) on all samples,
       to C ≤ ε.
    3. **Standard gradient baseline**: Adam (lr 1e-3) on all samples for `baseline_steps`.
    4. With `compare=True`, the second-order baselines on all samples, to C ≤ ε or
       `compare_seconds` of training each: optax L-BFGS (`baseline_steps` at most) and, when
       optimistix is installed, its `GaussNewton` and `LevenbergMarquardt` (200 steps at most).

    `eps` is the target cost. Writes `out/demo.png` and `out/demo.json`; returns a `DemoReport`.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not isinstance(flow_samples, int) or flow_samples < 1:
        raise ValueError(f"flow_samples must be a positive integer, got {flow_samples!r}")
    dataset = load_dataset(data)
    inputs = jnp.asarray(dataset.inputs)
    targets = jnp.asarray(dataset.targets)
    if max_samples is not None:
        inputs, targets = inputs[:max_samples], targets[:max_samples]
    num_samples, d_in = inputs.shape
    q = targets.shape[1]
    apply, params = mlp(jax.random.PRNGKey(seed), [d_in, width, width, q], "tanh")
    num_params = num_parameters(params)
    if num_params < q * num_samples:
        raise ValueError(
            f"width={width} gives K={num_params} parameters < QN={q * num_samples}: the demo is "
            "about the overparametrised regime; raise --width or lower --max-samples"
        )
    problem = Problem(apply, inputs, targets)
    os.makedirs(out, exist_ok=True)
    rows = []

    # 1. The adapted flow on a subset: the uniform rate and the a priori stopping time.
    m = min(flow_samples, num_samples)
    flow_problem = Problem(apply, inputs[:m], targets[:m])
    cost0 = float(flow_problem.cost(params))
    t_eps = stopping_time(cost0, eps, m)
    traj, seconds = _timed(lambda: integrate(flow_problem, params, eps=eps, rtol=1e-10,
                                             atol=1e-12, progress=progress))
    rows.append(DemoRow(f"adapted flow (N={m}, to T(eps)={t_eps:.1f})", traj.num_steps, seconds,
                        float(traj.costs[-1]), float(cost0 * np.exp(-2 * float(traj.ts[-1]) / m))))

    # 2. Output-metric descent and 3. the standard-gradient baseline, on all samples. Each is
    # compiled by a one-step warm-up first, so the wall times are those of training alone.
    history = {}
    methods = [
        ("output-metric descent", "outmetric", output_metric_descent(), 200, 1),
        ("adam (lr 1e-3)", "adam", optax.adam(1e-3), baseline_steps, max(1, baseline_steps // 50)),
    ]
    for label, key, optimizer, max_steps, chunk in methods:
        fit(problem, params, optimizer, max_steps=1, chunk_size=chunk, progress=False)
        times = []
        start = time.perf_counter()

        def timing(step, p, s, cost, times=times, start=start):
            times.append((step, time.perf_counter() - start, cost))

        result = fit(problem, params, optimizer, eps=eps, max_steps=max_steps, chunk_size=chunk,
                     callback=timing, progress=progress)
        seconds = time.perf_counter() - start
        history[key] = [(0, 0.0, float(result.costs[0]))] + times
        rows.append(DemoRow(label, result.num_steps, seconds, float(result.costs[-1]), None))

    # 4. The second-order baselines, each compiled and warmed up before its clock starts.
    if compare:
        for label, key, make, max_steps in _baselines(baseline_steps):
            try:
                stepper = make(problem, params)
            except ImportError as err:
                print(f"outmetric demo: skipping {label}: {err}")
                continue
            steps, seconds, points = _run_baseline(stepper, params, problem.cost, eps, max_steps,
                                                   compare_seconds)
            history[key] = points
            rows.append(DemoRow(label, steps, seconds, points[-1][2], None))

    plot_path = os.path.join(out, "demo.png")
    _plot(plot_path, traj, cost0, m, eps, t_eps, history)
    json_path = os.path.join(out, "demo.json")
    with open(json_path, "w") as f:
        json.dump({"dataset": dataset.name, "num_samples": num_samples, "num_params": num_params,
                   "eps": eps, "rows": [r._asdict() for r in rows]}, f, indent=2)
    return DemoReport(rows, plot_path, json_path, num_samples, num_params, m)


class _Stepper(NamedTuple):
    """A baseline as pure functions: `init(params) -> state`, `step(state) -> state`,
    `params(state) -> params`."""

    init: Callable
    step: Callable
    params: Callable


def _baselines(baseline_steps: int):
    """(label, key, make(problem, params) -> _Stepper, max_steps) for `--compare`."""
    return [
        ("L-BFGS (optax)", "lbfgs", _lbfgs, baseline_steps),
        ("Gauss-Newton (optimistix)", "optx-gn",
         lambda problem, params: _optimistix(problem, params, "GaussNewton"), 200),
        ("Levenberg-Marquardt (optimistix)", "optx-lm",
         lambda problem, params: _optimistix(problem, params, "LevenbergMarquardt"), 200),
    ]


def _lbfgs(problem: Problem, params=None) -> _Stepper:
    """`optax.lbfgs()` with its zoom line search, the gradient reused from the line search."""
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(problem.cost)

    def step(state):
        params, opt_state = state
        value, grads = value_and_grad(params, state=opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, params, value=value, grad=grads,
                                              value_fn=problem.cost)
        return optax.apply_updates(params, updates), opt_state

    return _Stepper(lambda p: (p, optimizer.init(p)), step, lambda s: s[0])


def _optimistix(problem: Problem, params, name: str) -> _Stepper:
    """An optimistix least-squares solver on the residual x − y, stepped through `solver.step`.

    Optimistix forms the Jacobian of the stacked residual itself; reverse mode
    (``jac="bwd"``) when QN ≤ K, else its default forward mode.
    """
    try:
        import optimistix as optx
    except ImportError:
        raise ImportError("optimistix is not installed (pip install optimistix)") from None
    solver = getattr(optx, name)(rtol=1e-14, atol=1e-16)
    wide = problem.num_samples * problem.output_dim <= num_parameters(params)
    options = {"jac": "bwd" if wide else "fwd"}
    tags = frozenset()

    def fn(params, args):
        return (problem.outputs(params) - problem.targets).reshape(-1), None

    def init(params):
        f_struct, aux_struct = jax.eval_shape(lambda: fn(params, None))
        return params, solver.init(fn, params, None, options, f_struct, aux_struct, tags)

    def step(state):
        params, solver_state = state
        params, solver_state, _ = solver.step(fn, params, None, options, solver_state, tags)
        return params, solver_state

    return _Stepper(init, step, lambda s: s[0])


def _run_baseline(stepper: _Stepper, params, cost_fn, eps: float, max_steps: int,
                  max_seconds: float):
    """Run a baseline in compiled chunks until C ≤ eps, `max_steps` or `max_seconds`.

    Returns (steps, training seconds, [(step, seconds, cost), ...] at chunk ends). The chunk is
    compiled and run once before timing; only the array part of the state enters the compiled
    loop (optimistix keeps jaxprs in its state).
    """
    import equinox as eqx

    state, static = eqx.partition(stepper.init(params), eqx.is_array)

    def cost_of(dyn):
        return cost_fn(stepper.params(eqx.combine(dyn, static)))

    def chunk(dyn, num, eps):
        def cond(carry):
            i, dyn = carry
            return (i < num) & (cost_of(dyn) > eps)

        def body(carry):
            i, dyn = carry
            new = stepper.step(eqx.combine(dyn, static))
            return i + 1, eqx.filter(new, eqx.is_array)

        i, dyn = jax.lax.while_loop(cond, body, (jnp.asarray(0), dyn))
        return i, dyn, cost_of(dyn)

    chunk = jax.jit(chunk)
    eps_value = jnp.asarray(eps, jax.flatten_util.ravel_pytree(params)[0].dtype)
    # Compile and warm up. Twice: the state a step returns may differ from the initial one in
    # weak types (optax's L-BFGS state), which is a second compilation of its own.
    _, warm, _ = chunk(state, jnp.asarray(1), eps_value)
    jax.block_until_ready(chunk(warm, jnp.asarray(1), eps_value))
    points = [(0, 0.0, float(cost_of(state)))]
    steps, seconds, num = 0, 0.0, 1
    while steps < max_steps and seconds < max_seconds and points[-1][2] > eps:
        num = min(num, max_steps - steps)
        start = time.perf_counter()
        taken, state, cost = jax.block_until_ready(chunk(state, jnp.asarray(num), eps_value))
        seconds += time.perf_counter() - start
        steps += int(taken)
        points.append((steps, seconds, float(cost)))
        if not np.isfinite(points[-1][2]) or int(taken) < num:
            break
        num *= 2
    return steps, seconds, points


def _plot(path, traj, cost0, num_samples, eps, t_eps, history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ts = np.asarray(traj.ts)
    ax0.semilogy(ts, np.asarray(traj.costs), "o", ms=3, label="adapted flow (measured)")
    ax0.semilogy(ts, cost0 * np.exp(-2 * ts / num_samples), "-", label=r"$C(0)e^{-2s/N}$")
    ax0.axhline(eps, color="gray", ls=":", label=r"$\varepsilon$")
    ax0.axvline(t_eps, color="gray", ls="--", label=r"$T(\varepsilon)$")
    ax0.set_xlabel("flow time s")
    ax0.set_ylabel("cost C")
    ax0.set_title(f"adapted flow, N={num_samples}")
    ax0.legend()
    for name, points in history.items():
        arr = np.asarray(points)
        ax1.semilogy(arr[:, 1], arr[:, 2], "-o", ms=2, label=name)
    ax1.axhline(eps, color="gray", ls=":")
    ax1.set_xlabel("wall time [s]")
    ax1.set_ylabel("cost C")
    ax1.set_title("training on all samples")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report: DemoReport) -> str:
    """The demo's results as a Markdown table."""
    lines = [
        "| method | steps | wall time [s] | final cost | predicted cost |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        pred = "" if r.predicted_cost is None else f"{r.predicted_cost:.3e}"
        lines.append(f"| {r.method} | {r.steps} | {r.wall_time:.2f} | {r.final_cost:.3e} | {pred} |")
    return "\n".join(lines)
