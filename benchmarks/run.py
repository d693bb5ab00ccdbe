"""The benchmark command: every method on every problem, in one process.

    python -m benchmarks.run [--quick] [--problems NAME ...] [--methods NAME ...] [--out DIR]
    python -m benchmarks.run --from-results DIR [--out DIR2]   # re-render only, runs nothing

Writes, under `--out` (default `benchmarks/results`):

- `<problem>.json`: the machine, the problem, and every run (sweeps included) with its trace
  of (step, seconds, cost, error) at chunk boundaries, its status and memory;
- `<problem>.png`: C/C(0) against wall time and against steps (log scales), and the error
  metric against wall time where the problem has one;
- `summary.md`: one table per problem and the targets of issues #3 and #5, met or missed, with
  the measured ratios; `summary.json`: the same numbers; `summary.png`: time and steps to
  target, cost (and error) at a fixed time budget, and memory for every problem and method.

The fixed time budget T of a problem is its per-run budget (`budget_seconds`; the PINN's Adam
gets 80 s instead of 10 s, T stays 10 s). A run's cost and error at T are those of the last
trace point with seconds ≤ T; a run that stopped earlier (at its target, or diverged) keeps its
final value. `--from-results DIR` rebuilds the summary and every plot from the `<problem>.json`
files in DIR (into `--out`, by default DIR itself) without running anything.

Times are wall-clock seconds of training only: each method's chunk of steps is compiled and
run once before the clock starts. float64 throughout. `--quick` builds small problems with
sub-second budgets (the smoke run of the test suite): its numbers mean nothing.
"""

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from .methods import Run, all_methods, run_family, time_to_cost, time_to_error  # noqa: E402
from .problems import PROBLEMS, BenchProblem  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: The targets of issue #3 (regressions) and issue #5 (PINN): (problem, kind, factor).
TARGETS = [
    ("oscillating", "first-order", 10.0),
    ("oscillating", "optimistix", 3.0),
    ("diabetes", "first-order", 3.0),
    ("diabetes", "optimistix", 3.0),
    ("pinn_poisson", "pinn", 10.0),
]
FIRST_ORDER = ("adam", "lbfgs")
OPTIMISTIX = ("optx-gn", "optx-lm")


# ----------------------------------------------------------------------------- the machine


def machine_info() -> dict:
    """CPU model, cores, memory, library versions and the JAX backend."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for name in ("jax", "jaxlib", "optax", "optimistix", "lineax", "equinox", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed or no __version__
            versions[name] = None
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "float": "float64",
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "versions": versions,
        "load_average_start": _loadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line(info: dict) -> str:
    v = info["versions"]
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; "
            f"{info['backend']} backend, jax {v.get('jax')}, optax {v.get('optax')}, "
            f"optimistix {v.get('optimistix')}; {info['float']}; OPENBLAS_NUM_THREADS="
            f"{info.get('openblas_num_threads')}; {info['date']}")


# ----------------------------------------------------------------------------- one problem


def _fmt_time(x):
    return "—" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def _fmt_sci(x):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def _downsample(trace, max_points=150, keep_seconds=None):
    """Keep at most about `max_points` trace points, log-spaced in the step count, with the ends
    and the last point at or before `keep_seconds` (the fixed budget), if given."""
    if len(trace) <= max_points:
        return trace
    steps = np.array([p[0] for p in trace], float)
    marks = np.unique(np.geomspace(1, steps[-1] + 1, max_points).astype(int) - 1)
    keep = {0, len(trace) - 1} | {int(np.searchsorted(steps, m)) for m in marks}
    if keep_seconds is not None:
        keep.add(_index_at(trace, keep_seconds))
    return [trace[i] for i in sorted(keep) if i < len(trace)]


def _index_at(trace, seconds):
    """Index of the last trace point with time ≤ `seconds` (the first point is at 0 s)."""
    i = 0
    for j, p in enumerate(trace):
        if p[1] <= seconds:
            i = j
        else:
            break
    return i


def _num(x):
    """A trace value as a float (None stays None)."""
    return None if x is None else float(x)


def add_fixed_budget(data: dict) -> dict:
    """Cost and error of every run at the problem's fixed time budget T (in place).

    T is the problem's per-run budget `budget_seconds` (families with a longer budget, Adam on
    the PINN, are cut at T). Each run gets the last trace point with seconds ≤ T:
    `cost_at_budget`, `relative_cost_at_budget`, `error_at_budget` (None without an error
    metric), `budget_point` (its step and time) and `stopped_before_budget` (the run ended on
    its own before T, at its target or diverged, so these are its final values).
    """
    budget = float(data["budget_seconds"])
    data["fixed_budget_seconds"] = budget
    for row in data["runs"].values():
        trace = row["trace"]
        step, seconds, cost, error = trace[_index_at(trace, budget)]
        row["budget_point"] = {"step": int(step), "seconds": float(seconds)}
        row["cost_at_budget"] = _num(cost)
        row["relative_cost_at_budget"] = float(cost) / data["cost0"]
        row["error_at_budget"] = _num(error)
        row["stopped_before_budget"] = row["status"] != "budget" and trace[-1][1] <= budget
    return data


def _final_error(r: Run):
    return r.trace[-1][3]


def summarise(bp: BenchProblem, runs: list[Run], fixed_budget: float | None = None) -> dict:
    """Thresholds, time to target for every run, and the best member of each sweep.

    The stored traces are downsampled; they keep the point a run had reached at `fixed_budget`.
    """
    cost0 = bp.cost0
    finite = [float(np.nanmin(r.costs)) for r in runs if np.isfinite(np.nanmin(r.costs))]
    best_cost = min(finite) if finite else float("nan")
    if bp.target is not None:
        threshold = bp.target
        threshold_text = f"C ≤ {bp.target / cost0:.0e}·C(0)"
    else:
        threshold = (1 + bp.relative_gap) * best_cost
        threshold_text = (f"C ≤ {1 + bp.relative_gap:g}·C_best (C_best = {best_cost / cost0:.3e}·C(0), "
                          "the lowest cost any method reached)")
    rows = {}
    for r in runs:
        hit = time_to_cost(r, threshold)
        row = {
            "method": r.method,
            "family": r.family,
            "status": r.status,
            "steps": r.steps,
            "seconds": r.seconds,
            "compile_seconds": r.compile_seconds,
            "ms_per_step": 1e3 * r.seconds / max(r.steps, 1),
            "final_cost": float(r.costs[-1]),
            "final_relative_cost": float(r.costs[-1]) / cost0,
            "min_cost": float(np.nanmin(r.costs)) if np.isfinite(np.nanmin(r.costs)) else None,
            "final_error": _final_error(r),
            "memory_mb": r.memory_bytes / 2**20 if r.memory_bytes >= 0 else None,
            "budget_seconds": r.budget_s,
            "steps_to_target": None if hit is None else hit[0],
            "seconds_to_target": None if hit is None else hit[1],
            "error_targets": {},
            "trace": [list(p) for p in _downsample(r.trace, keep_seconds=fixed_budget)],
        }
        for e in bp.error_targets:
            hit_e = time_to_error(r, e)
            row["error_targets"][f"{e:g}"] = (None if hit_e is None else
                                              {"steps": hit_e[0], "seconds": hit_e[1]})
        rows[r.method] = row
    best = {}
    for family in dict.fromkeys(r.family for r in runs):
        members = [rows[r.method] for r in runs if r.family == family]
        best[family] = min(members, key=lambda row: _rank(bp, row))["method"]
    return {"threshold": threshold, "threshold_text": threshold_text, "best_cost": best_cost,
            "runs": rows, "best_of_family": best}


def _rank(bp: BenchProblem, row: dict):
    """Sort key for a sweep: earliest time to the tightest target reached, then final value."""
    inf = float("inf")
    key = []
    for e in sorted(bp.error_targets):
        hit = row["error_targets"][f"{e:g}"]
        key.append(inf if hit is None else hit["seconds"])
    key.append(inf if row["seconds_to_target"] is None else row["seconds_to_target"])
    final = row["final_error"] if bp.error_fn is not None else row["final_relative_cost"]
    key.append(final if final is not None and math.isfinite(final) else inf)
    return tuple(key)


def problem_json(bp: BenchProblem, info: dict, summary: dict, methods) -> dict:
    notes = {m.name: m.note for m in methods if m.note}
    return {
        "problem": bp.name,
        "description": bp.description,
        "regime": bp.regime,
        "num_params": bp.num_params,
        "num_outputs": bp.num_outputs,
        "cost0": bp.cost0,
        "budget_seconds": bp.budget_s,
        "max_steps": bp.max_steps,
        "error_metric": bp.error_name,
        "error_targets": list(bp.error_targets),
        "machine": info,
        "method_notes": notes,
        **summary,
    }


# ----------------------------------------------------------------------------- plots

_STYLE = {
    "outmetric": ("C0", "-"), "outmetric-bt": ("C9", "-"), "outmetric-plain": ("C2", "-"),
    "outmetric-cg": ("C4", "-"), "outmetric-cg-plain": ("C6", "-"),
    "sgd": ("C7", "--"), "adam": ("C1", "--"), "lbfgs": ("C3", "--"),
    "optx-gn": ("C5", ":"), "optx-lm": ("C8", ":"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_problem(path: str, data: dict) -> None:
    """C/C(0) against wall time and steps (log-log), plus the error metric if any."""
    plt = _pyplot()
    has_error = bool(data["error_targets"])
    fig, axes = plt.subplots(1, 3 if has_error else 2, figsize=(15 if has_error else 11, 4.2))
    cost0 = data["cost0"]
    for family, name in data["best_of_family"].items():
        row = data["runs"][name]
        trace = np.array([[p[0], p[1], p[2], np.nan if p[3] is None else p[3]]
                          for p in row["trace"]], float)
        color, ls = _STYLE.get(family, (None, "-"))
        label = name if family == name else f"{name} (best of sweep)"
        for ax, x in ((axes[0], trace[:, 1]), (axes[1], trace[:, 0])):
            keep = x > 0
            ax.loglog(x[keep], trace[keep, 2] / cost0, ls, color=color, lw=1.5, label=label)
        if has_error:
            keep = trace[:, 1] > 0
            axes[2].loglog(trace[keep, 1], trace[keep, 3], ls, color=color, lw=1.5, label=label)
    for ax in axes[:2]:
        ax.axhline(data["threshold"] / cost0, color="gray", ls=":", lw=1)
        ax.set_ylabel("C / C(0)")
    fixed = data.get("fixed_budget_seconds", data["budget_seconds"])
    for ax in (axes[0], axes[2]) if has_error else (axes[0],):
        ax.axvline(fixed, color="gray", ls="--", lw=0.8)
    axes[0].set_xlabel("wall time [s] (after compilation)")
    axes[1].set_xlabel("steps")
    if has_error:
        for e in data["error_targets"]:
            axes[2].axhline(e, color="gray", ls=":", lw=1)
        axes[2].set_xlabel("wall time [s]")
        axes[2].set_ylabel(data["error_metric"])
    axes[0].set_title(f"{data['problem']}: K = {data['num_params']}, QN = {data['num_outputs']}")
    if has_error:
        axes[1].set_title(f"cost target: none; {data['error_metric']} targets "
                          + ", ".join(f"{e:g}" for e in data["error_targets"]), fontsize=8)
    else:
        axes[1].set_title(data["threshold_text"], fontsize=8)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _summary_bars(data: dict, row: dict) -> dict:
    """One method's bars in summary.png: time and steps to target, values at T, memory."""
    if data["error_targets"]:  # the PINN: the tightest error target
        hit = row["error_targets"][f"{min(data['error_targets']):g}"]
        seconds_to, steps_to = (None, None) if hit is None else (hit["seconds"], hit["steps"])
    else:
        seconds_to, steps_to = row["seconds_to_target"], row["steps_to_target"]
    reached = seconds_to is not None

    def finite(x):
        return x if x is not None and math.isfinite(x) else np.nan

    return {
        "time": seconds_to if reached else row["seconds"],
        "steps": max(steps_to if reached else row["steps"], 1),
        "missed": not reached,
        "cost": finite(row["relative_cost_at_budget"]),
        "error": finite(row["error_at_budget"]),
        "stopped": row["stopped_before_budget"],
        "memory": finite(row["memory_mb"]),
    }


def plot_summary(path: str, results: dict) -> None:
    """Grouped bars per problem: time and steps to target, C/C(0) and error at the fixed budget
    T, memory."""
    plt = _pyplot()
    for data in results.values():
        if "fixed_budget_seconds" not in data:
            add_fixed_budget(data)
    problems = list(results)
    families = list(dict.fromkeys(f for d in results.values() for f in d["best_of_family"]))
    panels = [
        ("time", "time to target [s]\n(PINN: error ≤ 1e-6;\nhatched: not reached,\n"
                 "bar = time spent)"),
        ("steps", "steps to target\n(hatched: not reached,\nbar = steps taken)"),
        ("cost", "C / C(0) at T\n(hollow: stopped before T,\nits final value)"),
        ("error", "error at T\n(hollow: stopped\nbefore T)"),
        ("memory", "XLA memory of a\ncompiled chunk [MiB]"),
    ]
    with_error = [bool(results[p]["error_targets"]) for p in problems]
    if not any(with_error):
        panels = [pn for pn in panels if pn[0] != "error"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 2.6 * len(panels) + 1.2), sharex=True)
    width = 0.8 / max(len(families), 1)
    x = np.arange(len(problems))
    nan = {"time": np.nan, "steps": np.nan, "missed": False, "cost": np.nan, "error": np.nan,
           "stopped": False, "memory": np.nan}
    for j, family in enumerate(families):
        color = _STYLE.get(family, (None,))[0]
        bars_of = []
        for p in problems:
            d = results[p]
            name = d["best_of_family"].get(family)
            row = d["runs"].get(name) if name else None
            bars_of.append(nan if row is None else _summary_bars(d, row))
        pos = x - 0.4 + (j + 0.5) * width
        for ax, (key, _) in zip(axes, panels):
            values = [b[key] for b in bars_of]
            bars = ax.bar(pos, values, width, color=color, label=family if key == "time" else None)
            for i, (bar, b, value) in enumerate(zip(bars, bars_of, values)):
                if key in ("time", "steps") and b["missed"]:
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
                if key not in ("cost", "error") or b is nan:
                    continue
                if not math.isfinite(value) and (key == "cost" or with_error[i]):
                    ax.text(bar.get_x() + bar.get_width() / 2, 0.02, "×", color=color,
                            ha="center", va="bottom", fontsize=9,
                            transform=ax.get_xaxis_transform())
                elif b["stopped"]:
                    bar.set_facecolor("none")
                    bar.set_edgecolor(color)
    for ax, (key, label) in zip(axes, panels):
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=9)
    if "error" in dict(panels):
        ax = axes[[k for k, _ in panels].index("error")]
        for i, has in enumerate(with_error):
            if not has:
                ax.text(i, 0.5, "no error metric", ha="center", va="center", color="gray",
                        fontsize=8, transform=ax.get_xaxis_transform())
    labels = [f"{p}\nT = {results[p]['fixed_budget_seconds']:g} s" for p in problems]
    axes[-1].set_xticks(x, labels)
    longer = [f"{fam} on {p} ran {b:g} s" for p in problems
              for fam, b in results[p].get("family_budgets", {}).items()
              if b > results[p]["fixed_budget_seconds"]]
    axes[0].set_title("T: the problem's per-run budget"
                      + (f" ({'; '.join(longer)}: cut at T)" if longer else "")
                      + ".  × at T: diverged (non-finite) before T.", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), ncol=len(families), fontsize=8,
               loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ----------------------------------------------------------------------------- targets


def _seconds(row, kind, error_target=None):
    if error_target is not None:
        hit = row["error_targets"].get(f"{error_target:g}")
        return None if hit is None else hit["seconds"]
    return row["seconds_to_target"]


def evaluate_targets(results: dict, outmetric_methods=("outmetric",)) -> list[dict]:
    """Each target of issues #3/#5, for the default `outmetric` and the fastest outmetric variant.

    Verdicts: "met"/"missed" when both reached their targets; when the baseline did not, its
    run either ended on its own without reaching it (diverged or stalled: "met", the ratio is
    infinite) or ran out of budget, in which case the ratio is only a lower bound: "met" if
    even the bound clears the factor, else "open" (not shown either way).
    """
    out = []
    for problem, kind, factor in TARGETS:
        data = results.get(problem)
        if data is None:
            continue
        runs = data["runs"]
        best_of = data["best_of_family"]
        variants = [n for n in runs if runs[n]["family"].startswith("outmetric")]
        om_error = 1e-6 if kind == "pinn" else None
        base_error = 1e-3 if kind == "pinn" else None
        families = {"first-order": FIRST_ORDER, "optimistix": OPTIMISTIX, "pinn": ("adam",)}[kind]
        baselines = [best_of[f] for f in families if f in best_of]

        def compare(om_name, base_name):
            t_om = _seconds(runs[om_name], kind, om_error)
            base = runs[base_name]
            t_base = _seconds(base, kind, base_error)
            entry = {"problem": problem, "kind": kind, "outmetric": om_name,
                     "baseline": base_name, "factor": factor, "outmetric_seconds": t_om,
                     "baseline_seconds": t_base, "baseline_status": base["status"],
                     "ratio": None, "lower_bound": False}
            if t_om is None:
                entry["verdict"] = "missed"
            elif t_base is not None:
                entry["ratio"] = t_base / t_om
                entry["verdict"] = "met" if entry["ratio"] >= factor else "missed"
            elif base["status"] in ("non-finite", "halted"):
                entry["ratio"] = float("inf")
                entry["verdict"] = "met"
            else:  # out of budget: the time it ran bounds its time to target from below
                entry["ratio"] = base["seconds"] / t_om
                entry["lower_bound"] = True
                entry["verdict"] = "met" if entry["ratio"] >= factor else "open"
            entry["met"] = entry["verdict"] == "met"
            return entry

        def strength(entry):  # the baseline that makes the comparison hardest
            order = {"missed": 0, "open": 1, "met": 2}[entry["verdict"]]
            return order, entry["ratio"] if entry["ratio"] is not None else 0.0

        fastest_variant = min(
            variants, key=lambda n: _seconds(runs[n], kind, om_error) or float("inf"))
        for om_name in dict.fromkeys([*outmetric_methods, fastest_variant]):
            if om_name not in runs:
                continue
            entries = [compare(om_name, b) for b in baselines]
            if kind != "optimistix" and entries:  # against the best of the first-order methods
                entries = [min(entries, key=strength)]
            out.extend(entries)
    return out


def _describe_target(t: dict) -> str:
    if t["kind"] == "pinn":
        what = "rel. L² error ≤ 1e-6 vs Adam to 1e-3"
    else:
        what = "C ≤ 1e-10·C(0)"
    if t["outmetric_seconds"] is None:
        ratio = "outmetric did not reach the target"
    elif t["ratio"] == float("inf"):
        ratio = f"∞ (baseline: {t['baseline_status']})"
    else:
        ratio = (">" if t["lower_bound"] else "") + f"{t['ratio']:.1f}×"
    return (f"| {t['problem']} | {what} | {t['outmetric']} vs {t['baseline']} | ≥ {t['factor']:g}× | "
            f"{ratio} | {_fmt_time(t['outmetric_seconds'])} / {_fmt_time(t['baseline_seconds'])} | "
            f"{t['verdict']} |")


# ----------------------------------------------------------------------------- markdown


def _load_note(info: dict) -> str:
    """A sentence on the machine's load during the run (from the recorded load averages)."""
    loads = [x for key in ("load_average_start", "load_average_end")
             for x in (info.get(key) or [])]
    if not loads:
        return ""
    lo, hi = min(loads), max(loads)
    cores = info.get("cores")
    busy = cores is not None and hi >= 0.5 * cores
    return (f"Timings were taken on a {'shared ' if busy else ''}{cores}-core machine under "
            f"load {lo:g}–{hi:g} (1-, 5- and 15-minute load averages at start and end, "
            "`machine` in the JSON files)"
            + (": other work competed for the cores, so absolute times are inflated and noisy; "
               "compare methods within this run rather than across machines or runs."
               if busy else "."))


def _fmt_at_budget(x, row):
    """A value at the fixed budget; `*` marks a run that stopped before T (its final value)."""
    if x is None or not math.isfinite(x):
        return "non-finite" if row["status"] == "non-finite" else "—"
    return f"{x:.2e}" + ("*" if row["stopped_before_budget"] else "")


def problem_table(data: dict) -> str:
    errs = data["error_targets"]
    if "fixed_budget_seconds" not in data:
        add_fixed_budget(data)
    budget = data["fixed_budget_seconds"]
    head = ["method", "status", "steps", "time [s]", "ms/step", "steps to target",
            "time to target [s]", "final C/C(0)"]
    if errs:
        head += ["final error"] + [f"time to error ≤ {e:g} [s]" for e in errs]
    head += [f"C/C(0) at T = {budget:g} s"]
    if errs:
        head += [f"error at T = {budget:g} s"]
    head += ["memory [MiB]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, name in data["best_of_family"].items():
        row = data["runs"][name]
        cells = [name, row["status"], str(row["steps"]), _fmt_time(row["seconds"]),
                 f"{row['ms_per_step']:.3g}",
                 "—" if row["steps_to_target"] is None else str(row["steps_to_target"]),
                 _fmt_time(row["seconds_to_target"]), _fmt_sci(row["final_relative_cost"])]
        if errs:
            cells.append(_fmt_sci(row["final_error"]))
            for e in errs:
                hit = row["error_targets"][f"{e:g}"]
                cells.append("—" if hit is None else _fmt_time(hit["seconds"]))
        cells.append(_fmt_at_budget(row["relative_cost_at_budget"], row))
        if errs:
            cells.append(_fmt_at_budget(row["error_at_budget"], row))
        cells.append("—" if row["memory_mb"] is None else f"{row['memory_mb']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _target_text(data: dict) -> str:
    if data.get("error_targets"):
        return (f"{data['error_metric']} ≤ " + " and ≤ ".join(f"{e:g}" for e in data["error_targets"])
                + f" (the cost columns use {data['threshold_text']})")
    return data["threshold_text"]


def summary_markdown(results: dict, targets: list[dict], info: dict, quick: bool,
                     total_seconds: float) -> str:
    out = ["# Benchmark results", ""]
    if quick:
        out += ["**`--quick` smoke run: tiny problems and sub-second budgets; the numbers mean "
                "nothing.**", ""]
    whole = ("" if total_seconds is None or not math.isfinite(total_seconds)
             else f" Whole run: {total_seconds:.0f} s.")
    out += [f"Machine: {machine_line(info)}. Load average at start "
            f"{info.get('load_average_start')}, at end {info.get('load_average_end')}.{whole}", ""]
    load = _load_note(info)
    if load:
        out += [load, ""]
    out += ["Times are wall-clock seconds of training after compilation, all methods in one "
            "process. `—`: not reached within the budget. Sweeps (sgd, adam) run every learning "
            "rate for a fifth of the budget, then the best one for the whole budget; the tables "
            "show that one, the JSON files every run. Memory: XLA's buffer assignment for a "
            "compiled chunk of steps (arguments + temporaries + outputs).", "",
            "*At T*: the cost (and, for the PINN, the error) at a fixed time budget T, the same "
            "for every method of a problem: its per-run budget (Adam's longer PINN budget is cut "
            "at T). The value is that of the last recorded trace point (chunk boundary) with time "
            "≤ T; `budget_point` in summary.json gives its step and time (stored traces are "
            "downsampled, so for fast methods it can lie up to about a tenth of T early; runs "
            "made since T was introduced keep the exact point). `*`: the run stopped before T — it reached its target (or the step cap), so "
            "this is its final value. `non-finite`: it diverged before T. The *final* columns "
            "are where each run stopped, which for runs that reach the target early is not a "
            "comparison at equal time.", ""]
    if targets:
        out += ["## Targets", "",
                "| problem | target | comparison | wanted | measured | seconds (outmetric / "
                "baseline) | |", "|---|---|---|---|---|---|---|"]
        out += [_describe_target(t) for t in targets]
        out += ["", "A ratio `>X×` is a lower bound: the baseline ran out of budget before its "
                "target, and X uses the whole time it ran (verdict `open` when that bound is "
                "below the factor). `∞`: the baseline stopped on its own (diverged or stalled) "
                "without reaching it.", ""]
    notes = next(iter(results.values()), {}).get("method_notes", {}) if results else {}
    if notes:
        out += ["## Methods", "", "| method | what |", "|---|---|"]
        out += [f"| {name} | {note} |" for name, note in notes.items()]
        out += ["| sgd, adam | `optax.sgd`, `optax.adam`, learning rates "
                "1e-2/1e-1/1 and 1e-4/1e-3/1e-2 |", ""]
    for name, data in results.items():
        out += [f"## {name}", "", f"{data['description']}: K = {data['num_params']}, "
                f"QN = {data['num_outputs']}, C(0) = {data['cost0']:.4g}; target "
                f"{_target_text(data)}; budget {data['budget_seconds']:g} s per run"
                + "".join(f", {k} {v:g} s" for k, v in data.get("family_budgets", {}).items())
                + f"; fixed budget T = {data['fixed_budget_seconds']:g} s.", "",
                problem_table(data), "", f"![{name}]({name}.png)", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small problems, sub-second budgets (smoke run)")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS),
                        metavar="NAME", help=f"subset of {list(PROBLEMS)}")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="subset of methods (names or families, e.g. adam outmetric)")
    parser.add_argument("--out", default=None, help="output folder (default "
                        "benchmarks/results; with --from-results, that folder)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every problem's time budget")
    parser.add_argument("--from-results", metavar="DIR", default=None,
                        help="run nothing: re-render summary.md/.json/.png and the per-problem "
                        "plots from the <problem>.json files in DIR (written to --out, by "
                        "default DIR)")
    parser.add_argument("--summary-only", action="store_true",
                        help="same as --from-results with the --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_results is not None or args.summary_only:
        source = args.from_results or args.out or DEFAULT_OUT
        return from_results(source, args.out or source, args.problems, quick=args.quick)
    args.out = args.out or DEFAULT_OUT
    start = time.perf_counter()
    info = machine_info()
    methods = all_methods(args.quick)
    if args.methods:
        methods = [m for m in methods if m.name in args.methods or m.family in args.methods]
        if not methods:
            print(f"no method matches {args.methods}", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine_line(info)}", flush=True)
    results = {}
    for name in args.problems:
        bp = PROBLEMS[name](args.quick)
        budget = bp.budget_s * args.budget_scale
        print(f"\n== {name}: {bp.description}; K={bp.num_params}, QN={bp.num_outputs}, "
              f"budget {budget:g} s", flush=True)
        runs = []

        def report(r, screened, bp=bp):
            print(f"  {r.method:20s} {r.status:10s} steps {r.steps:7d}  {r.seconds:7.2f} s  "
                  f"C/C(0) {r.costs[-1] / bp.cost0:.2e}"
                  + ("" if r.trace[-1][3] is None else f"  error {r.trace[-1][3]:.2e}")
                  + ("  (screening)" if screened else ""), flush=True)

        for family in dict.fromkeys(m.family for m in methods):
            members = [m for m in methods if m.family == family]
            family_budget = bp.family_budgets.get(family, bp.budget_s) * args.budget_scale
            runs += run_family(members, bp, family_budget, report=report)
        data = problem_json(bp, info, summarise(bp, runs, fixed_budget=budget), methods)
        data["budget_seconds"] = budget
        data["family_budgets"] = {k: v * args.budget_scale for k, v in bp.family_budgets.items()}
        data["quick"] = args.quick
        add_fixed_budget(data)
        results[name] = data
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1, allow_nan=True)
        plot_problem(os.path.join(args.out, f"{name}.png"), data)
    info["load_average_end"] = _loadavg()
    write_summary(results, info, args.quick, time.perf_counter() - start, args.out)
    return 0


def write_summary(results: dict, info: dict, quick: bool, total: float, out: str) -> None:
    """summary.md, summary.json and summary.png from the per-problem results; prints the targets."""
    for data in results.values():
        add_fixed_budget(data)
    targets = evaluate_targets(results)
    md = summary_markdown(results, targets, info, quick, total)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    summary = {
        "machine": info, "quick": quick, "total_seconds": total, "targets": targets,
        "problems": {n: {k: v for k, v in d.items() if k != "runs"} | {
            "table": {fam: {k: v for k, v in d["runs"][m].items() if k != "trace"}
                      for fam, m in d["best_of_family"].items()}} for n, d in results.items()},
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    if results:
        plot_summary(os.path.join(out, "summary.png"), results)
    print()
    for t in targets:
        print(_describe_target(t))
    took = f"; {total:.0f} s in all" if total is not None and math.isfinite(total) else ""
    print(f"\nresults: {os.path.join(out, 'summary.md')} (and .json, .png per problem){took}")


def from_results(source: str, out: str, problems=None, quick: bool = False) -> int:
    """Re-render summary.md/.json/.png and the per-problem plots from `<problem>.json` files.

    Runs nothing. The machine, `--quick` flag and total time come from `source`'s summary.json
    when there is one, else from the problem files (the total time is then unknown).
    """
    results = {}
    for name in problems or PROBLEMS:
        path = os.path.join(source, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            if "runs" in data:
                results[name] = data
    if not results:
        print(f"no <problem>.json results in {source}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    previous = {}
    summary_path = os.path.join(source, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            previous = json.load(f)
    first = next(iter(results.values()))
    info = previous.get("machine") or first["machine"]
    quick = previous.get("quick", first.get("quick", quick))
    for name, data in results.items():
        add_fixed_budget(data)
        plot_problem(os.path.join(out, f"{name}.png"), data)
    write_summary(results, info, quick, previous.get("total_seconds", float("nan")), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
