"""Step-rule evidence on the PINN settings: steps and seconds to an L² error of 1e-7.

    python -m benchmarks.pinn_rules [--only heat poisson2d] [--max-steps N] [--budget S]
                                    [--repeats R] [--out DIR]

Rules, all on the same problem and initial parameters (`benchmarks.pinn`):

- `default`: `om.output_metric_descent()` (adaptive Levenberg–Marquardt damping);
- `fixed λ`: `om.output_metric_descent(damping=λ)` with backtracking, λ ∈ {1e-12, 1e-8, 1e-6,
  1e-4} (λ is added to DDᵀ, i.e. to m·G in ENGD's Gram G = DᵀD/m);
- `engd`: the published ENGD step (`benchmarks.pinn.engd`): `jnp.linalg.lstsq` of the Gram,
  then the η ∈ {2^0, …, 2^-30} of lowest cost; `engd-jac` solves the least-squares problem on D
  itself (σ cut-off ε·m·σ_max(D) instead of ε·K·σ_max(D)²); `engd-chol(λ)` uses
  `om.output_metric_gradient(..., solver="cholesky", damping=λ)`.

For the default rule it also records the λ carried between steps (`state.damping`, absolute
and relative to ‖D‖_F²/m, the scale its initial λ is set from) and the per-step cost ratio
C_{k+1}/C_k. Writes `pinn_step_rules.json` and `pinn_step_rules.md` under `--out`.
"""

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import pinn
from .pinn import BUILDERS, engd, first_reached, machine, om

TARGET = 1e-7
CAPS = {"heat": 3000, "poisson2d": 2000, "poisson5d": 1000}


def rules() -> list:
    out = [("default", "output_metric_descent()", lambda: om.output_metric_descent())]
    for lam in (1e-12, 1e-8, 1e-6, 1e-4):
        out.append((f"fixed λ={lam:g}", f"output_metric_descent(damping={lam:g}) + backtracking",
                    lambda lam=lam: om.output_metric_descent(damping=lam)))
    out += [
        ("engd", "ENGD: lstsq(DᵀD, Dᵀr), grid η ∈ 2^-k", lambda: engd()),
        ("engd(λ=1e-10)", "lstsq(DᵀD + 1e-10·I, Dᵀr), grid η ∈ 2^-k", lambda: engd(1e-10)),
        ("engd-jac", "lstsq(D, r), grid η ∈ 2^-k", lambda: engd(solver="lstsq-jacobian")),
    ]
    for lam in (1e-10, 1e-8):
        out.append((f"engd-chol({lam:g})", f"output_metric_gradient(cholesky, λ={lam:g}), grid "
                    "η ∈ 2^-k", lambda lam=lam: engd(lam, solver="cholesky")))
    return out


def _gram_scale(bench):
    jac_fn = jax.jit(lambda p: jnp.sum(bench.problem.jacobian(p) ** 2) / bench.problem.num_samples)
    return lambda params: {"gram_scale": float(jac_fn(params))}


def ratio_summary(costs: np.ndarray) -> dict:
    """Per-step cost ratios C_{k+1}/C_k: medians over phases, and the share of slow steps."""
    c = np.asarray(costs, float)
    ratio = c[1:] / c[:-1]
    ratio = ratio[np.isfinite(ratio)]
    out = {"median": float(np.median(ratio)) if len(ratio) else None,
           "share_above_0.99": float(np.mean(ratio > 0.99)) if len(ratio) else None}
    for lo, hi in ((0, 100), (100, 1000), (1000, None)):
        part = ratio[lo:hi]
        out[f"median_steps_{lo}_{hi or 'end'}"] = float(np.median(part)) if len(part) else None
    return out


def study(bench, *, max_steps: int, budget_s: float, repeats: int, log=print,
          only_rules=None) -> list:
    rows = []
    for name, desc, make in rules():
        if only_rules and name not in only_rules:
            continue
        per_run, load = [], os.getloadavg()[0]
        for rep in range(repeats):
            extra = _gram_scale(bench) if name == "default" and rep == 0 else None
            r = pinn.run(bench, make(), name, max_steps=max_steps, budget_s=budget_s,
                         record_every=10, stop_error=TARGET, extra_fn=extra)
            per_run.append(r)
        first = per_run[0]
        hits = [first_reached(r.records, TARGET) for r in per_run]
        secs = [h[1] for h in hits if h is not None]
        per_step = [r.seconds / max(r.steps, 1) for r in per_run]
        row = {
            "rule": name, "optimizer": desc, "status": first.status, "steps": first.steps,
            "seconds": round(first.seconds, 2),
            "steps_to_target": None if hits[0] is None else hits[0][0],
            "seconds_to_target_median": None if not secs else round(float(np.median(secs)), 2),
            "seconds_to_target_all": [round(s, 2) for s in secs],
            "steps_to_1e-6": (first_reached(first.records, 1e-6) or (None,))[0],
            "best_error": min(e["error"] for e in first.records),
            "final_error": first.records[-1]["error"], "final_cost": first.records[-1]["cost"],
            "ms_per_step_median": round(1e3 * float(np.median(per_step)), 2),
            "cost_ratio": ratio_summary(first.costs),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        }
        sizes = [e["step_size"] for e in first.records[1:] if "step_size" in e]
        if sizes:
            row["step_size_at_records"] = {"median": float(np.median(sizes)),
                                           "share_1": float(np.mean(np.asarray(sizes) == 1.0)),
                                           "min": float(np.min(sizes))}
        lams = [(e["damping"], e.get("gram_scale")) for e in first.records[1:] if "damping" in e]
        if name == "default" and lams:
            lam = np.asarray([a for a, _ in lams])
            rel = np.asarray([a / s for a, s in lams if s])
            row["damping"] = {
                "median": float(np.median(lam)), "p10": float(np.percentile(lam, 10)),
                "p90": float(np.percentile(lam, 90)),
                "relative_median": float(np.median(rel)) if len(rel) else None,
                "relative_p10": float(np.percentile(rel, 10)) if len(rel) else None,
                "relative_p90": float(np.percentile(rel, 90)) if len(rel) else None,
                "gram_scale_median": float(np.median([s for _, s in lams if s])),
            }
        log(f"  {name}: {row['status']} steps {row['steps']}, to 1e-7: {row['steps_to_target']}"
            f" / {row['seconds_to_target_median']} s; best error {row['best_error']:.3g}; "
            f"{row['ms_per_step_median']} ms/step; median C ratio {row['cost_ratio']['median']}")
        rows.append(row)
    return rows


def _fmt(x, spec=".2e"):
    return "—" if x is None else format(x, spec)


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Step rules on the PINN settings", "",
        f"Reproduce: `{results['command']}` (from the repository root, OPENBLAS_NUM_THREADS=1). "
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, CPU backend, float64; jax "
        f"{m['versions'].get('jax')}. Date {results['date']}. Code: today's "
        "`output_metric_descent` (adaptive LM default)." + (
            " " + results["note"] if results.get("note") else ""), "",
        f"Each rule runs until the L² error (RMS of u_θ − u* on held-out points) is ≤ {TARGET:g},"
        " or the step cap, or the time budget. Steps are resolved to 10 (errors are recorded "
        "every 10 steps, outside the timed region); seconds are training wall-clock after "
        f"compilation ({results['repeats']} run(s) per rule; with several, the median of the "
        "seconds). λ is on DDᵀ (ENGD's damping on G = DᵀD/m is λ/m).", "",
    ]
    for name, prob in results["problems"].items():
        lines += [f"## {name}", "", prob["description"] + f"; cap {prob['max_steps']} steps / "
                  f"{prob['budget_s']:g} s.", "",
                  "| rule | steps to 1e-7 | seconds to 1e-7 | steps to 1e-6 | best error | "
                  "final cost | ms/step | median C_{k+1}/C_k | share of steps with ratio > 0.99 "
                  "| step size (median at records) | status | load avg start/end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in prob["rules"]:
            ss = r.get("step_size_at_records", {})
            lines.append(
                f"| {r['rule']} | {r['steps_to_target'] or '—'} | "
                f"{_fmt(r['seconds_to_target_median'], '.1f')} | {r['steps_to_1e-6'] or '—'} | "
                f"{r['best_error']:.2e} | {r['final_cost']:.2e} | {r['ms_per_step_median']} | "
                f"{_fmt(r['cost_ratio']['median'], '.4f')} | "
                f"{_fmt(r['cost_ratio']['share_above_0.99'], '.2f')} | "
                f"{_fmt(ss.get('median'), '.3g')} | {r['status']} | "
                f"{' / '.join(map(str, r.get('load_average', [])))} |")
        d = next((r for r in prob["rules"] if r["rule"] == "default"), None)
        if d and "damping" in d:
            lam, cr = d["damping"], d["cost_ratio"]
            lines += ["", "Default rule: λ carried between steps (`state.damping`, the accepted"
                      " λ times Nielsen's factor max(1/3, 1 − (2ρ − 1)³) ∈ [1/3, 2)) median "
                      f"{lam['median']:.2e} (10–90 %: {lam['p10']:.2e} – {lam['p90']:.2e}); "
                      f"relative to ‖D‖_F²/m (median {lam['gram_scale_median']:.3g}): median "
                      f"{lam['relative_median']:.2e}"
                      f" ({lam['relative_p10']:.2e} – {lam['relative_p90']:.2e}). Per-step cost "
                      f"ratio C_{{k+1}}/C_k: median {_fmt(cr['median'], '.4f')}; steps 0–100 "
                      f"{_fmt(cr['median_steps_0_100'], '.4f')}, 100–1000 "
                      f"{_fmt(cr['median_steps_100_1000'], '.4f')}, 1000+ "
                      f"{_fmt(cr['median_steps_1000_end'], '.4f')}."]
        lines.append("")
    if results.get("findings"):
        lines += ["## Findings", ""] + [f"- {f}" for f in results["findings"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pinn_rules", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["heat", "poisson2d", "poisson5d"],
                        default=["heat", "poisson2d"])
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step cap (default: 3000 heat, 2000 poisson2d)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per rule")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rules", nargs="+", default=None,
                        help="run only these rules (names as in the table)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=pinn.DEFAULT_OUT)
    args = parser.parse_args(argv)
    import sys
    cmd = "python -m benchmarks.pinn_rules " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"machine": machine(), "command": cmd.strip(), "repeats": args.repeats,
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "problems": {}}
    for name in args.only:
        bench = BUILDERS[name](args.quick)
        cap = args.max_steps or CAPS[name]
        print(bench.description, flush=True)
        t0 = time.perf_counter()
        rows = study(bench, max_steps=cap, budget_s=args.budget, repeats=args.repeats,
                     log=lambda s: print(s, flush=True), only_rules=args.rules)
        results["problems"][name] = {"description": bench.description, "max_steps": cap,
                                     "budget_s": args.budget, "rules": rows,
                                     "wall_seconds": round(time.perf_counter() - t0, 1)}
        os.makedirs(args.out, exist_ok=True)  # written after each problem: partial results stay
        with open(os.path.join(args.out, "pinn_step_rules.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "pinn_step_rules.md"), "w") as f:
            f.write(render(results))
    print(f"wrote {os.path.join(args.out, 'pinn_step_rules.md')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
