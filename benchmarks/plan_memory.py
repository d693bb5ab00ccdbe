"""Does `plan_solve`'s memory estimate match the measured peak? Digits cross-entropy (issue #15).

    python benchmarks/plan_memory.py [--tiny] [--dtype float64|float32 ...] [--out DIR]

The problem of the issue: the first 1,347 digits (the 1,347/450 split's training part), a
64-128-10 tanh MLP (K = 9,610), cross-entropy, QN = 13,470 (the tall side: K < QN). For each
dtype, in a fresh process: what ``plan_solve`` picks for the default optimizer
(``many_dampings=True``), the bytes it names in its reason and the bytes its rule budgets for
that pick (``outmetric._solve.estimate_memory_bytes``: 2·M·K·b + 3·n²·b for a Cholesky Gram
from a dense D, 3·n²·b for a structured Gram, 3·M·K·b for QR/SVD; for the matrix-free CG on
the tall side, what "auto" picks here since issue #15's cross-entropy step, one chunk of
per-sample Jacobians twice and the state's K×ℓ sketch twice), XLA's own memory
analysis of the compiled update (arguments + outputs + temporaries − aliased), and the
measured peak: the process's peak RSS after one
default update minus the RSS before it (the JAX runtime and the data), with the update's wall
time. Writes ``--out/plan_memory.json``.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_common as common  # noqa: E402


def run_one(config: dict) -> dict:
    import resource

    _, dtype = common.setup_jax(config["dtype"])
    import jax
    import jax.numpy as jnp

    import outmetric as om
    from outmetric._solve import estimate_memory_bytes, sketch_rank

    num_samples, hidden = config["num_samples"], config["hidden"]
    data = om.load_digits()
    apply, params = om.mlp(jax.random.PRNGKey(0), [64, hidden, 10], dtype=dtype)
    problem = om.Problem(apply, jnp.asarray(data.inputs[:num_samples], dtype),
                         jnp.argmax(data.targets[:num_samples], 1), loss="cross_entropy")
    num_rows = problem.num_samples * problem.output_dim
    num_params = om.num_parameters(params)
    plan = om.plan_solve(problem, params, damping=1.0, many_dampings=True)
    itemsize = jnp.dtype(dtype).itemsize
    opt = om.output_metric_descent()
    state = opt.init(params)
    update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))
    compiled = update.lower(state, params).compile()
    analysis = compiled.memory_analysis()
    xla = None
    if analysis is not None:
        xla = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                  + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    _, new_state = jax.block_until_ready(compiled(state, params))
    seconds = time.perf_counter() - start
    memory = common.peak_memory()
    peak = common.peak_bytes(memory)
    # The default optimizer's state carries a kept Nyström sketch of rank `sketch_rank`.
    planned = estimate_memory_bytes(plan, num_rows, num_params, itemsize, num_samples,
                                    sketch=sketch_rank(num_params, itemsize))
    measured = peak - before if "device_peak_bytes" not in memory else peak
    return {
        "dtype": config["dtype"], "num_samples": num_samples, "mlp": [64, hidden, 10],
        "loss": "cross_entropy", "num_rows": num_rows, "num_params": num_params,
        "plan": plan._asdict(), "picked": om.SOLVERS[int(new_state.solver)],
        "fallback": bool(new_state.fallback), "planned_bytes": planned,
        "xla_memory_analysis_bytes": xla, "rss_before_update_bytes": before,
        "memory": memory, "measured_bytes": measured,
        "measured_over_planned": measured / planned if planned else None,
        "update_s": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtype", nargs="*", default=["float64"],
                        choices=["float64", "float32"])
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import json

    if args.one:
        print(json.dumps(run_one(json.loads(args.one)), default=float))
        return
    common.setup_jax("float64")
    size = {"num_samples": 60, "hidden": 16} if args.tiny else {"num_samples": 1347,
                                                                "hidden": 128}
    rows = []
    for dtype in args.dtype:
        config = dict(size, dtype=dtype)
        row = common.run_isolated(os.path.abspath(__file__), config, timeout=900)
        rows.append(row)
        if "error" in row:
            print(dtype, "ERROR", row["error"][-500:])
        else:
            print(f"{dtype}: plan {row['plan']['method']} ({row['plan']['gram']}), planned "
                  f"{row['planned_bytes'] / 2**30:.2f} GiB, XLA "
                  f"{(row['xla_memory_analysis_bytes'] or 0) / 2**30:.2f} GiB, measured "
                  f"{row['measured_bytes'] / 2**30:.2f} GiB (x{row['measured_over_planned']:.2f}),"
                  f" update {row['update_s']:.1f} s", flush=True)
    payload = {"benchmark": "plan_memory", "command": common.command_line(),
               "machine": common.machine_info(), "results": rows}
    name = "plan_memory_tiny.json" if args.tiny else "plan_memory.json"
    print("wrote", common.write_json(args.out, name, payload))


if __name__ == "__main__":
    main()
