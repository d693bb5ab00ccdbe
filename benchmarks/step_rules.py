"""Which damping and step rule win where: the evidence behind `output_metric_descent`'s defaults.

    python -m benchmarks.step_rules [--only nist illc sinc pinn_poisson heat] [--out DIR]

Variants of `output_metric_descent` on the tall-side problems, where the default changed
(issue #12): MINPACK's trust region with scaled damping and geodesic acceleration (the
default), the same without the acceleration, the same with isotropic damping, Nielsen's Levenberg–Marquardt with scaled damping, and the round-1 default
(Levenberg–Marquardt, isotropic, Cholesky). Measures, per problem:

- `nist`: datasets × starts solved to LRE ≥ 6 (of 54; data from ../shared/nist or --data);
- `illc`: C/C(0) after 30 updates on the ill-conditioned tanh fit of the test suite
  (200 equispaced points, 1-60-1, K = 181);
- `sinc`, `pinn_poisson`: updates to C ≤ 1e-10·C(0), and the relative L² error after 400
  updates (`benchmarks.problems`);
- `heat`: the L² error after 1000 updates on the (1+1)-D heat PINN (`benchmarks.pinn`).

Writes `step_rules.json` and prints a Markdown table. Step counts, not times, are the point
here (the comparison of times is `benchmarks.run`, `benchmarks.nist`).
"""

import argparse
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import outmetric as om  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "trust region, scaled (default)": {},
    "trust region, scaled, no geodesic acceleration": {"geodesic_acceleration": False},
    "trust region, isotropic": {"scaling": "identity"},
    "Levenberg–Marquardt, scaled": {"step_rule": "levenberg_marquardt"},
    "round-1 default (LM, isotropic, Cholesky)": {"scaling": "identity", "solver": "cholesky"},
}


def nist(options, data):
    from benchmarks.least_squares import lre
    from benchmarks.nist import load_dataset, residual_fn

    opt = om.output_metric_descent(**options)
    solved = 0
    for path in sorted(glob.glob(os.path.join(data, "*.json"))):
        dataset = load_dataset(path)
        problem = om.Problem.from_residual(residual_fn(dataset), dataset["num_observations"])
        for start in ("start1", "start2"):
            result = om.fit(problem, jnp.asarray(dataset[start], float), opt, progress=False)
            solved += lre(np.asarray(result.params), np.asarray(dataset["certified"])) >= 6
    return {"solved_of_54": int(solved)}


def _updates(options, problem, params, steps, error_fn=None):
    opt = om.output_metric_descent(**options)
    update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))
    state, costs = opt.init(params), [float(problem.cost(params))]
    for _ in range(steps):
        u, state = update(state, params)
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, u)
        costs.append(float(problem.cost(params)))
    out = {"cost_ratio": costs[-1] / costs[0]}
    below = np.nonzero(np.asarray(costs) <= 1e-10 * costs[0])[0]
    out["updates_to_1e-10"] = int(below[0]) if below.size else None
    if error_fn is not None:
        out["error"] = float(error_fn(params))
    return out


def illc(options):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_optimizer import ill_conditioned_problem

    return _updates(options, *ill_conditioned_problem(), 30)


def from_problems(name, steps):
    from benchmarks.problems import PROBLEMS

    def run(options):
        bp = PROBLEMS[name](False)
        return _updates(options, bp.problem, bp.params, steps, bp.error_fn)

    return run


def heat(options):
    from benchmarks.pinn import heat as build

    bench = build(False)
    return _updates(options, bench.problem, bench.params, 1000, bench.error_fn)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["nist", "illc", "sinc", "pinn_poisson",
                                                       "heat"])
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "nist"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    cases = {"nist": lambda o: nist(o, args.data), "illc": illc,
             "sinc": from_problems("sinc", 1000), "pinn_poisson": from_problems("pinn_poisson", 400),
             "heat": heat}
    results = {}
    for case in args.only:
        for label, options in VARIANTS.items():
            results.setdefault(case, {})[label] = cases[case](options)
            print(case, label, results[case][label], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_rules.json"), "w") as f:
        json.dump({"command": " ".join(["python -m benchmarks.step_rules", *(argv or sys.argv[1:])]),
                   "results": results}, f, indent=1)
    print("| case | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for case, row in results.items():
        print(f"| {case} | " + " | ".join(json.dumps(row[v]) for v in VARIANTS) + " |")


if __name__ == "__main__":
    main()
