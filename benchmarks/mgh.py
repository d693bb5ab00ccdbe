"""Moré–Garbow–Hillstrom problems: MINPACK, optimistix and outmetric from x0, 10·x0 and 100·x0.

    python -m benchmarks.mgh [--only NAME ...] [--repeats R] [--out DIR] [--quick]

All 35 problems of MGH (ACM TOMS 7(1), 1981) as defined in `benchmarks.mgh_problems`, each from
the standard start and its multiples 10 and 100, as MINPACK's test driver does (a start where
‖r‖² is not finite is skipped and listed). `--only` takes names or numbers (``Rosenbrock``,
``13``, ``mgh13``); `--data` is accepted for symmetry with `benchmarks.nist` and ignored.

**What counts as solved.** f = ‖r(x)‖² at the final parameters, evaluated in float64, and a
tolerance τ = 1e-20 · max(1, f(x0)) at the problem's standard start x0 (the problem's own scale,
the same for all three starts), so

- *global*: f ≤ f_ref·(1 + 1e-6) + τ. f_ref is the paper's minimum: exact where it is exact (0,
  or the linear problems' formulas); where it is published to 6 digits, f_ref is the lowest
  value any solver reached from any start if that value agrees with the published one to its
  digits (the paper truncates: up to one unit above the printed value, or half a unit below),
  else the published value.
- *local*: a 10·x0 or 100·x0 start (or x0) may legitimately lead to another minimum. A run that
  is not global counts as solved if it reaches, within the same 1e-6 (+ τ), the lowest value any
  of the three solvers found from that start, provided that lowest point is a minimum: one of
  the other minima the paper lists (to its digits; the Bard and Kowalik–Osborne ones lie at
  infinity), or a point certified by `minimum_check` — no Jacobian column exactly zero (a term
  that underflowed leaves a plateau, not a minimum), a positive semidefinite Hessian of f, and
  a Newton step on f predicting a relative decrease ≤ 1e-6 (scale-invariant, unlike MINPACK's
  gradient cosine, which a badly scaled valley fools). When the lowest value from a start is
  global, local minima from that start do not count; when the lowest point is not a minimum (a
  run stopped on its way down), no run from that start gets local credit.

The summary reports both counts ("global" and "global or local"). Writes `mgh.json` and `mgh.md`
under `--out` (default `benchmarks/results`). `--quick`: 3 problems from x0 only, 1 repeat.
"""

import argparse
import math
import os
import sys

from . import least_squares as ls
from . import mgh_problems as mp
from .least_squares import SOLVERS

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FACTORS = (1, 10, 100)
QUICK = ("Rosenbrock", "Powell singular", "Bard")
REL_TOL = 1e-6
ABS_TOL = 1e-20


def _unit(value: float, digits: int | None) -> float:
    """One unit in the last published digit (0 for an exact value)."""
    if digits is None or value == 0:
        return 0.0
    return 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1)


def agrees_with_published(f: float, value: float, digits: int | None) -> bool:
    """Whether f agrees with a published value to its digits.

    The paper prints truncated values ("8.21487...e-3" for 8.2148773e-3), so f may lie up to one
    unit above the printed value; half a unit below is allowed for a rounded print.
    """
    unit = _unit(value, digits)
    return value - 0.5 * unit <= f <= value + unit


def minimum_check(residual, x) -> dict:
    """Whether x looks like a local minimum of f = ‖r‖², invariant to the parameters' scaling.

    - `flat_columns`: Jacobian columns that are exactly zero (a model term underflowed: a
      plateau, not a certifiable minimum);
    - `hessian_psd`: the Hessian of f has no eigenvalue below −1e-8·max|eigenvalue|;
    - `model_decrease`: (gᵀH⁺g / 2) / f, the decrease the local quadratic model (Newton's step)
      predicts, relative to f (None where f = 0 or a value is not finite).
    """
    x = jnp.asarray(np.asarray(x, dtype=float))

    def f(y):
        res = residual(y)
        return jnp.dot(res, res)

    r, J, H = jax.jit(lambda y: (residual(y), jax.jacfwd(residual)(y), jax.hessian(f)(y)))(x)
    r, J = np.asarray(r, dtype=float), np.asarray(J, dtype=float)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(J))):
        return {"flat_columns": None, "hessian_psd": None, "model_decrease": None}

    cols = np.linalg.norm(J, axis=0)
    flat = int(np.sum(cols == 0))
    # In the variables scaled by the Jacobian's column norms (Newton's decrement does not
    # change, but a badly scaled problem's Hessian becomes well enough conditioned to solve).
    scale = np.where(cols > 0, cols, 1.0)
    g = (2.0 * J.T @ r) / scale
    H = np.asarray(H, dtype=float) / np.outer(scale, scale)
    fx = float(r @ r)
    if not np.all(np.isfinite(H)):
        return {"flat_columns": flat, "hessian_psd": None, "model_decrease": None}
    eig, vec = np.linalg.eigh(0.5 * (H + H.T))
    top = max(np.abs(eig).max(), 1e-300)
    psd = bool(eig.min() >= -1e-8 * top)
    keep = eig > 1e-14 * top
    coef = vec.T @ g
    decrease = None if fx == 0 else float(np.sum(coef[keep] ** 2 / eig[keep]) / 2.0 / fx)
    return {"flat_columns": flat, "hessian_psd": psd, "model_decrease": decrease}


def is_certified_minimum(row: dict) -> bool:
    """A local minimum by `minimum_check`: no flat column, PSD Hessian, and Newton's step
    predicting less than `REL_TOL` relative decrease."""
    d = row.get("model_decrease")
    return (row.get("flat_columns") == 0 and row.get("hessian_psd") is True and d is not None
            and abs(d) <= REL_TOL)


def run_problem(p: mp.MGHProblem, factors, repeats: int, log=print) -> list[dict]:
    lsp = ls.LeastSquaresProblem(mp.slug(p), p.residual, p.n, p.m)
    solvers = ls.prepare(lsp)
    residual = solvers.residual
    f_std = ls.sum_of_squares(residual, p.start(1))
    rows = []
    for factor in factors:
        x0 = p.start(factor)
        f0 = ls.sum_of_squares(residual, x0)
        base = {"problem": mp.slug(p), "name": p.name, "factor": factor, "f0": ls._round(f0, 6),
                "f0_standard": ls._round(f_std, 6)}
        if not math.isfinite(f0):
            rows.append({**base, "solver": None, "skipped": "f(start) is not finite"})
            log(f"{p.name:>32} x{factor:<3}: skipped (f(start) not finite)")
            continue
        records = ls.run_all(lsp, x0, repeats, solvers)
        for rec in records:
            row = {**base, **rec.as_dict(param_digits=8)}
            if rec.status != "error":
                check = minimum_check(p.residual, rec.params)
                check["model_decrease"] = ls._round(check["model_decrease"], 3)
                row.update(check)
            rows.append(row)
        log(f"{p.name:>32} x{factor:<3}: " + "  ".join(
            f"{r['solver']} f={_fmt_f(r['sum_sq'])} {ls.fmt_seconds(r['seconds']):>9}"
            for r in rows[-len(records):]))
    return rows


def _fmt_f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def classify(p: mp.MGHProblem, rows: list[dict]) -> dict:
    """Fill in `solved` ("global", "local" or None) for one problem's runs; returns f_ref info."""
    runs = [r for r in rows if r.get("solver")]
    tau = ABS_TOL * max(1.0, rows[0]["f0_standard"] if _finite(rows[0]["f0_standard"]) else 1.0)
    finite = [r["sum_sq"] for r in runs if _finite(r["sum_sq"])]
    best = min(finite) if finite else None
    if p.fstar_digits is None:
        f_ref, basis = p.fstar, "exact"
    elif best is not None and agrees_with_published(best, p.fstar, p.fstar_digits):
        f_ref, basis = best, "lowest value reached (agrees with the published value)"
    elif best is not None and best < p.fstar - 0.5 * _unit(p.fstar, p.fstar_digits):
        f_ref, basis = best, "lowest value reached, BELOW the published value"
    else:
        f_ref, basis = p.fstar, "published (no run reached it)"

    def near(f, target):
        return _finite(f) and f <= target * (1.0 + REL_TOL) + tau

    for r in runs:
        r["solved"] = "global" if near(r["sum_sq"], f_ref) else None
    for factor in dict.fromkeys(r["factor"] for r in runs):
        mine = [r for r in runs if r["factor"] == factor and _finite(r["sum_sq"])]
        if not mine:
            continue
        top = min(mine, key=lambda r: r["sum_sq"])
        if top["solved"] == "global":
            continue
        known = any(agrees_with_published(top["sum_sq"], v, d)
                    or abs(top["sum_sq"] - v) <= REL_TOL * v for v, d, _ in p.local)
        if not (known or is_certified_minimum(top)):
            continue
        for r in mine:
            if r["solved"] is None and near(r["sum_sq"], top["sum_sq"]):
                r["solved"] = "local"
    return {"f_ref": f_ref, "f_ref_basis": basis, "fstar_published": p.fstar,
            "fstar_digits": p.fstar_digits, "tau": tau}


def summarise(rows: list[dict]) -> dict:
    runs = [r for r in rows if r.get("solver")]
    out = {}
    for s in SOLVERS:
        mine = [r for r in runs if r["solver"] == s]
        out[s] = {
            "runs": len(mine),
            "solved_global": sum(r["solved"] == "global" for r in mine),
            "solved_global_or_local": sum(r["solved"] in ("global", "local") for r in mine),
            "median_seconds": ls.median_or_none([r["seconds"] for r in mine]),
        }
    by_key = {(r["problem"], r["factor"], r["solver"]): r for r in runs}
    ratios = [r["seconds"] / m["seconds"] for (pr, fa, s), r in by_key.items()
              if s == "outmetric" and (m := by_key.get((pr, fa, "minpack")))
              and _finite(m["seconds"]) and _finite(r["seconds"]) and m["seconds"] > 0]
    mp_, om_ = out["minpack"]["median_seconds"], out["outmetric"]["median_seconds"]
    out["time_ratio_outmetric_minpack"] = {
        "ratio_of_medians": None if not (mp_ and om_) else om_ / mp_,
        "median_of_ratios": ls.median_or_none(ratios),
    }
    out["skipped_starts"] = [f"{r['problem']} x{r['factor']}" for r in rows if r.get("skipped")]
    return out


def markdown(result: dict) -> str:
    runs = [r for r in result["records"] if r.get("solver")]
    summary = result["summary"]
    by_key = {(r["problem"], r["factor"], r["solver"]): r for r in runs}
    lines = [
        "# Moré–Garbow–Hillstrom problems: MINPACK vs optimistix vs outmetric",
        "",
        f"Machine: {ls.machine_line(result['machine'])}.",
        "",
        f"{len(result['problems'])} problems from x0, 10·x0 and 100·x0 (MINPACK's multiples); "
        f"f = ‖r‖². Time: median warm wall time over {result['repeats']} run(s) after one "
        "warm-up run.",
        "",
    ]
    if result.get("quick"):
        lines += ["**--quick smoke run: 3 problems from x0, 1 repeat; the numbers mean little.**",
                  ""]
    lines += [
        "**Solved** (τ = 1e-20·max(1, f(x0)) at the standard start): *global* if f ≤ "
        "f_ref(1 + 1e-6) + τ, f_ref the paper's minimum (exact, or — where published to 6 "
        "digits — the lowest value any run reached when it agrees with the published value to "
        "those digits); *local* (marked L) if not global but within the same tolerance of the "
        "lowest value any solver reached from that start, when that point is itself a minimum "
        "(one of the paper's other minima, or: no zero Jacobian column, positive semidefinite "
        "Hessian of f, Newton step predicting ≤ 1e-6 relative decrease) and is not global.",
        "",
        "Solvers (each with its own defaults):",
        "",
    ]
    lines += [f"- `{s}`: {ls.SOLVER_NOTES[s]}" for s in SOLVERS]
    lines += ["", "## Summary", ""]
    for s in SOLVERS:
        v = summary[s]
        lines.append(f"- {s}: solved {v['solved_global']}/{v['runs']} global, "
                     f"{v['solved_global_or_local']}/{v['runs']} global or local; median warm "
                     f"time {ls.fmt_seconds(v['median_seconds'])}")
    ratio = summary["time_ratio_outmetric_minpack"]
    rom, mor = ratio["ratio_of_medians"], ratio["median_of_ratios"]
    lines.append(f"- time outmetric / MINPACK: ratio of the median times "
                 f"{'—' if rom is None else f'{rom:.3g}'}; median of per-run ratios "
                 f"{'—' if mor is None else f'{mor:.3g}'}")
    if summary["skipped_starts"]:
        lines.append(f"- skipped (‖r(start)‖² not finite): {', '.join(summary['skipped_starts'])}")
    lines += ["", "## Runs", "",
              "| # | problem | n, m | start | f_ref | MINPACK f | time | optimistix f | time | "
              "outmetric f | time | outmetric steps (to final) | outmetric status |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    refs = result["references"]
    for p in mp.PROBLEMS:
        slug = mp.slug(p)
        if slug not in refs:
            continue
        for factor in FACTORS:
            if not any((slug, factor, s) in by_key for s in SOLVERS):
                continue
            cells = []
            for s in SOLVERS:
                r = by_key.get((slug, factor, s))
                if r is None:
                    cells += ["—", "—"]
                    continue
                mark = {"global": "", "local": " L"}.get(r["solved"], " ✗")
                cells += [f"{_fmt_f(r['sum_sq'])}{mark}", ls.fmt_seconds(r["seconds"])]
            om_row = by_key.get((slug, factor, "outmetric"), {})
            steps, to_final = om_row.get("steps"), om_row.get("steps_to_final")
            steps_text = "—" if steps is None else (
                f"{steps}" + ("" if to_final is None else f" ({to_final})"))
            lines.append(f"| {p.number} | {p.name} | {p.n}, {p.m} | x{factor} | "
                         f"{_fmt_f(refs[slug]['f_ref'])} | " + " | ".join(cells)
                         + f" | {steps_text} | {om_row.get('status') or '—'} |")
    lines += ["", "✗: not solved; L: solved to the best local minimum found from that start. "
              "outmetric status: `FitResult.status` where the core reports one (— where it does "
              "not). Steps to final: the first step whose cost is within 1e-9 of the final "
              "cost.", ""]
    return "\n".join(lines)


def run(problems, factors, repeats: int, log=print) -> dict:
    info = ls.machine_info()
    rows, refs = [], {}
    for p in problems:
        mine = run_problem(p, factors, repeats, log)
        if any(r.get("solver") for r in mine):
            refs[mp.slug(p)] = {k: (ls._round(v, 12) if isinstance(v, float) else v)
                                for k, v in classify(p, mine).items()}
        rows += mine
    return {"records": rows, "problems": [mp.slug(p) for p in problems], "factors": list(factors),
            "repeats": repeats, "references": refs, "summary": summarise(rows),
            "machine": info, "solver_notes": ls.SOLVER_NOTES,
            "criterion": {"rel_tol": REL_TOL, "abs_tol_factor": ABS_TOL}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mgh",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="problems by name or number (default all 35)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per solver (median)")
    parser.add_argument("--data", default=None, help="ignored (the problems are built in)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for mgh.json and mgh.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {', '.join(QUICK)} from x0, 1 repeat")
    args = parser.parse_args(argv)
    try:
        names = args.only or (QUICK if args.quick else None)
        problems = [mp.by_name(n) for n in names] if names else list(mp.PROBLEMS)
    except KeyError as exc:
        parser.error(f"unknown problem {exc}")
    factors = (1,) if args.quick else FACTORS
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    result = run(problems, factors, repeats)
    result["quick"] = bool(args.quick)
    result["machine"]["load_average_end"] = ls.load_average()
    os.makedirs(args.out, exist_ok=True)
    ls.write_json(os.path.join(args.out, "mgh.json"), result)
    with open(os.path.join(args.out, "mgh.md"), "w") as f:
        f.write(markdown(result))
    s = result["summary"]
    print("solved (global / global or local): " + ", ".join(
        f"{k} {s[k]['solved_global']}/{s[k]['solved_global_or_local']} of {s[k]['runs']}"
        for k in SOLVERS))
    print(f"wrote {os.path.join(args.out, 'mgh.json')} and mgh.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
