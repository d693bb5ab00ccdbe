"""Why the trust region crawls on a PINN, and what the geodesic acceleration changes.

    python -m benchmarks.trust_diagnostics [--problem heat|poisson2d] [--steps 1000] [--out DIR]

Runs `output_metric_descent()` (the default) with and without `geodesic_acceleration` on a
`benchmarks.pinn` problem (pointwise form), one jitted update at a time, and records per update
C, the carried λ and trust radius Δ (`state.damping`, `state.radius`), and — through a wrapper
around `outmetric._search.evaluate` — the gain ratio ρ and scaled length of the trial that was
taken (with the acceleration, the better of the plain and the accelerated trial, as the search
takes it). Summaries per block of 100 updates: median ρ, the share of updates whose step lay on
the trust boundary (length within 10 % of Δ), median Δ and the median per-update C_{k+1}/C_k;
the L² error every 100 updates. Writes `trust_diagnostics_<problem>.json` and prints Markdown.
"""

import argparse
import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import outmetric as om  # noqa: E402
from outmetric import _search  # noqa: E402

from .pinn import BUILDERS  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(name: str, steps: int, acceleration: bool) -> dict:
    trials = []
    original = _search.evaluate

    def evaluate(*args, **kwargs):
        trial = original(*args, **kwargs)
        jax.debug.callback(lambda *v: trials.append([float(x) for x in v]), trial.ratio,
                           trial.length, trial.actual)
        return trial

    _search.evaluate = evaluate
    try:
        bench = BUILDERS[name](False)
        problem, params = bench.residual, bench.params
        opt = om.output_metric_descent(geodesic_acceleration=acceleration)
        update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))
        state = opt.init(params)
        rows, errors = [], {}
        for k in range(steps):
            start, radius = len(trials), float(state.radius)
            u, state = update(state, params)
            params = jax.tree_util.tree_map(lambda a, b: a + b, params, u)
            jax.block_until_ready(params)
            mine = trials[start:]
            # Accelerated trials come in pairs (plain, accelerated); the search takes the one
            # with the larger actual reduction.
            pairs = [mine[i:i + 2] for i in range(0, len(mine), 2)] if acceleration else [
                [t] for t in mine]
            last = max(pairs[-1], key=lambda t: t[2]) if pairs else [np.nan] * 3
            rows.append({"cost": float(state.cost), "damping": float(state.damping),
                         "radius_before": radius, "ratio": last[0], "length": last[1],
                         "trials": len(pairs)})
            if (k + 1) % 100 == 0:
                errors[k + 1] = float(bench.error_fn(params))
            if int(state.status) != 0:
                break
        final_cost = float(problem.cost(params))
    finally:
        _search.evaluate = original
    return {"rows": rows, "errors": errors, "final_cost": final_cost}


def summarize(rows, final_cost, block=100):
    costs = np.asarray([r["cost"] for r in rows] + [final_cost])
    out = []
    for lo in range(0, len(rows), block):
        part = rows[lo:lo + block]
        rho = np.asarray([r["ratio"] for r in part])
        length = np.asarray([r["length"] for r in part])
        radius = np.asarray([r["radius_before"] for r in part])
        on_boundary = np.abs(length / np.where(radius > 0, radius, np.inf) - 1) <= 0.1
        ratio = costs[lo + 1:lo + len(part) + 1] / costs[lo:lo + len(part)]
        out.append({"updates": f"{lo}-{lo + len(part)}", "median_rho": float(np.median(rho)),
                    "on_boundary": float(np.mean(on_boundary)),
                    "median_radius": float(np.median(radius)),
                    "median_cost_ratio": float(np.median(ratio)),
                    "mean_trials": float(np.mean([r["trials"] for r in part]))})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="heat", choices=["heat", "poisson2d"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = {"command": " ".join(["python -m benchmarks.trust_diagnostics",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "problem": args.problem, "runs": {}}
    for acceleration in (False, True):
        label = "geodesic acceleration" if acceleration else "no acceleration"
        r = run(args.problem, args.steps, acceleration)
        result["runs"][label] = {"blocks": summarize(r["rows"], r["final_cost"]),
                                 "errors": r["errors"], "updates": len(r["rows"])}
        print(f"\n### {args.problem}, default trust region, {label}\n")
        print("| updates | median ρ | on the boundary | median Δ | median C_{k+1}/C_k | trials "
              "per update | L² error at the end |")
        print("|---|---|---|---|---|---|---|")
        for b in result["runs"][label]["blocks"]:
            end = int(b["updates"].split("-")[1])
            err = r["errors"].get(end)
            print(f"| {b['updates']} | {b['median_rho']:.3f} | {b['on_boundary']:.2f} | "
                  f"{b['median_radius']:.3g} | {b['median_cost_ratio']:.4f} | "
                  f"{b['mean_trials']:.2f} | {'' if err is None else f'{err:.2e}'} |", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"trust_diagnostics_{args.problem}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
