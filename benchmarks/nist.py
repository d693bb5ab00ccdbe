"""NIST StRD nonlinear regression: MINPACK, optimistix and outmetric on all 27 datasets × 2 starts.

    python -m benchmarks.nist [--only NAME ...] [--repeats R] [--data DIR] [--out DIR] [--quick]

The data are the `<name>.json` files of `--data` (default: `../shared/nist` beside the
repository; see its README.md). Residual r(b) = y − f(x; b) (Nelson: log(y) − f(x; b)), with f
compiled from the file's `model` expression in a fixed namespace (exp, log, sin, cos, arctan, pi
from jax.numpy, the parameters `b` and the data `x`). Accuracy is the log relative error of the
parameters against the certified values (LRE, min over parameters, capped at 11); a run "solves"
a dataset from a start when LRE ≥ 6. Times are median warm wall times (see
`benchmarks.least_squares`).

Writes `nist.json` (every record) and `nist.md` (the table and the summary) under `--out`
(default `benchmarks/results`). `--quick` (the smoke test): 3 small datasets, 1 repeat.
"""

import argparse
import json
import os
import sys
import types

from . import least_squares as ls
from .least_squares import SOLVERS

import jax.numpy as jnp  # noqa: E402  (x64 is switched on by least_squares)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "nist")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK = ("Misra1a", "Chwirut2", "DanWood")  # NIST "Lower"
SOLVED_LRE = 6.0
STARTS = ("start1", "start2")

_NAMESPACE = {"exp": jnp.exp, "log": jnp.log, "sin": jnp.sin, "cos": jnp.cos,
              "arctan": jnp.arctan, "pi": jnp.pi}
_ARGUMENTS = {"b", "x"}


# ----------------------------------------------------------------------------- models


def _names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def compile_model(expression: str):
    """`f(b, x)` from a NIST model expression such as ``"b[0]*(1-exp(-b[1]*x))"``.

    Only the names exp, log, sin, cos, arctan, pi, b and x may occur (checked on the compiled
    code); the expression is evaluated without builtins. The files are trusted bundled data;
    the check catches a malformed file, it is not a sandbox.
    """
    code = compile(f"lambda b, x: ({expression})", "<nist model>", "eval")
    unknown = _names(code) - set(_NAMESPACE) - _ARGUMENTS
    if unknown:
        raise ValueError(f"model {expression!r} uses unknown names {sorted(unknown)}")
    return eval(code, {"__builtins__": {}, **_NAMESPACE})  # noqa: S307 (checked above)


def load_dataset(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    for key in ("name", "x", "y", "model", "start1", "start2", "certified", "certified_rss"):
        if key not in data:
            raise ValueError(f"{path}: no {key!r}")
    return data


def residual_fn(data: dict):
    """r(b) = response(y) − f(x; b) as a JAX function of the parameter vector."""
    model = compile_model(data["model"])
    x = jnp.asarray(data["x"], dtype=jnp.float64)
    y = jnp.asarray(data["y"], dtype=jnp.float64)
    response = data.get("response", "y")
    if response == "y":
        target = y
    elif response == "log(y)":
        target = jnp.log(y)
    else:
        raise ValueError(f"{data['name']}: unknown response {response!r}")

    def residual(b):
        return target - model(b, x)

    return residual


def least_squares_problem(data: dict) -> ls.LeastSquaresProblem:
    return ls.LeastSquaresProblem(data["name"], residual_fn(data), len(data["certified"]),
                                  len(data["y"]))


def dataset_names(data_dir: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(data_dir) if f.endswith(".json"))


# ----------------------------------------------------------------------------- runs


def run_dataset(data: dict, repeats: int, log=print) -> list[dict]:
    """The three solvers from both starts: one record per (start, solver)."""
    lsp = least_squares_problem(data)
    solvers = ls.prepare(lsp)
    rows = []
    for start in STARTS:
        records = ls.run_all(lsp, data[start], repeats, solvers)
        for rec in records:
            row = rec.as_dict()
            row["dataset"] = data["name"]
            row["start"] = start
            row["lre"] = round(ls.lre(rec.params, data["certified"]), 2)
            row["solved"] = row["lre"] >= SOLVED_LRE
            rows.append(row)
        log(f"{data['name']:>9} {start}: " + "  ".join(
            f"{r['solver']} LRE {r['lre']:5.2f} {ls.fmt_seconds(r['seconds']):>9}"
            for r in rows[-len(records):]))
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for solver in SOLVERS:
        mine = [r for r in rows if r["solver"] == solver]
        out[solver] = {
            "runs": len(mine),
            "solved": sum(r["solved"] for r in mine),
            "median_seconds": ls.median_or_none([r["seconds"] for r in mine]),
            "median_lre": ls.median_or_none([r["lre"] for r in mine]),
        }
    mp, om_ = out["minpack"]["median_seconds"], out["outmetric"]["median_seconds"]
    ratios = []
    by_key = {(r["dataset"], r["start"], r["solver"]): r for r in rows}
    for (dataset, start, solver), r in by_key.items():
        if solver == "outmetric":
            m = by_key.get((dataset, start, "minpack"))
            if m and m["seconds"] and r["seconds"] and m["seconds"] > 0:
                ratios.append(r["seconds"] / m["seconds"])
    out["time_ratio_outmetric_minpack"] = {
        "ratio_of_medians": None if not (mp and om_) else om_ / mp,
        "median_of_ratios": ls.median_or_none(ratios),
    }
    return out


def markdown(result: dict) -> str:
    rows = result["records"]
    summary = result["summary"]
    by_key = {(r["dataset"], r["start"], r["solver"]): r for r in rows}
    lines = [
        "# NIST StRD nonlinear regression: MINPACK vs optimistix vs outmetric",
        "",
        f"Machine: {ls.machine_line(result['machine'])}.",
        "",
        f"{len(result['datasets'])} datasets × {len(STARTS)} starts; LRE = −log10(|b − c|/|c|), "
        f"min over parameters, capped at {ls.LRE_CAP:g}; solved: LRE ≥ {SOLVED_LRE:g}. Time: "
        f"median warm wall time over {result['repeats']} run(s) after one warm-up run.",
        "",
    ]
    if result.get("quick"):
        lines += ["**--quick smoke run: 3 datasets, 1 repeat; the numbers mean little.**", ""]
    lines += ["Solvers (each with its own defaults):", ""]
    lines += [f"- `{s}`: {ls.SOLVER_NOTES[s]}" for s in SOLVERS]
    lines += ["", "## Summary", ""]
    total = len(rows) // len(SOLVERS)
    for s in SOLVERS:
        v = summary[s]
        med_lre = "—" if v["median_lre"] is None else f"{v['median_lre']:.1f}"
        lines.append(f"- {s}: solved {v['solved']}/{total}; median warm time "
                     f"{ls.fmt_seconds(v['median_seconds'])}; median LRE {med_lre}")
    ratio = summary["time_ratio_outmetric_minpack"]
    rom, mor = ratio["ratio_of_medians"], ratio["median_of_ratios"]
    lines.append(f"- time outmetric / MINPACK: ratio of the median times "
                 f"{'—' if rom is None else f'{rom:.3g}'}; median of per-run ratios "
                 f"{'—' if mor is None else f'{mor:.3g}'}")
    lines += ["", "## Runs", "",
              "| dataset | difficulty | start | MINPACK LRE | time | optimistix LRE | time | "
              "outmetric LRE | time | outmetric steps (to final) | outmetric status |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in result["datasets"]:
        for start in STARTS:
            cells = []
            difficulty = ""
            for s in SOLVERS:
                r = by_key.get((name, start, s))
                if r is None:
                    cells += ["—", "—"]
                    continue
                difficulty = r.get("difficulty", difficulty)
                mark = "" if r["solved"] else " ✗"
                cells += [f"{r['lre']:.1f}{mark}", ls.fmt_seconds(r["seconds"])]
            om_row = by_key.get((name, start, "outmetric"), {})
            steps = om_row.get("steps")
            to_final = om_row.get("steps_to_final")
            steps_text = "—" if steps is None else (
                f"{steps}" + ("" if to_final is None else f" ({to_final})"))
            status = om_row.get("status") or "—"
            lines.append(f"| {name} | {difficulty} | {start[-1]} | " + " | ".join(cells)
                         + f" | {steps_text} | {status} |")
    lines += ["", "✗: LRE < 6 (not solved). outmetric status: `FitResult.status` where the core "
              "reports one (— where it does not). Steps to final: the first step whose cost is "
              "within 1e-9 of the final cost.", ""]
    return "\n".join(lines)


def run(names: list[str], data_dir: str, repeats: int, log=print) -> dict:
    info = ls.machine_info()
    rows = []
    for name in names:
        data = load_dataset(os.path.join(data_dir, f"{name}.json"))
        for row in run_dataset(data, repeats, log):
            row["difficulty"] = data.get("difficulty")
            rows.append(row)
    return {"records": rows, "datasets": names, "repeats": repeats,
            "summary": summarise(rows), "machine": info,
            "solver_notes": ls.SOLVER_NOTES, "solved_lre": SOLVED_LRE, "lre_cap": ls.LRE_CAP}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nist", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="datasets to run (default all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per solver (median)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"folder of <name>.json "
                        f"(default {DEFAULT_DATA})")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for nist.json and nist.md")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {', '.join(QUICK)} with 1 repeat")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        parser.error(f"no data folder {args.data!r} (pass --data DIR)")
    available = dataset_names(args.data)
    names = list(args.only) if args.only else (list(QUICK) if args.quick else available)
    missing = [n for n in names if n not in available]
    if missing:
        parser.error(f"not in {args.data}: {', '.join(missing)}")
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    result = run(names, args.data, repeats)
    result["quick"] = bool(args.quick)
    result["machine"]["load_average_end"] = ls.load_average()
    os.makedirs(args.out, exist_ok=True)
    ls.write_json(os.path.join(args.out, "nist.json"), result)
    with open(os.path.join(args.out, "nist.md"), "w") as f:
        f.write(markdown(result))
    s = result["summary"]
    total = len(result["records"]) // len(SOLVERS)
    print("solved: " + ", ".join(f"{k} {s[k]['solved']}/{total}" for k in SOLVERS))
    print(f"wrote {os.path.join(args.out, 'nist.json')} and nist.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
