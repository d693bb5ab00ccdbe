"""Step rules on the 5-D Poisson PINN with points redrawn every step (issue #13).

    python -m benchmarks.pinn_batch_rules [--steps 350] [--rules NAME ...] [--out DIR]

Writes `pinn_batch_rules.json` and `.md` under `--out` (default `benchmarks/results`).

Each rule trains `benchmarks.pinn.poisson5d()` through `om.fit(batches=...)` (draw i of the
sampler before step i, the same for every rule) for `--steps` steps; the L² error (RMS of
u_θ − u* on 30 000 held-out points) is recorded every 10 steps. Step counts are deterministic;
ms/step depend on the machine's load (noted per row).

Rules (λ relative to the scaled Gram's unit diagonal where "scaled"):

- `trust region`, `trust region, no acceleration`: `output_metric_descent()` with
  `geodesic_acceleration=True` / `False` (the fixed-data default, before and after the
  `fresh_data` switch);
- `engd`, `engd-ema(0.3)`: ENGD as the published codes (`benchmarks.pinn.engd`: lstsq of the
  K×K Gram, grid η ∈ 2^-k) and with the KFAC-PINN code's exponential moving average of the
  Gram (factor 0.3, identity start, damping 1e-10 on G = DᵀD/M, i.e. 3.5e-7 on DᵀD);
- `scaled λ + grid, ema β`: (G̃_β + λI)⁻¹ on the column-scaled EMA Gram, grid η of lowest cost
  (all 31 evaluated), no cut-off of small eigenvalues;
- `gram_average=β, λ`: the library's rule (`output_metric_descent(gram_average=β)`,
  `AVERAGED_DAMPING = λ`; β = 0.3, λ = 1e-8 is `fit`'s default with `batches=`).
"""

import argparse
import json
import os
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from . import pinn
from .pinn import om

THRESHOLDS = (1e-4, 1e-5, 1e-6, 1e-7)


class _EmaState(NamedTuple):
    gram: jax.Array
    count: jax.Array


def ema_engd(lam: float, ema: float, *, scaled: bool, identity: bool = False):
    """δ = (G_ema + λI)⁻¹Dᵀr (lstsq; `scaled`: on the Gram scaled to a unit diagonal, by eigh),
    then the grid η of lowest cost on the batch (ENGD's line search, all 31 points)."""
    steps = jnp.asarray(pinn.ENGD_GRID)

    def init_fn(params):
        k = jax.flatten_util.ravel_pytree(params)[0].shape[0]
        return _EmaState(jnp.eye(k) if identity else jnp.zeros((k, k)), jnp.asarray(0))

    def update_fn(updates, state, params=None, *, problem, **extra):
        del updates, extra
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        outputs, jac = problem.linearize(params)
        r = (outputs - problem.targets).reshape(-1)
        batch = jac.T @ jac
        start = (state.count == 0) & (not identity)
        gram = jnp.where(start, batch, ema * state.gram + (1 - ema) * batch)
        if scaled:
            d = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(gram), jnp.finfo(gram.dtype).tiny))
            mu, vecs = jnp.linalg.eigh(d[:, None] * gram * d[None, :])
            delta = d * (vecs @ ((vecs.T @ (d * (jac.T @ r))) / (jnp.maximum(mu, 0) + lam)))
        else:
            delta = jnp.linalg.lstsq(gram + lam * jnp.eye(gram.shape[0]), jac.T @ r)[0]
        costs = jax.vmap(lambda eta: problem.cost(unravel(flat - eta * delta)))(steps)
        eta = steps[jnp.argmin(jnp.where(jnp.isfinite(costs), costs, jnp.inf))]
        return unravel(-eta * delta), _EmaState(gram, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, pinn._gradient_free(update_fn))


def library_rule(beta: float, lam: float):
    def make():
        from outmetric import _transform
        _transform.AVERAGED_DAMPING = lam  # read when the update is traced
        return om.output_metric_descent(gram_average=beta)
    return make


RULES = {
    "trust region": lambda: om.output_metric_descent(geodesic_acceleration=True),
    "trust region, no acceleration": lambda: om.output_metric_descent(
        geodesic_acceleration=False),
    "engd": lambda: pinn.engd(),
    "engd-ema(0.3)": lambda: ema_engd(3.5e-7, 0.3, scaled=False, identity=True),
    "scaled λ=1e-7 + grid, no ema": lambda: ema_engd(1e-7, 0.0, scaled=True),
    "scaled λ=1e-7 + grid, ema 0.3": lambda: ema_engd(1e-7, 0.3, scaled=True),
    "scaled λ=1e-8 + grid, ema 0.3": lambda: ema_engd(1e-8, 0.3, scaled=True),
    "gram_average=0.3, λ=1e-7": library_rule(0.3, 1e-7),
    "gram_average=0.5, λ=1e-8": library_rule(0.5, 1e-8),
    "gram_average=0.3, λ=1e-8 (default)": library_rule(0.3, 1e-8),
}


def render(results: dict) -> str:
    """The markdown table of a `pinn_batch_rules.json`."""
    lines = ["# Step rules on the 5-D Poisson PINN, points redrawn every step", "",
             f"`python -m benchmarks.pinn_batch_rules` ({results['steps']} steps per rule; see the "
             "module docstring for the rules). Steps to each L² error are resolved to 10; "
             "ms/step is training wall-clock after compilation on 2 cores shared with other "
             "jobs (load average at start / end of the row).", "",
             "| rule | to 1e-4 | to 1e-5 | to 1e-6 | to 1e-7 | best error | ms/step | load |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        cells = ["—" if row["to"][f"{t:g}"] is None else str(row["to"][f"{t:g}"])
                 for t in THRESHOLDS]
        load = row["load_average"]
        lines.append(f"| {row['rule']} | " + " | ".join(cells)
                     + f" | {row['best_error']:.2g} | {row['ms_per_step']} | {load[0]} / {load[1]} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pinn_batch_rules",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    bench = pinn.poisson5d()
    rows = []
    for name in args.rules:
        load = os.getloadavg()[0]
        r = pinn.run(bench, RULES[name](), name, max_steps=args.steps, budget_s=1e9,
                     record_every=10, stop_error=min(THRESHOLDS))
        hits = {f"{t:g}": (pinn.first_reached(r.records, t) or (None,))[0] for t in THRESHOLDS}
        row = {"rule": name, "steps": r.steps, "to": hits,
               "best_error": min(e["error"] for e in r.records),
               "ms_per_step": round(1e3 * r.seconds / max(r.steps, 1)),
               "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    results = {"steps": args.steps, "rows": rows}
    with open(os.path.join(args.out, "pinn_batch_rules.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "pinn_batch_rules.md"), "w") as f:
        f.write(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
