"""Digits cross-entropy with the defaults: one step's time, and a race with Adam (issue #15).

    python benchmarks/digits_cross_entropy.py [--tiny] [--dtype float64 float32]
                                              [--race-dtype float64] [--seeds 0 1 …]
                                              [--budget S] [--steps S] [--out DIR]

The problem of `benchmarks/plan_memory.py`: the first 1,347 of the 1,797 bundled digits
(`om.load_digits()`) for training, the last 450 held out; a 64-128-10 tanh MLP (`om.mlp`,
key 0; K = 9,610); cross-entropy against the integer labels with the Problem's default
smoothing (0.01), QN = 13,470 (the tall side, K < QN). Defaults against defaults:

(a) for each ``--dtype`` in a fresh process: what ``plan_solve`` picks for the default optimizer
    (``om.output_metric_descent()``, solver ``"auto"``), the compile time of its jitted update
    (lower + compile), then ``--steps`` (≥ 3) updates, each timed (``block_until_ready``),
    their median, the solver each reports (``state.solver``), its fallback flag and CG
    iterations, the memory the plan budgets (``estimate_memory_bytes``) and the process's peak
    RSS;
(b) for ``--race-dtype`` in a fresh process: the default ``om.fit`` (full batch,
    ``optimizer=None``) for ``--budget`` seconds of wall time, compilation included (the
    callback stops it), against ``optax.adam`` at learning rates 1e-2, 1e-3, 1e-4 on the full
    batch (one gradient per step), each run by ``benchmarks.methods.run`` for the wall time
    outmetric took, its compilation not counted. Reported for each: the training cost (mean
    cross-entropy on the smoothed labels; also against the plain labels) and the accuracy on
    the 450 held-out digits, where the run ended (outmetric's also after each update). One
    race per ``--seeds`` entry (the MLP's initialisation key; default 0): which method ends
    lower is a matter of a few 1e-6 in cost and a few of the 450 digits, so more than one
    initialisation is needed to say which is ahead; the Markdown counts the seeds each target
    is met on.

Writes ``--out/digits_cross_entropy.json`` and ``.md`` (``--tiny``: ``digits_cross_entropy_tiny.*``,
60 training digits, a 64-16-10 MLP, 3 steps of ``fit`` and 1 s of each Adam: a smoke test, its
numbers mean nothing). Times
are of a shared machine: the JSON records the load average before and after.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_common as common  # noqa: E402

TRAIN = 1347
ADAM_RATES = (1e-2, 1e-3, 1e-4)
FULL = {"num_train": TRAIN, "hidden": 128}
TINY = {"num_train": 60, "hidden": 16}


def build(num_train: int, hidden: int, dtype, seed: int = 0):
    """(problem, params, apply, (test inputs, test labels)): the plan_memory.py split; the
    MLP's initialisation from ``PRNGKey(seed)``."""
    import jax
    import jax.numpy as jnp

    import outmetric as om

    data = om.load_digits()
    labels = jnp.argmax(data.targets, 1)
    apply, params = om.mlp(jax.random.PRNGKey(seed), [64, hidden, 10], dtype=dtype)
    problem = om.Problem(apply, jnp.asarray(data.inputs[:num_train], dtype), labels[:num_train],
                         loss="cross_entropy")
    test = (jnp.asarray(data.inputs[TRAIN:], dtype), labels[TRAIN:])
    return problem, params, apply, test


def metrics(problem, apply, test, params, train_labels) -> dict:
    """Training cost (smoothed labels, the Problem's; and plain), held-out accuracy."""
    import jax
    import jax.numpy as jnp

    outputs = jax.vmap(lambda u: apply(params, u))(problem.inputs)
    log_p = jax.nn.log_softmax(outputs, axis=-1)
    plain = -jnp.mean(jnp.take_along_axis(log_p, train_labels[:, None], axis=1))
    test_outputs = jax.vmap(lambda u: apply(params, u))(test[0])
    return {"train_cost": float(problem.cost(params)), "train_cross_entropy_plain": float(plain),
            "train_accuracy": float(jnp.mean(jnp.argmax(outputs, 1) == train_labels)),
            "test_accuracy": float(jnp.mean(jnp.argmax(test_outputs, 1) == test[1]))}


def step_times(config: dict) -> dict:
    """(a): the default update's compile time and per-step times at one dtype."""
    _, dtype = common.setup_jax(config["dtype"])
    import jax

    import outmetric as om
    from outmetric._solve import estimate_memory_bytes, sketch_rank

    problem, params, _, _ = build(config["num_train"], config["hidden"], dtype)
    num_rows = problem.num_samples * problem.output_dim
    num_params = om.num_parameters(params)
    plan = om.plan_solve(problem, params, damping=1.0, many_dampings=True)
    itemsize = dtype.itemsize
    planned = estimate_memory_bytes(plan, num_rows, num_params, itemsize, problem.num_samples,
                                    sketch=sketch_rank(num_params, itemsize))
    opt = om.output_metric_descent()
    state = opt.init(params)
    start = time.perf_counter()
    update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem)).lower(
        state, params).compile()
    compile_s = time.perf_counter() - start
    cost = jax.jit(lambda p: problem.cost(p))
    costs, steps = [float(cost(params))], []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        updates, state = jax.block_until_ready(update(state, params))
        seconds = time.perf_counter() - start
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        costs.append(float(cost(params)))
        steps.append({"seconds": seconds, "solver": om.SOLVERS[int(state.solver)],
                      "fallback": bool(state.fallback), "cg_iterations": int(state.solve_steps),
                      "damping": float(state.damping), "step_size": float(state.step_size),
                      "cost_after": costs[-1]})
    seconds = [s["seconds"] for s in steps]
    memory = common.peak_memory()
    return {"dtype": config["dtype"], "num_rows": num_rows, "num_params": num_params,
            "plan": plan._asdict(), "planned_bytes": planned, "compile_s": compile_s,
            "steps": steps, "median_step_s": statistics.median(seconds),
            "max_step_s": max(seconds), "solvers": sorted({s["solver"] for s in steps}),
            "any_fallback": any(s["fallback"] for s in steps), "costs": costs,
            "memory": memory, "peak_bytes": common.peak_bytes(memory)}


def race(config: dict) -> dict:
    """(b): the default `om.fit` for `budget` s (compilation included), then Adam at each rate
    for the time outmetric took (compilation not counted); metrics where each ended."""
    _, dtype = common.setup_jax(config["dtype"])
    import jax
    import optax

    import outmetric as om
    from benchmarks.methods import Method, optax_stepper, run
    from benchmarks.problems import BenchProblem

    problem, params, apply, test = build(config["num_train"], config["hidden"], dtype,
                                         config.get("seed", 0))
    train_labels = jax.numpy.argmax(om.load_digits().targets[:config["num_train"]], 1)
    budget = config["budget"]
    times, costs, dampings, iterations, sizes = [], [], [], [], []
    start = time.perf_counter()

    accuracies = []
    test_accuracy = jax.jit(lambda p: jax.numpy.mean(jax.numpy.argmax(
        jax.vmap(lambda u: apply(p, u))(test[0]), 1) == test[1]))

    def callback(step, params, state, cost):
        times.append(time.perf_counter() - start)
        accuracies.append(float(test_accuracy(params)))
        costs.append(float(cost))
        dampings.append(float(state.damping))
        iterations.append(int(state.solve_steps))
        sizes.append(float(state.step_size))
        return times[-1] >= budget

    result = om.fit(problem, params, None, max_steps=config.get("max_steps", 10**6),
                    progress=False, chunk_size=1, callback=callback)
    wall = time.perf_counter() - start
    ours = {"name": "outmetric default om.fit (full batch)", "wall_s": wall,
            "steps": result.num_steps, "status": result.status.name,
            "solver": om.SOLVERS[int(result.state.solver)],
            "first_step_s_with_compile": times[0] if times else None,
            "step_end_times_s": times, "costs": costs, "dampings": dampings,
            "cg_iterations": iterations, "step_sizes": sizes, "test_accuracies": accuracies,
            **metrics(problem, apply, test, result.params, train_labels)}
    print(f"  outmetric: {ours['steps']} steps in {wall:.1f} s, cost {ours['train_cost']:.4g}, "
          f"test accuracy {ours['test_accuracy']:.4f}", flush=True)
    adam_budget = min(wall, config.get("adam_budget", wall))
    bp = BenchProblem("digits_cross_entropy", "digits cross-entropy", problem, params, None,
                      adam_budget, 10**9, "K < QN")
    adams = []
    for lr in ADAM_RATES:
        r = run(Method(f"adam(lr={lr:g})", "adam",
                       lambda bp, lr=lr: optax_stepper(optax.adam(lr), bp)), bp,
                  budget_s=adam_budget)
        adams.append({"name": r.method, "learning_rate": lr, "batch": "full",
                      "seconds": r.seconds, "steps": r.steps, "compile_s": r.compile_seconds,
                      "status": r.status, **metrics(problem, apply, test, r.params,
                                                     train_labels)})
        print(f"  {r.method}: {r.steps} steps in {r.seconds:.1f} s, cost "
              f"{adams[-1]['train_cost']:.4g}, test accuracy {adams[-1]['test_accuracy']:.4f}",
              flush=True)
    best = min(adams, key=lambda a: a["train_cost"])
    return {"dtype": config["dtype"], "seed": config.get("seed", 0), "budget_s": budget,
            "adam_budget_s": adam_budget,
            "outmetric": ours, "adam": adams,
            "best_adam": best["name"],
            "lower_cost_than_best_adam": ours["train_cost"] < best["train_cost"],
            "test_accuracy_no_lower": ours["test_accuracy"] >= best["test_accuracy"],
            "memory": common.peak_memory()}


def markdown(record: dict) -> str:
    machine = record["machine"]
    load = record["load_average_before"], machine["load_average_1_5_15_min"]
    tiny = " (tiny: numbers mean nothing)" if record["tiny"] else ""
    lines = [f"# Digits cross-entropy, defaults{tiny}",
             "", f"`{record['command']}`", "",
             f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, "
             f"{machine['date']}; load average (1, 5, 15 min) before {load[0]}, after {load[1]} "
             "(a shared machine)", "",
             "## One default full-batch step", "",
             "| dtype | plan | compile (s) | steps (s) | median (s) | solvers | fallback | "
             "CG iterations | planned memory | peak RSS |", "|---" * 10 + "|"]
    for row in record["steps"]:
        if "error" in row:
            lines.append(f"| {row['dtype']} | error: {row['error'][-200:]} |")
            continue
        times = ", ".join(f"{s['seconds']:.2f}" for s in row["steps"])
        iterations = ", ".join(str(s["cg_iterations"]) for s in row["steps"])
        lines.append(
            f"| {row['dtype']} | {row['plan']['method']} | {row['compile_s']:.1f} | {times} | "
            f"{row['median_step_s']:.2f} | {', '.join(row['solvers'])} | {row['any_fallback']} | "
            f"{iterations} | "
            f"{row['planned_bytes'] / 2**20:.0f} MiB | {row['peak_bytes'] / 2**20:.0f} MiB |")
    for r in record.get("races", []):
        if "error" in r:
            lines += ["", f"race: error: {r['error'][-300:]}"]
            continue
        lines += ["", f"## Equal wall time: outmetric {r['outmetric']['wall_s']:.0f} s with its "
                  f"compilation, each Adam {r['adam_budget_s']:.0f} s without ({r['dtype']}, "
                  f"seed {r.get('seed', 0)}, full batch)", "",
                  "| method | steps | training cost (smoothed) | plain CE | test accuracy |",
                  "|---|---|---|---|---|"]
        for row in [r["outmetric"]] + r["adam"]:
            lines.append(f"| {row['name']} | {row['steps']} | {row['train_cost']:.7f} | "
                         f"{row['train_cross_entropy_plain']:.4g} | {row['test_accuracy']:.4f} |")
        lines += ["", f"Lower training cost than the best Adam ({r['best_adam']}): "
                  f"{r['lower_cost_than_best_adam']}; test accuracy no lower: "
                  f"{r['test_accuracy_no_lower']}."]
    races = [r for r in record.get("races", []) if "error" not in r]
    if races:
        lines += ["", "## Over the seeds", "",
                  "| dtype | seeds | lower cost than the best Adam | test accuracy no lower | both |"
                  " outmetric cost − best Adam's (median) | outmetric test accuracy − best Adam's"
                  " (median) |", "|---" * 7 + "|"]
        for dtype in sorted({r["dtype"] for r in races}):
            rows = [r for r in races if r["dtype"] == dtype]
            best = [min(r["adam"], key=lambda a: a["train_cost"]) for r in rows]
            cost = statistics.median(r["outmetric"]["train_cost"] - b["train_cost"]
                                     for r, b in zip(rows, best))
            accuracy = statistics.median(r["outmetric"]["test_accuracy"] - b["test_accuracy"]
                                         for r, b in zip(rows, best))
            lines.append(
                f"| {dtype} | {', '.join(str(r.get('seed', 0)) for r in rows)} | "
                f"{sum(r['lower_cost_than_best_adam'] for r in rows)}/{len(rows)} | "
                f"{sum(r['test_accuracy_no_lower'] for r in rows)}/{len(rows)} | "
                f"{sum(r['lower_cost_than_best_adam'] and r['test_accuracy_no_lower'] for r in rows)}"
                f"/{len(rows)} | {cost:+.2e} | {accuracy:+.4f} |")
    return "\n".join(lines) + "\n"


def run_one(config: dict) -> dict:
    return step_times(config) if config["part"] == "step" else race(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="60 digits, H = 16: a smoke test")
    parser.add_argument("--dtype", nargs="*", default=["float64", "float32"],
                        choices=["float64", "float32"], help="dtypes of the step timing")
    parser.add_argument("--race-dtype", nargs="*", default=["float64"],
                        choices=["float64", "float32"], help="dtypes of the race (none: skip)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="initialisation keys of the MLP, one race each (per race dtype)")
    parser.add_argument("--budget", type=float, default=60.0, help="wall seconds of the race")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (at least 3)")
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one)), default=float))
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3")
    load_before = os.getloadavg()
    size = dict(TINY if args.tiny else FULL)
    # --tiny: three steps of fit and 1 s of each Adam (compilation dominates; a smoke test).
    race_limits = {"max_steps": 3, "adam_budget": 1.0} if args.tiny else {}
    script = os.path.abspath(__file__)
    steps = []
    for dtype in args.dtype:
        row = common.run_isolated(script, dict(size, part="step", dtype=dtype, steps=args.steps),
                                  timeout=1800)
        steps.append(row)
        if "error" in row:
            print(dtype, "step: ERROR", row["error"][-800:], flush=True)
        else:
            print(f"{dtype}: plan {row['plan']['method']}, compile {row['compile_s']:.1f} s, "
                  f"median step {row['median_step_s']:.2f} s ({row['solvers']}, fallback "
                  f"{row['any_fallback']}), planned {row['planned_bytes'] / 2**20:.0f} MiB, peak "
                  f"RSS {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    common.setup_jax("float64")
    record = {"benchmark": "digits_cross_entropy", "command": common.command_line(),
              "tiny": args.tiny, "load_average_before": load_before, "steps": steps}
    for dtype in args.race_dtype:
        for seed in args.seeds:
            row = common.run_isolated(script, dict(size, part="race", dtype=dtype, seed=seed,
                                                   budget=args.budget, **race_limits),
                                      timeout=10 * args.budget + 600)
            if "error" in row:
                print(dtype, seed, "race: ERROR", row["error"][-800:], flush=True)
                row = dict(row, dtype=dtype, seed=seed)
            record.setdefault("races", []).append(row)
            record.setdefault("race", row)  # the first (--race-dtype's first dtype and seed)
    record["machine"] = common.machine_info()
    name = "digits_cross_entropy_tiny" if args.tiny else "digits_cross_entropy"
    path = common.write_json(args.out, name + ".json", record)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(markdown(record))
    print("wrote", path)


if __name__ == "__main__":
    main()
