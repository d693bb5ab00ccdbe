"""Step time and peak memory of every output-metric solver, per problem size (issue #4).

    python benchmarks/scale_solvers.py [--quick] [--only NAME ...] [--dtype float64|float32]
                                       [--out DIR]

For each size (an MLP and a number of samples N; QN rows, K parameters) and each solver, one
optimizer step ``output_metric_descent(1.0, damping=λ, linesearch=None, solver=..., ...)`` is
compiled, run once, then timed (median of a few runs, `block_until_ready`), with
λ = 10⁻³·‖Dᵀz‖²/QN for a Rademacher z (10⁻³ times a one-probe estimate of the mean Gram
diagonal, the adaptive default's starting λ) and the time of the per-sample Jacobian alone
(``jit(problem.jacobian)``) for comparison. Each (size, solver) runs in its own process so that
its peak memory — the device's ``peak_bytes_in_use`` on GPU, the process's peak RSS on CPU (which
includes the ~0.3 GB of the JAX runtime itself) — is its own. Every step is compared with the
dense Cholesky step of the same size (relative difference of the direction).

Sizes: QN ∈ {256, 1024, 4096} on a 16-256-256-1 MLP (K = 70 401), QN = 4096 as N = 512 samples
with Q = 8, and the memory check of the issue: the matrix-free ("cg", "lsmr") step of a
32-1000-1000-1 MLP (K = 1 035 001) on QN = 4096 samples (its dense D would take 34 GB in
float64). The JSON goes to ``--out/scale_solvers.json`` (default `benchmarks/results`), with
the targets: dense step ≤ 1.5× the Jacobian alone for QN ≤ 4096, matrix-free step of the
K ≈ 10⁶ MLP under 4 GB. ``--quick`` runs two tiny sizes in one process (a smoke test; its
numbers mean nothing). Runs unchanged on a GPU.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_common as common  # noqa: E402

#: name -> (solver, options) of `output_metric_descent`.
SOLVERS = {
    "auto": ("auto", {}),
    "cholesky_structured": ("cholesky", {"gram": "structured"}),
    "cholesky_dense": ("cholesky", {"gram": "jacobian"}),
    "cholesky_chunked": ("cholesky", {"gram": "jacobian", "chunk_size": "N/4"}),
    "qr": ("qr", {}),
    "cg": ("cg", {}),
    "cg_jacobi": ("cg", {"preconditioner": "jacobi"}),
    "cg_nystrom": ("cg", {"preconditioner": "nystrom", "preconditioner_rank": 100}),
    "lsmr": ("lsmr", {}),
}
DENSE = ["auto", "cholesky_structured", "cholesky_dense", "cholesky_chunked"]
ITERATIVE = ["cg", "cg_jacobi", "cg_nystrom", "lsmr"]

#: name -> (MLP sizes, N, solvers, iteration cap of CG/LSMR, timed repeats).
SIZES = {
    "qn256": ([16, 256, 256, 1], 256, ["jacobian"] + DENSE + ["qr"] + ITERATIVE, 500, 5),
    "qn1024": ([16, 256, 256, 1], 1024, ["jacobian"] + DENSE + ["qr"] + ITERATIVE, 500, 3),
    "qn4096": ([16, 256, 256, 1], 4096, ["jacobian"] + DENSE + ITERATIVE, 500, 2),
    "qn4096_q8": ([16, 256, 256, 8], 512, ["jacobian", "auto", "cholesky_structured",
                                           "cholesky_dense", "cg", "lsmr"], 500, 2),
    "k1m_qn4096": ([32, 1000, 1000, 1], 4096, ["cg", "lsmr", "auto"], 100, 1),
}
QUICK = {
    "quick_wide": ([4, 32, 2], 16, ["jacobian", "cholesky_structured", "cg_nystrom", "lsmr"],
                   200, 1),
}


def build(sizes, num_samples, dtype):
    """(problem, params) of an MLP on random data, seeded, in `dtype`."""
    import jax
    import jax.numpy as jnp

    import outmetric as om

    apply, params = om.mlp(jax.random.PRNGKey(0), sizes, dtype=dtype)
    ku, ky = jax.random.split(jax.random.PRNGKey(1))
    inputs = jax.random.normal(ku, (num_samples, sizes[0]), dtype)
    targets = jnp.sin(inputs[:, : sizes[-1]] * 2.0) + 0.1 * jax.random.normal(
        ky, (num_samples, sizes[-1]), dtype)
    return om.Problem(apply, inputs, targets), params


def damping_for(problem, params):
    """10⁻³ times the one-probe Hutchinson estimate ‖Dᵀz‖²/QN of the mean Gram diagonal."""
    import jax
    import jax.numpy as jnp

    x = problem.outputs(params)
    probe = jax.random.rademacher(jax.random.PRNGKey(2), x.shape, x.dtype)
    grad = jax.flatten_util.ravel_pytree(problem.vjp(params, probe))[0]
    return float(1e-3 * jnp.sum(grad**2) / x.size)


def run_one(config: dict) -> dict:
    """One (size, solver): compile, time, peak memory; the step is saved for comparison."""
    import jax
    import numpy as np

    _, dtype = common.setup_jax(config["dtype"])
    import optax  # noqa: F401 - imported before the measurement starts
    from jax.flatten_util import ravel_pytree

    import outmetric as om

    baseline = common.peak_memory()
    problem, params = build(config["sizes"], config["num_samples"], dtype)
    num_rows = problem.num_samples * problem.output_dim
    out = dict(config, num_rows=num_rows, num_params=om.num_parameters(params))
    if config["solver"] == "jacobian":
        jacobian = jax.jit(lambda p, prob: prob.jacobian(p))
        timing = common.timeit(jacobian, params, problem, repeats=config["repeats"])
    else:
        lam = damping_for(problem, params)
        method, options = SOLVERS[config["solver"]]
        options = dict(options)
        if options.get("chunk_size") == "N/4":
            options["chunk_size"] = max(1, config["num_samples"] // 4)
        opt = om.output_metric_descent(1.0, damping=lam, linesearch=None, solver=method,
                                       cg_max_steps=config["max_steps"], **options)
        state = opt.init(params)
        update = jax.jit(opt.update)
        timing = common.timeit(lambda s, p, prob: update(None, s, p, problem=prob), state, params,
                               problem, repeats=config["repeats"])
        step, new_state = timing["out"]
        step = np.asarray(ravel_pytree(step)[0])
        out.update(damping=lam, picked=om.SOLVERS[int(new_state.solver)],
                   rank=int(new_state.rank), fallback=bool(new_state.fallback),
                   step_norm=float(np.linalg.norm(step)))
        plan = om.plan_solve(problem, params, solver=method, damping=lam,
                             chunk_size=options.get("chunk_size"),
                             gram=options.get("gram", "auto"))
        out["plan"] = plan._asdict()
        if config.get("save"):
            np.save(config["save"], step)
    timing.pop("out")
    out.update(timing)
    out["memory"] = common.peak_memory()
    out["memory_baseline"] = baseline
    out["peak_bytes"] = common.peak_bytes(out["memory"])
    if config["solver"] != "jacobian" and out["picked"] in ("cg", "lsmr"):
        out.update(_iterations(problem, params, out["picked"], lam, options, config["max_steps"]))
    return out


def _iterations(problem, params, method, lam, options, max_steps):
    """Iterations and convergence of the step's matrix-free solve (after the memory reading)."""
    import jax

    from outmetric import _solve

    @jax.jit
    def solve(params, problem):
        lin = _solve.linearize(problem, params, method=method)
        residual = (problem.num_samples * problem.output_gradient(lin.outputs)).reshape(-1)
        result = _solve.solve(lin, residual, damping=lam, solver=method, cg_max_steps=max_steps,
                              preconditioner=options.get("preconditioner"),
                              preconditioner_rank=options.get("preconditioner_rank"))
        return result.num_steps, result.converged

    steps, converged = solve(params, problem)
    return {"iterations": int(steps), "converged": bool(converged), "iteration_cap": max_steps}


def main(argv=None):
    parser = common.size_parser(__doc__.split("\n")[0], SIZES)
    parser.add_argument("--solvers", nargs="*", help=f"solvers to run, of {list(SOLVERS)} "
                        "and 'jacobian' (default: each size's list)")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the (size, solver) pairs run in an existing "
                             "--out/scale_solvers.json, keeping the others")
    args = parser.parse_args(argv)
    started = common.start(args, run_one, SIZES, QUICK)
    if started is None:
        return
    machine, sizes = started
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, (mlp, num_samples, names, max_steps, repeats) in sizes.items():
            steps = {}
            for name in names:
                if args.solvers and name not in args.solvers:
                    continue
                save = os.path.join(tmp, f"{size}_{name}.npy")
                config = {"size": size, "sizes": mlp, "num_samples": num_samples,
                          "solver": name, "dtype": args.dtype, "max_steps": max_steps,
                          "repeats": repeats, "save": save}
                if args.quick:
                    result = run_one(config)
                else:
                    result = common.run_isolated(os.path.abspath(__file__), config, timeout=900)
                result.pop("save", None)
                if os.path.exists(save):
                    import numpy as np

                    steps[name] = np.load(save)
                results.append(result)
                print(_line(result), flush=True)
            _compare(results, size, steps)
    previous = os.path.join(args.out, "scale_solvers.json")
    commands = [common.command_line()]
    if args.merge and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        ran = {(r["size"], r["solver"]) for r in results}
        results = [r for r in old["results"] if (r["size"], r["solver"]) not in ran] + results
        commands = old.get("commands", [old["command"]]) + commands
    payload = {"benchmark": "scale_solvers", "command": common.command_line(),
               "commands": commands,
               "dtype": args.dtype, "quick": args.quick,
               "machine": dict(machine, load_average_at_end=common.machine_info()[
                   "load_average_1_5_15_min"]),
               "results": results, "targets": {} if args.quick else targets(results)}
    path = common.write_json(args.out, "scale_solvers.json", payload)
    print(json.dumps(payload["targets"], indent=1))
    print("wrote", path)


def _compare(results, size, steps):
    """Relative difference of each step from the dense Cholesky (or structured) step."""
    import numpy as np

    ref_name = next((n for n in ("cholesky_dense", "cholesky_structured", "auto") if n in steps),
                    None)
    if ref_name is None:
        return
    ref = steps[ref_name]
    for result in results:
        if result.get("size") == size and result.get("solver") in steps:
            diff = np.linalg.norm(steps[result["solver"]] - ref) / np.linalg.norm(ref)
            result["relative_difference_to"] = {ref_name: float(diff)}


def _line(result):
    if "error" in result:
        return f"{result['size']:>12} {result['solver']:>20}  ERROR {result['error'][:200]}"
    mem = result["peak_bytes"] / 2**30
    extra = f" picked={result['picked']}" if "picked" in result else ""
    return (f"{result['size']:>12} {result['solver']:>20}  QN={result['num_rows']:>5} "
            f"K={result['num_params']:>8}  median {result['median_s']:.4f} s  first "
            f"{result['first_s']:.2f} s  peak {mem:.2f} GiB{extra}")


def targets(results) -> dict:
    """The issue's targets, met or missed, from the measured results."""
    by = {(r["size"], r["solver"]): r for r in results if "error" not in r}
    out = {"dense_step_vs_jacobian": [], "matrix_free_memory": []}
    for size in SIZES:
        jac = by.get((size, "jacobian"))
        if jac is None or size.startswith("k1m"):
            continue
        for name in ("auto", "cholesky_structured", "cholesky_dense", "cholesky_chunked"):
            step = by.get((size, name))
            if step is None:
                continue
            # Judged on the fastest run of each (the machine may be shared); medians shown too.
            ratio = step["min_s"] / jac["min_s"]
            out["dense_step_vs_jacobian"].append({
                "size": size, "num_rows": step["num_rows"], "solver": name,
                "step_min_s": step["min_s"], "jacobian_min_s": jac["min_s"], "ratio": ratio,
                "ratio_of_medians": step["median_s"] / jac["median_s"], "target": 1.5,
                "met": ratio <= 1.5})
    for name in ("cg", "lsmr", "auto"):
        step = by.get(("k1m_qn4096", name))
        if step is not None:
            gib = step["peak_bytes"] / 2**30
            out["matrix_free_memory"].append({
                "solver": name, "picked": step.get("picked"), "num_params": step["num_params"],
                "num_rows": step["num_rows"], "peak_gib": gib, "step_s": step["median_s"],
                "target_gib": 4.0, "met": gib < 4.0})
    return out


if __name__ == "__main__":
    main()
