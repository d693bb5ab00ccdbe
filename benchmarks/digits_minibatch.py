"""Digits cross-entropy on mini-batches: outmetric's stochastic steps against Adam (issue #15).

    python benchmarks/digits_minibatch.py [--tiny] [--batch B] [--budget S] [--seed S]
                                          [--out DIR]

The problem of `benchmarks/digits_cross_entropy.py` (1,347 training digits, 450 held out,
64-128-10 tanh MLP, K = 9,610, cross-entropy on 0.01-smoothed labels, float64). Every method
sees the same batches of ``--batch`` digits (default 128: QB = 1,280 ≤ K, the wide side),
reshuffled each epoch from one NumPy seed, for ``--budget`` seconds of wall time including
its compilation, in one process:

- ``fit(batches=...)`` with its default optimizer (``output_metric_descent(gram_average=0.3)``:
  on the wide side the trust region, one per batch);
- SPRING: ``output_metric_descent(damping=10.0, momentum=0.9)`` (λ and μ from a coarse
  search on this problem, λ in {1e-4, …, 10}, μ in {0, 0.9, 0.99}, 30 s each: smaller λ
  diverged, a cost of 0.4–16 after 30 s);
- ``optax.adam`` at learning rates 1e-2, 1e-3, 1e-4 on the same batches, one gradient each;
- for reference, the full-batch default ``om.fit`` (no batches).

Reported: updates, training cost on all 1,347 digits (the Problem's), and held-out accuracy
where each run ended. Writes ``--out/digits_minibatch.json`` and ``.md`` (``--tiny``: 60
digits, a 64-16-10 MLP, 1 s each; ``digits_minibatch_tiny.*``, a smoke test).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_cross_entropy as digits  # noqa: E402
import scale_common as common  # noqa: E402

SPRING = {"damping": 10.0, "momentum": 0.9}
ADAM_RATES = (1e-2, 1e-3, 1e-4)


def batch_stream(inputs, targets, size: int, seed: int = 0):
    """Endless mini-batches of `size`: a fresh permutation each epoch (incomplete tail dropped)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    while True:
        order = rng.permutation(len(inputs))
        for start in range(0, len(inputs) - size + 1, size):
            rows = order[start:start + size]
            yield inputs[rows], targets[rows]


def run_fit(problem, params, optimizer, batches, budget):
    """`om.fit` until `budget` s of wall time (compilation included); (params, updates, s)."""
    import outmetric as om

    start = time.perf_counter()
    result = om.fit(problem, params, optimizer, batches=batches, max_steps=10**7,
                    progress=False, chunk_size=10,
                    callback=lambda *_: time.perf_counter() - start >= budget)
    return result.params, result.num_steps, time.perf_counter() - start


def run_adam(problem, params, learning_rate, batches, budget):
    """Adam on the mini-batches until `budget` s (compilation included)."""
    import jax
    import optax

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, state, inputs, targets):
        grads = jax.grad(lambda p: problem.with_data(inputs, targets).cost(p))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state, steps, start = optimizer.init(params), 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        for _ in range(50):
            params, state = step(params, state, *next(batches))
            steps += 1
        jax.block_until_ready(params)
    return params, steps, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="60 digits, H = 16, 1 s each")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--budget", type=float, default=60.0, help="wall seconds per method")
    parser.add_argument("--seed", type=int, default=0, help="the MLP's initialisation key")
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    size = digits.TINY if args.tiny else digits.FULL
    batch = min(args.batch, 20) if args.tiny else args.batch
    budget = 1.0 if args.tiny else args.budget
    load_before = os.getloadavg()
    _, dtype = common.setup_jax("float64")
    import jax

    import outmetric as om

    problem, params, apply, test = digits.build(size["num_train"], size["hidden"], dtype,
                                                args.seed)
    labels = jax.numpy.argmax(om.load_digits().targets[:size["num_train"]], 1)
    runs = []

    def record(name, result):
        final, steps, seconds = result
        runs.append({"name": name, "steps": steps, "seconds": seconds,
                     **digits.metrics(problem, apply, test, final, labels)})
        print(f"{name}: {steps} updates in {seconds:.1f} s, cost {runs[-1]['train_cost']:.6g}, "
              f"test accuracy {runs[-1]['test_accuracy']:.4f}", flush=True)

    def stream():
        return batch_stream(problem.inputs, problem.targets, batch)

    record("outmetric fit(batches=...) default", run_fit(problem, params, None, stream(), budget))
    record(f"outmetric SPRING (damping={SPRING['damping']:g}, momentum={SPRING['momentum']:g})",
           run_fit(problem, params, om.output_metric_descent(**SPRING), stream(), budget))
    for lr in ADAM_RATES:
        record(f"adam(lr={lr:g}), mini-batch", run_adam(problem, params, lr, stream(), budget))
    record("outmetric default om.fit, full batch (reference)",
           run_fit(problem, params, None, None, budget))
    adams = [r for r in runs if r["name"].startswith("adam")]
    best = min(adams, key=lambda r: r["train_cost"])
    ours = runs[:2]  # the two mini-batch outmetric runs
    record_ = {"benchmark": "digits_minibatch", "command": common.command_line(),
               "tiny": args.tiny, "batch": batch, "budget_s": budget, "seed": args.seed,
               "spring": SPRING, "load_average_before": load_before, "runs": runs,
               "best_adam": best["name"],
               "lower_cost_than_best_adam": {r["name"]: r["train_cost"] < best["train_cost"]
                                             for r in ours},
               "machine": common.machine_info()}
    name = "digits_minibatch_tiny" if args.tiny else "digits_minibatch"
    path = common.write_json(args.out, name + ".json", record_)
    machine = record_["machine"]
    lines = [f"# Digits cross-entropy on mini-batches of {batch}"
             + (" (tiny: numbers mean nothing)" if args.tiny else ""), "",
             f"`{record_['command']}`", "",
             f"{machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, "
             f"{machine['date']}; load average before {load_before}, after "
             f"{machine['load_average_1_5_15_min']}; {budget:g} s of wall time each, "
             "compilation included; seed " + str(args.seed), "",
             "| method | updates | training cost (smoothed) | test accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['steps']} | {r['train_cost']:.6g} | {r['test_accuracy']:.4f} |"
              for r in runs]
    lines += ["", f"Best Adam by training cost: {best['name']}. Lower training cost than it: "
              + ", ".join(f"{k}: {v}" for k, v in record_["lower_cost_than_best_adam"].items())
              + "."]
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
