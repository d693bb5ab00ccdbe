"""The `outmetric demo` job: an overparametrised MLP fitted by the adapted flow and method, and
by a standard-gradient baseline, on the bundled dataset (or a user's CSV/NPZ)."""

import json
import os
import time
from typing import NamedTuple

import jax
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
) -> DemoReport:
    r"""Fit an MLP $d$-`width`-`width`-Q (K ≥ QN) three ways and write a table and a plot.

    1. **Adapted flow** (diffrax) on the first `flow_samples` samples, integrated to the a priori
       stopping time $T(\varepsilon) = \frac N2\ln(C(0)/\varepsilon)$: measured C(T) against the
       prediction ε, and the whole path against $C(0)e^{-2s/N}$.
    2. **Output-metric descent** (`output_metric_descent`, adaptive damping) on all samples,
       to C ≤ ε.
    3. **Standard gradient baseline**: Adam (lr 1e-3) on all samples for `baseline_steps`.

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

    plot_path = os.path.join(out, "demo.png")
    _plot(plot_path, traj, cost0, m, eps, t_eps, history)
    json_path = os.path.join(out, "demo.json")
    with open(json_path, "w") as f:
        json.dump({"dataset": dataset.name, "num_samples": num_samples, "num_params": num_params,
                   "eps": eps, "rows": [r._asdict() for r in rows]}, f, indent=2)
    return DemoReport(rows, plot_path, json_path, num_samples, num_params, m)


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
