"""One command for an accelerator: the theorem, a matrix-free step and a dense step (issue #15).

    python benchmarks/gpu.py [--tiny] [--only PART ...] [--out DIR]

Runs in under 8 minutes on one H100/H200-class GPU; each part runs in its own process (its
peak memory is its own: the device's ``peak_bytes_in_use``) under a time limit:

- ``matmul``: the device's matmul rate, a float32 ``jnp.matmul`` of two n×n matrices (n =
  8192), at the default precision (what the steps below use; TF32 on recent NVIDIA GPUs) and at
  ``"highest"`` (full float32), flops 2n³ over the fastest of a few runs.
- ``theorem``: the full-digits theorem run of ``benchmarks/digits_theorem.py`` (one-hot
  regression on all 1,797 digits, QN = 17,970, 64-959-10 tanh MLP, K = 71,935 ≥ 4·QN, float64),
  the default ``om.fit`` to C ≤ 1e-10·C(0): steps, wall time, the cost curve, the plan.
- ``krylov``: one default matrix-free update, ``output_metric_descent(solver="cg")``, on the
  32-1000-1000-1 MLP (K = 1,035,001) with QN = 4096 (float32), as ``benchmarks/krylov_step.py``:
  the update compiled and run once, then two updates timed (CG iterations, forcing, λ).
- ``dense``: the dense step at QN = 16,384 on a 32-3150-3150-1 MLP (K = 10,032,751) in float32:
  one fixed-λ Gauss–Newton step ``output_metric_descent(1.0, damping=λ, linesearch=None)`` (one
  Gram, one Cholesky) and one default adaptive update, each as ``solver="auto"`` plans it (the
  plan is recorded: D alone would be 657 GB, so the structured Gram); its flop count (the Gram's
  multiply-adds ×2 from ``outmetric._gram.structured_flops``, M³/3 for Cholesky, 6NK for the
  forward, JVP and VJP passes) over its time, as a fraction of the measured matmul rate.

Writes ``--out/gpu_<device>.json`` (``gpu_<device>_tiny.json`` with ``--tiny``), naming the
device (``jax.devices()[0].device_kind``). ``--tiny`` runs the same code at tiny sizes in one
process, in seconds on a CPU (the test suite runs it; its numbers mean nothing).
"""

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_common as common  # noqa: E402

PARTS = ("matmul", "theorem", "krylov", "dense")

#: part -> full-size configuration; the "limit_s" of every part adds up to under 8 minutes.
FULL = {
    "matmul": {"n": 8192, "repeats": 5, "limit_s": 40},
    "theorem": {"num_samples": 1797, "hidden": None, "budget_s": 180, "max_steps": 100,
                "limit_s": 220},
    "krylov": {"sizes": [32, 1000, 1000, 1], "num_samples": 4096, "updates": 2,
               "dtype": "float32", "limit_s": 90},
    "dense": {"sizes": [32, 3150, 3150, 1], "num_samples": 16384, "dtype": "float32",
              "limit_s": 120},
}
TINY = {
    "matmul": {"n": 256, "repeats": 2},
    "theorem": {"num_samples": 20, "hidden": 16, "budget_s": 60, "max_steps": 10},
    "krylov": {"sizes": [4, 32, 32, 1], "num_samples": 64, "updates": 2, "dtype": "float32"},
    "dense": {"sizes": [4, 32, 32, 1], "num_samples": 64, "dtype": "float32"},
}


def part_matmul(config: dict) -> dict:
    import jax
    import jax.numpy as jnp

    n = config["n"]
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    out = {"n": n, "dtype": "float32", "flops": 2 * n**3}
    for name, precision in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
        f = jax.jit(lambda a, b, p=precision: jnp.matmul(a, b, precision=p))
        t = common.timeit(f, a, b, repeats=config["repeats"])
        out[name] = {"min_s": t["min_s"], "median_s": t["median_s"],
                     "flops_per_s": 2 * n**3 / t["min_s"]}
    return out


def part_theorem(config: dict) -> dict:
    import jax.numpy as jnp

    from digits_theorem import theorem_run

    run = theorem_run(config["num_samples"], config["hidden"], jnp.float64,
                      budget_s=config["budget_s"], max_steps=config["max_steps"])
    return run


def _time_updates(opt, problem, params, num):
    """Compile-and-run the update once, then `num` timed updates from the initial state."""
    import jax
    import optax

    update = jax.jit(lambda state, params: opt.update(None, state, params, problem=problem))
    cost = jax.jit(lambda p: problem.cost(p))
    state = opt.init(params)
    start = time.perf_counter()
    jax.block_until_ready(update(state, params))
    compile_s = time.perf_counter() - start
    rows = []
    for _ in range(num):
        before = float(cost(params))
        start = time.perf_counter()
        updates, state = jax.block_until_ready(update(state, params))
        seconds = time.perf_counter() - start
        params = optax.apply_updates(params, updates)
        rows.append({"seconds": seconds, "cost_before": before,
                     "cost_after": float(cost(params)), "damping": float(state.damping),
                     "solve_steps": int(state.solve_steps),
                     "solve_converged": bool(state.solve_converged),
                     "forcing": float(state.forcing), "solver": int(state.solver)})
    return compile_s, rows, state


def part_krylov(config: dict) -> dict:
    import outmetric as om
    from scale_solvers import build

    problem, params = build(config["sizes"], config["num_samples"], config["dtype"])
    opt = om.output_metric_descent(solver="cg")
    compile_s, rows, _ = _time_updates(opt, problem, params, config["updates"])
    for row in rows:
        row["solver"] = om.SOLVERS[row["solver"]]
    return {"mlp": config["sizes"], "num_samples": config["num_samples"],
            "num_rows": config["num_samples"] * config["sizes"][-1],
            "num_params": om.num_parameters(params), "dtype": config["dtype"],
            "compile_and_first_update_s": compile_s, "updates": rows,
            "memory": common.peak_memory()}


def part_dense(config: dict, matmul_rate: float | None = None) -> dict:
    import jax
    import optax  # noqa: F401 - imported before the measurement

    import outmetric as om
    from outmetric._gram import structured_flops
    from scale_solvers import build, damping_for

    problem, params = build(config["sizes"], config["num_samples"], config["dtype"])
    num_n = problem.num_samples
    num_rows = num_n * problem.output_dim
    num_params = om.num_parameters(params)
    lam = damping_for(problem, params)
    plan = om.plan_solve(problem, params, damping=lam)
    gram_macs = structured_flops(problem, params) if plan.gram == "structured" else None
    if gram_macs is None:
        gram_macs = num_rows * num_rows * num_params
    flops = 2 * gram_macs + num_rows**3 / 3 + 6 * num_n * num_params
    step = om.output_metric_descent(1.0, damping=lam, linesearch=None)
    state = step.init(params)
    update = jax.jit(lambda s, p: step.update(None, s, p, problem=problem))
    timing = common.timeit(update, state, params, repeats=2)
    timing.pop("out")
    out = {"mlp": config["sizes"], "num_samples": num_n, "num_rows": num_rows,
           "num_params": num_params, "dtype": config["dtype"], "damping": lam,
           "plan": plan._asdict(), "dense_jacobian_bytes": num_rows * num_params * 4,
           "fixed_damping_step": timing, "step_flops": flops,
           "step_flops_per_s": flops / timing["min_s"]}
    if matmul_rate:
        out["fraction_of_matmul_rate"] = out["step_flops_per_s"] / matmul_rate
    compile_s, rows, _ = _time_updates(om.output_metric_descent(), problem, params, 1)
    out["default_update"] = {"compile_and_first_update_s": compile_s, "updates": rows}
    out["memory"] = common.peak_memory()
    return out


def run_one(config: dict) -> dict:
    """One part (in this process), with x64 on: the theorem needs float64, the others ask
    for float32 explicitly."""
    common.setup_jax("float64")
    part = config.pop("part")
    config.pop("limit_s", None)
    rate = config.pop("matmul_rate", None)
    start = time.perf_counter()
    if part == "matmul":
        out = part_matmul(config)
    elif part == "theorem":
        out = part_theorem(config)
    elif part == "krylov":
        out = part_krylov(config)
    else:
        out = part_dense(config, rate)
    out["part_wall_s"] = time.perf_counter() - start
    return out


def device_name(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "device"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, one process (CPU smoke)")
    parser.add_argument("--only", nargs="*", choices=PARTS, help="parts to run (default: all)")
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one)), default=float))
        return
    common.setup_jax("float64")
    start = time.perf_counter()
    machine = common.machine_info()
    sizes = TINY if args.tiny else FULL
    results, rate = {}, None
    for part in args.only or PARTS:
        config = dict(sizes[part], part=part, matmul_rate=rate)
        if args.tiny:
            result = run_one(config)
        else:
            result = common.run_isolated(os.path.abspath(__file__), config,
                                         timeout=config["limit_s"])
        results[part] = result
        if part == "matmul" and "default" in result:
            rate = result["default"]["flops_per_s"]
        print(part, _summary(part, result), flush=True)
    payload = {"benchmark": "gpu", "command": common.command_line(), "tiny": args.tiny,
               "device": machine["device_kind"], "machine": machine,
               "total_wall_s": time.perf_counter() - start, "results": results}
    name = f"gpu_{device_name(machine['device_kind'])}" + ("_tiny" if args.tiny else "")
    print("wrote", common.write_json(args.out, name + ".json", payload))


def _summary(part: str, r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"][-300:]
    if part == "matmul":
        return (f"{r['default']['flops_per_s'] / 1e12:.2f} TFLOP/s default, "
                f"{r['highest']['flops_per_s'] / 1e12:.2f} highest")
    if part == "theorem":
        return (f"{r['steps']} steps, {r['wall_s']:.1f} s, C/C(0) = "
                f"{r['final_relative_cost']:.2e}, {r['status']}, plan {r['plan']['method']}")
    if part == "krylov":
        return "; ".join(f"{u['seconds']:.2f} s ({u['solve_steps']} CG)" for u in r["updates"])
    frac = r.get("fraction_of_matmul_rate")
    return (f"fixed-λ step {r['fixed_damping_step']['min_s']:.3f} s, "
            f"{r['step_flops_per_s'] / 1e12:.2f} TFLOP/s"
            + (f" = {frac:.2f} of matmul" if frac is not None else "")
            + f"; default update {r['default_update']['updates'][0]['seconds']:.3f} s")


if __name__ == "__main__":
    main()
