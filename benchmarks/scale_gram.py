"""Time and peak memory of the Gram matrix DDᵀ (the empirical NTK), computed five ways (issue #4).

    python benchmarks/scale_gram.py [--quick] [--only NAME ...] [--dtype float64|float32]
                                    [--out DIR]

Methods, each compiled, run once, then timed (median, `block_until_ready`) in its own process:

- `naive_jacrev`: ``jax.jacrev`` of the stacked batch function θ ↦ x(θ) ∈ R^{QN} (QN reverse
  passes over the whole batch), then D·Dᵀ — the path DESIGN §4 warns about;
- `per_sample`: the per-sample Jacobian (vmap of jacrev, `Problem.jacobian`), then D·Dᵀ;
- `chunked`: `outmetric._gram.jacobian_gram` with chunks of N/4 samples (D never held whole);
- `structured`: `outmetric.structured_gram` (layer activations and backpropagated signals);
- `jjt_only`: the product J·Jᵀ alone, J given (the part of `per_sample` the structured Gram
  replaces);
- `neural_tangents`: ``nt.empirical_ntk_fn`` (structured derivatives), if it imports.

Sizes: an 8-256-256-1 MLP (K = 68 353, DESIGN §4's size) at N ∈ {128, 256, 1024}, and the
64-128-10 MLP on N = 100 samples of the issue. Targets, written with the results to
``--out/scale_gram.json``: Gram ≥ 10× faster than `naive_jacrev` at N = 1024; `structured`
≥ 10× faster than `jjt_only` on the 64-128-10 MLP; `structured` equal to J·Jᵀ to 1e-10
relative (float64). ``--quick``: tiny sizes in one process (a smoke test). Runs unchanged on a
GPU.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_common as common  # noqa: E402

METHODS = ["naive_jacrev", "per_sample", "chunked", "structured", "jjt_only", "neural_tangents"]

#: name -> (MLP sizes, N, methods, timed repeats)
SIZES = {
    "k68k_n128": ([8, 256, 256, 1], 128, METHODS, 3),
    "k68k_n256": ([8, 256, 256, 1], 256, METHODS, 3),
    "k68k_n1024": ([8, 256, 256, 1], 1024, METHODS, 3),
    "mlp_64_128_10_n100": ([64, 128, 10], 100, METHODS, 5),
}
QUICK = {"quick": ([4, 16, 2], 8, ["naive_jacrev", "per_sample", "structured"], 1)}


def build(sizes, num_samples, dtype):
    import jax

    import outmetric as om

    apply, params = om.mlp(jax.random.PRNGKey(0), sizes, dtype=dtype)
    ku, ky = jax.random.split(jax.random.PRNGKey(1))
    inputs = jax.random.normal(ku, (num_samples, sizes[0]), dtype)
    targets = jax.random.normal(ky, (num_samples, sizes[-1]), dtype)
    return om.Problem(apply, inputs, targets), params, apply


def _neural_tangents(apply, problem, params):
    """``nt.empirical_ntk_fn`` as a Gram of shape (QN, QN), or the reason it is unavailable."""
    try:
        import neural_tangents as nt
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
        return None, f"neural_tangents does not import: {type(error).__name__}: {error}"
    import jax

    kernel = nt.empirical_ntk_fn(lambda p, u: jax.vmap(apply, (None, 0))(p, u),
                                 trace_axes=(), vmap_axes=0,
                                 implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)
    num_rows = problem.num_samples * problem.output_dim

    def gram(params, problem):
        k = kernel(problem.inputs, None, params)  # (N, N, Q, Q)
        return k.transpose(0, 2, 1, 3).reshape(num_rows, num_rows)

    return gram, None


def run_one(config: dict) -> dict:
    import jax
    import numpy as np

    _, dtype = common.setup_jax(config["dtype"])
    from jax.flatten_util import ravel_pytree

    import outmetric as om
    from outmetric import _gram

    baseline = common.peak_memory()
    problem, params, apply = build(config["sizes"], config["num_samples"], dtype)
    out = dict(config, num_rows=problem.num_samples * problem.output_dim,
               num_params=om.num_parameters(params))
    method = config["method"]
    args = (params, problem)
    if method == "naive_jacrev":
        def gram(params, problem):
            flat, unravel = ravel_pytree(params)
            jac = jax.jacrev(lambda f: problem.outputs(unravel(f)).reshape(-1))(flat)
            return jac @ jac.T
    elif method == "per_sample":
        def gram(params, problem):
            jac = problem.jacobian(params)
            return jac @ jac.T
    elif method == "chunked":
        def gram(params, problem):
            return _gram.jacobian_gram(problem, params,
                                       chunk_size=max(1, problem.num_samples // 4))
    elif method == "structured":
        def gram(params, problem):
            return om.structured_gram(problem, params)[1]
    elif method == "jjt_only":
        jac = jax.block_until_ready(jax.jit(lambda p, prob: prob.jacobian(p))(params, problem))
        args = (jac,)

        def gram(jac):
            return jac @ jac.T
    elif method == "neural_tangents":
        gram, reason = _neural_tangents(apply, problem, params)
        if gram is None:
            out["unavailable"] = reason
            return out
    else:
        raise ValueError(f"unknown method {method!r}")
    try:
        timing = common.timeit(jax.jit(gram), *args, repeats=config["repeats"])
    except Exception as error:  # noqa: BLE001 - e.g. neural-tangents failing under this JAX
        if method != "neural_tangents":
            raise
        out["unavailable"] = f"neural_tangents failed: {type(error).__name__}: {error}"[:500]
        return out
    if config.get("save"):
        np.save(config["save"], np.asarray(timing["out"]))
    timing.pop("out")
    out.update(timing)
    out["memory"] = common.peak_memory()
    out["memory_baseline"] = baseline
    out["peak_bytes"] = common.peak_bytes(out["memory"])
    if method == "structured":
        structure = om.gram_structure(problem, params)
        out["structure"] = {"layers": list(structure.layers),
                            "num_structured": structure.num_structured}
    return out


def main(argv=None):
    parser = common.size_parser(__doc__.split("\n")[0], SIZES)
    args = parser.parse_args(argv)
    started = common.start(args, run_one, SIZES, QUICK)
    if started is None:
        return
    machine, sizes = started
    results = []
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        for size, (mlp, num_samples, methods, repeats) in sizes.items():
            grams = {}
            for method in methods:
                save = os.path.join(tmp, f"{size}_{method}.npy")
                config = {"size": size, "sizes": mlp, "num_samples": num_samples,
                          "method": method, "dtype": args.dtype, "repeats": repeats,
                          "save": save}
                if args.quick:
                    result = run_one(config)
                else:
                    result = common.run_isolated(os.path.abspath(__file__), config, timeout=900)
                result.pop("save", None)
                if os.path.exists(save):
                    grams[method] = np.load(save)
                results.append(result)
                print(_line(result), flush=True)
            reference = grams.get("per_sample")
            if reference is not None:
                for result in results:
                    if result.get("size") == size and result.get("method") in grams:
                        diff = grams[result["method"]] - reference
                        result["relative_difference_to_per_sample"] = float(
                            np.linalg.norm(diff) / np.linalg.norm(reference))
    payload = {"benchmark": "scale_gram", "command": common.command_line(), "dtype": args.dtype,
               "quick": args.quick,
               "machine": dict(machine, load_average_at_end=common.machine_info()[
                   "load_average_1_5_15_min"]), "results": results,
               "targets": {} if args.quick else targets(results)}
    path = common.write_json(args.out, "scale_gram.json", payload)
    print(json.dumps(payload["targets"], indent=1))
    print("wrote", path)


def _line(result):
    if "error" in result:
        return f"{result['size']:>20} {result['method']:>16}  ERROR {result['error'][:300]}"
    if "unavailable" in result:
        return f"{result['size']:>20} {result['method']:>16}  {result['unavailable'][:200]}"
    return (f"{result['size']:>20} {result['method']:>16}  QN={result['num_rows']:>5} "
            f"K={result['num_params']:>7}  median {result['median_s']:.4f} s  first "
            f"{result['first_s']:.2f} s  peak {result['peak_bytes'] / 2**30:.2f} GiB")


def targets(results) -> dict:
    by = {(r["size"], r["method"]): r for r in results if "median_s" in r}
    out = {}
    naive = by.get(("k68k_n1024", "naive_jacrev"))
    if naive:
        for method in ("structured", "per_sample", "chunked"):
            if ("k68k_n1024", method) in by:
                other = by[("k68k_n1024", method)]
                speedup = naive["min_s"] / other["min_s"]
                out[f"gram_{method}_vs_naive_jacrev_n1024"] = {
                    "naive_min_s": naive["min_s"], "method_min_s": other["min_s"],
                    "speedup": speedup, "speedup_of_medians": naive["median_s"] / other["median_s"],
                    "target": 10.0, "met": speedup >= 10.0}
    size = "mlp_64_128_10_n100"
    if (size, "structured") in by:
        structured = by[(size, "structured")]
        for method in ("jjt_only", "per_sample"):
            if (size, method) in by:
                other = by[(size, method)]
                speedup = other["min_s"] / structured["min_s"]
                out[f"structured_vs_{method}_64_128_10"] = {
                    "method_min_s": other["min_s"], "structured_min_s": structured["min_s"],
                    "speedup": speedup,
                    "speedup_of_medians": other["median_s"] / structured["median_s"],
                    "target": 10.0, "met": speedup >= 10.0}
    agreement = [r["relative_difference_to_per_sample"] for r in results
                 if r.get("method") == "structured" and "relative_difference_to_per_sample" in r]
    if agreement:
        out["structured_equals_jjt"] = {"max_relative_difference": max(agreement),
                                        "target": 1e-10, "met": max(agreement) <= 1e-10}
    nt = [r for r in results if r.get("method") == "neural_tangents"]
    if nt:
        out["neural_tangents"] = nt[0].get("unavailable", "available: see results")
    return out


if __name__ == "__main__":
    main()
