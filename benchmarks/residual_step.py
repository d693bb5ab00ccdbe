"""Per-step time of the PINN forms: `om.ResidualProblem` (pointwise) against the per-sample
`om.Problem` of rows, and optionally the stacked `Problem.from_residual` vector.

    python -m benchmarks.residual_step [--only heat poisson5d] [--steps 5] [--stacked] [--quick]

For each setting of `benchmarks.pinn` (full size unless --quick) and each form, one jitted
`output_metric_descent()` update (problem passed as an argument) and one jitted `linearize`
are compiled, then timed over `--steps` calls (median, after `block_until_ready`); for
`poisson5d` every call gets freshly drawn points of the same shapes (no recompilation: the
compile count is recorded). Writes ``benchmarks/results/residual_step.json``. A benchmark, not a
test: nothing here gates on a time.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import outmetric as om  # noqa: E402

from . import pinn  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def stacked_problem(residual: om.ResidualProblem):
    """The same loss as one stacked residual vector (`Problem.from_residual`)."""
    m = residual.num_samples

    def fn(params):
        return jnp.concatenate([
            jnp.sqrt(s.weight * m / s.num_points)
            * jax.vmap(lambda p, s=s: s.residual_fn(params, p))(s.points).reshape(-1)
            for s in residual.sets])

    return om.Problem.from_residual(fn, m)


def time_form(problem, params, batches, steps: int) -> dict:
    """Compile and time one update and one linearize on `problem`, with `batches(i)` giving
    the problem for call i (new points for redrawn settings)."""
    opt = om.output_metric_descent()
    traces = {"step": 0, "linearize": 0}

    @eqx.filter_jit
    def step(problem, params, state):
        traces["step"] += 1
        updates, state = opt.update(None, state, params, problem=problem)
        return optax.apply_updates(params, updates), state

    @eqx.filter_jit
    def linearize(problem, params):
        traces["linearize"] += 1
        return problem.linearize(params)

    state = opt.init(params)
    t0 = time.perf_counter()
    jax.block_until_ready(step(problem, params, state))
    compile_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(linearize(problem, params))
    compile_lin = time.perf_counter() - t0
    step_times, lin_times = [], []
    p, s = params, state
    for i in range(steps):
        pr = batches(i + 1)
        t0 = time.perf_counter()
        p, s = jax.block_until_ready(step(pr, p, s))
        step_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(linearize(pr, params))
        lin_times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(step_times), "linearize_s": statistics.median(lin_times),
            "step_times": [round(t, 4) for t in step_times],
            "first_call_step_s": round(compile_step, 2),
            "first_call_linearize_s": round(compile_lin, 2), "traces": dict(traces),
            "cost_after": float(problem.cost(p))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.residual_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["heat", "poisson2d", "poisson5d"],
                        default=["heat", "poisson5d"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stacked", action="store_true",
                        help="also time Problem.from_residual of the stacked vector (slow)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cmd = "python -m benchmarks.residual_step " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"machine": pinn.machine(), "command": cmd.strip(), "quick": args.quick,
               "load_average": [round(os.getloadavg()[0], 2)], "settings": {}}
    for name in args.only:
        bench = pinn.BUILDERS[name](args.quick)
        print(bench.description, flush=True)
        if bench.sampler is None:
            forms = {"pointwise": (bench.residual, lambda i: bench.residual),
                     "rows": (bench.problem, lambda i: bench.problem)}
        else:
            sampler = bench.sampler
            forms = {
                "pointwise": (bench.residual,
                              lambda i: bench.residual.with_points(sampler.draw_sets(i))),
                "rows": (bench.problem, lambda i: bench.problem.with_data(*sampler.draw(i))),
            }
        if args.stacked:
            stacked = stacked_problem(bench.residual)
            forms["stacked"] = (stacked, lambda i: stacked)  # fixed points only
        row = {"description": bench.description, "info": bench.info}
        for form, (problem, batches) in forms.items():
            row[form] = time_form(problem, bench.params, batches, args.steps)
            print(f"  {form}: step {row[form]['step_s']:.3f} s, linearize "
                  f"{row[form]['linearize_s']:.3f} s (first calls "
                  f"{row[form]['first_call_step_s']} s / {row[form]['first_call_linearize_s']} s"
                  f", traces {row[form]['traces']})", flush=True)
        row["ratio_pointwise_to_rows"] = row["pointwise"]["step_s"] / row["rows"]["step_s"]
        print(f"  pointwise / rows step time: {row['ratio_pointwise_to_rows']:.2f}", flush=True)
        results["settings"][name] = row
    results["load_average"].append(round(os.getloadavg()[0], 2))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "residual_step.json" if not args.quick
                        else "residual_step_quick.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
