"""What `fit` costs beyond its compiled steps, on tiny problems (issue #12, item 5).

    python -m benchmarks.fit_overhead [--repeats R] [--out DIR]

For a few NIST datasets (the tiny fits where a per-call overhead shows most), the default
``outmetric.fit(problem, x0, progress=False)`` is timed warm (median of `--repeats`), and so is
the same number of optimizer steps run as one compiled chunk, called directly (`_fit`'s own
compiled loop, no host work around it). The difference is fit's fixed cost per call: argument
checks, the compiled prologue (initial cost, finite check, the optimizer's init), dispatch, one
host transfer and the result.
Writes ``fit_overhead.json`` under `--out` (default `benchmarks/results`).
"""

import argparse
import json
import os
import time

import numpy as np

from . import least_squares as ls
from . import nist

import jax  # noqa: E402  (x64 is switched on by least_squares)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

DATASETS = ("Misra1a", "Chwirut2", "Gauss1", "Thurber", "MGH09")


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(name: str, data_dir: str, repeats: int) -> dict:
    import outmetric as om
    from outmetric import _fit

    data = nist.load_dataset(os.path.join(data_dir, f"{name}.json"))
    lsp = nist.least_squares_problem(data)
    problem = om.Problem.from_residual(lsp.residual, num_residuals=lsp.num_residuals)
    x0 = jnp.asarray(data["start1"], jnp.float64)
    optimizer = ls.outmetric_optimizer()
    result = om.fit(problem, x0, optimizer, progress=False)
    fit_ms = _median_ms(lambda: om.fit(problem, x0, optimizer, progress=False).params, repeats)
    wrapped = optax.with_extra_args_support(optimizer)
    values, state = _fit._compiled_start(wrapped, False)(problem, x0)
    carry = (x0, state, *values, np.int32(0), np.int32(-1))
    chunk = _fit._compiled_chunk(wrapped, False, 100)
    chunk_ms = _median_ms(
        lambda: chunk(problem, carry, np.int32(result.num_steps), np.asarray(-np.inf)), repeats)
    return {"dataset": name, "steps": int(result.num_steps), "status": result.status.name,
            "fit_ms": round(fit_ms, 3), "compiled_steps_ms": round(chunk_ms, 3),
            "overhead_ms": round(fit_ms - chunk_ms, 3),
            "fit_over_compiled": round(fit_ms / chunk_ms, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--data", default=nist.DEFAULT_DATA)
    parser.add_argument("--out", default=nist.DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = []
    for name in DATASETS:
        rows.append(measure(name, args.data, args.repeats))
        print(rows[-1])
    result = {"machine": ls.machine_info(),
              "load_average": os.getloadavg(),
              "command": "python -m benchmarks.fit_overhead", "rows": rows,
              "median_overhead_ms": float(np.median([r["overhead_ms"] for r in rows])),
              "median_fit_over_compiled": float(np.median([r["fit_over_compiled"]
                                                           for r in rows]))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fit_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"median overhead {result['median_overhead_ms']:.3f} ms, fit / compiled steps "
          f"{result['median_fit_over_compiled']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
