"""PINN benchmarks in the published ENGD/KFAC settings, and the runner that times them.

    python -m benchmarks.pinn [--only heat|poisson2d|poisson5d] [--quick] [--max-steps N]
                              [--budget S] [--methods outmetric engd adam lbfgs]
                              [--form pointwise|rows] [--out DIR]

The settings follow Dangel, Müller & Zeinhofer, *Kronecker-factored approximate curvature for
physics-informed neural networks* (NeurIPS 2024; code: f-dangel/kfac-pinns-experiments), which
re-runs the ENGD of Müller & Zeinhofer (ICML 2023) on them:

| name | PDE on [0, 1]^d | u* | MLP | points |
|---|---|---|---|---|
| `poisson2d` | −Δu = f | sin(πx)sin(πy) | 2-64-1 tanh | 900 interior + 120 boundary, drawn once |
| `poisson5d` | −Δu = f | Σ cos(πx_i) | 5-64-1 tanh | 3 000 + 500, redrawn every step |
| `heat` | u_t = ¼u_xx on (t, x) | exp(−π²t/4) sin(πx) | 2-64-1 tanh | 900 + 60 + 60 ¹ |

¹ 900 interior, 60 initial (t = 0) and 60 boundary (x ∈ {0, 1}) points, drawn once, as three
groups of the loss (the KFAC code averages its 120 initial and boundary points as one group).

Points are uniform (boundary points: a uniform point of the cube with one random coordinate set
to 0 or 1, as the KFAC code's `square_boundary`), drawn with NumPy's `default_rng` from a data
seed (the published runs used torch's generator, so the points differ). Initial parameters
follow torch's `nn.Linear` default, U(±1/√fan_in) for weights and biases. The loss is the sum
over groups of the group's mean squared residual, C = Σ_g (1/2N_g) Σ r², which is outmetric's
‖r‖²/(2m) after scaling each group's residuals by √(m/N_g). The error is the published one (the
KFAC code's `l2_error`): the root-mean-square of u_θ − u* over 10·N_Ω uniform interior points
drawn once with a separate seed (an absolute L² error; ‖u*‖_L² is 0.5 for the 2-D Poisson,
≈1.58 for the 5-D one and ≈0.32 for heat).

Every problem is written per collocation point, in two forms with the same cost and Jacobian:

- `pointwise` (default for training): an `om.ResidualProblem` with one `om.PointSet` per group
  (`interior`, `boundary`; heat: `interior`, `initial`, `boundary`), each with its residual
  function of (params, point) and weight 1, so C = Σ_g (1/2N_g) Σ r² directly; fresh points
  for `poisson5d` reach `fit` as point dicts (`Sampler.point_sets`).
- `rows`: a per-sample `om.Problem` whose sample is a row `(coordinates…, is_condition, weight,
  value)` and whose `apply_fn(params, row)` returns that point's weighted residual (one function
  for every group, both branches evaluated and one selected).

Both compute per-point Jacobian rows (DESIGN §4); `benchmarks/residual_step.py` times a step of
each.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import outmetric as om  # noqa: E402

THRESHOLDS = (1e-4, 1e-5, 1e-6, 1e-7, 5e-8)
ADAM_RATES = (1e-2, 1e-3, 1e-4)
BASELINE_FACTOR = 10.0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Best L² errors published for ENGD and Adam (as given in the task brief; see pinn.md).
PUBLISHED = {
    "poisson2d": {"ENGD": 6.2e-8, "Adam": 9.4e-5},
    "poisson5d": {"ENGD": 5.6e-8, "Adam": 1.1e-3},
    "heat": {"ENGD": 3.05e-8, "Adam": 1.2e-4},
}


# ----------------------------------------------------------------------------- the problems


def mlp_apply(params, x):
    """The network of `om.mlp`: tanh hidden layers, a linear output; `params` a list of
    `{"w": (fan_in, fan_out), "b": (fan_out,)}`."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def torch_linear_init(seed: int, sizes):
    """Parameters for `mlp_apply` initialised as torch's `nn.Linear`: U(±1/√fan_in) for
    weights and biases (NumPy's generator: nothing to compile)."""
    rng = np.random.default_rng(seed)
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(m)
        params.append({"w": jnp.asarray(rng.uniform(-bound, bound, (m, n))),
                       "b": jnp.asarray(rng.uniform(-bound, bound, n))})
    return params


def cube_boundary(rng, n, dim):
    """n uniform points on the boundary of [0, 1]^dim: one random coordinate set to 0 or 1."""
    x = rng.uniform(size=(n, dim))
    x[np.arange(n), rng.integers(0, dim, n)] = rng.integers(0, 2, n)
    return x


@dataclass(frozen=True)
class Pde:
    """A PDE with a known solution. `exact(p, xp)` is u* and `source(p, xp)` the interior value
    v (`xp` is numpy or jax.numpy); `operator(u, p)` is the differential part of the interior
    residual operator(u)(p) + v, zero at u*; `groups(rng, sizes)` draws the point groups."""

    name: str
    dim: int
    exact: Callable
    source: Callable
    operator: Callable          # (u: p -> scalar, p) -> scalar
    groups: Callable            # (rng, sizes) -> [(points, is_condition)], fixed order


def laplacian(u, p):
    return jnp.trace(jax.hessian(u)(p))


def heat_operator(u, p):
    """u_t − ¼u_xx at p = (t, x)."""
    return jax.grad(u)(p)[0] - 0.25 * jax.hessian(u)(p)[1, 1]


def sin_product(p, xp=jnp):
    return xp.prod(xp.sin(np.pi * p), axis=-1)


def cos_sum(p, xp=jnp):
    return xp.sum(xp.cos(np.pi * p), axis=-1)


def heat_exact(p, xp=jnp):
    return xp.exp(-np.pi**2 * p[..., 0] / 4) * xp.sin(np.pi * p[..., 1])


def _poisson_groups(dim):
    def groups(rng, sizes):
        n_in, n_bd = sizes
        return [(rng.uniform(size=(n_in, dim)), 0.0), (cube_boundary(rng, n_bd, dim), 1.0)]
    return groups


def _heat_groups(rng, sizes):
    """Interior (t, x) uniform; initial points (0, x); boundary points (t, 0 or 1)."""
    n_in, n_init, n_bd = sizes
    interior = rng.uniform(size=(n_in, 2))
    initial = np.column_stack([np.zeros(n_init), rng.uniform(size=n_init)])
    boundary = np.column_stack([rng.uniform(size=n_bd), rng.integers(0, 2, n_bd)])
    return [(interior, 0.0), (initial, 1.0), (boundary.astype(float), 1.0)]


PDES = {
    "poisson2d": Pde("poisson2d", 2, sin_product,
                     lambda p, xp=jnp: 2 * np.pi**2 * sin_product(p, xp), laplacian,
                     _poisson_groups(2)),
    "poisson5d": Pde("poisson5d", 5, cos_sum, lambda p, xp=jnp: np.pi**2 * cos_sum(p, xp),
                     laplacian, _poisson_groups(5)),
    "heat": Pde("heat", 2, heat_exact, lambda p, xp=jnp: xp.zeros(p.shape[:-1]), heat_operator,
                _heat_groups),
}


def make_rows(pde: Pde, rng, sizes) -> np.ndarray:
    """The per-point rows `(coords…, is_condition, weight, value)` of one draw of points.

    Interior rows carry the source (residual = operator + value); condition rows carry u* (the
    boundary or initial value; residual = u − value). Each group's weight is √(m/N_g)."""
    groups = pde.groups(rng, sizes)
    m = sum(g[0].shape[0] for g in groups)
    blocks = []
    for points, is_cond in groups:
        n = points.shape[0]
        value = pde.exact(points, np) if is_cond else pde.source(points, np)
        blocks.append(np.column_stack([points, np.full(n, is_cond), np.full(n, math.sqrt(m / n)),
                                       value]))
    return np.concatenate(blocks)


GROUP_NAMES = {"poisson2d": ("interior", "boundary"), "poisson5d": ("interior", "boundary"),
               "heat": ("interior", "initial", "boundary")}


def point_sets(pde: Pde, apply, groups) -> dict:
    """`{name: om.PointSet}` for one draw of `pde.groups`: interior points get the residual
    operator(u)(p) + v(p), condition points u(p) − u*(p); every weight 1 (C = Σ_g mean r²/2)."""

    def interior(params, p):
        return pde.operator(lambda q: apply(params, q)[0], p) + pde.source(p)

    def condition(params, p):
        return apply(params, p)[0] - pde.exact(p)

    return {name: om.PointSet(condition if is_cond else interior, jnp.asarray(points))
            for name, (points, is_cond) in zip(GROUP_NAMES[pde.name], groups)}


def point_residual_fn(pde: Pde, apply):
    """`residual(params, row) -> (1,)`: the weighted residual of one collocation point."""
    d = pde.dim

    def residual(params, row):
        p, is_cond, weight, value = row[:d], row[d], row[d + 1], row[d + 2]

        def u(q):
            return apply(params, q)[0]

        r = jnp.where(is_cond > 0, u(p) - value, pde.operator(u, p) + value)
        return (weight * r)[None]

    return residual


class Sampler:
    """Fresh collocation points every step: iterating yields `(rows, zeros)` for draws 1, 2, …
    of `np.random.default_rng((seed, i))`; each `iter()` restarts the same sequence. Draw 0 is
    the problem's own points."""

    def __init__(self, pde: Pde, sizes, seed: int):
        self.pde, self.sizes, self.seed = pde, tuple(sizes), seed
        self.num_rows = sum(self.sizes)

    def draw(self, i: int):
        rows = make_rows(self.pde, np.random.default_rng((self.seed, i)), self.sizes)
        return jnp.asarray(rows), jnp.zeros((rows.shape[0], 1))

    def draw_sets(self, i: int) -> dict:
        """Draw i as `{group name: points}` (the same points as `draw(i)`), for
        `ResidualProblem.with_points` and `fit(batches=...)`."""
        groups = self.pde.groups(np.random.default_rng((self.seed, i)), self.sizes)
        return {name: jnp.asarray(points)
                for name, (points, _) in zip(GROUP_NAMES[self.pde.name], groups)}

    def point_sets(self) -> Iterator:
        """Draws 1, 2, … as point dicts."""
        i = 1
        while True:
            yield self.draw_sets(i)
            i += 1

    def __iter__(self) -> Iterator:
        i = 1
        while True:
            yield self.draw(i)
            i += 1


@dataclass
class PinnBench:
    """A PINN benchmark: the per-point `problem` in the `rows` form and `residual`, the same
    points as an `om.ResidualProblem` (for `poisson5d`: draw 0 of the sampler), `params`, a
    jittable `error_fn(params)` (RMS of u_θ − u* over held-out points), `sampler` (None for
    fixed points), the model `apply` and facts for the report."""

    name: str
    description: str
    pde: Pde
    problem: om.Problem
    params: object
    apply: Callable
    error_fn: Callable
    sampler: Sampler | None = None
    info: dict = field(default_factory=dict)
    residual: om.ResidualProblem | None = None

    def training(self, form: str = "pointwise"):
        """(problem, batches or None) for `om.fit` in `form` "pointwise" or "rows"."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        problem = self.residual if form == "pointwise" else self.problem
        if self.sampler is None:
            return problem, None
        return problem, (self.sampler.point_sets() if form == "pointwise" else self.sampler)

    def first_batch(self, form: str = "pointwise"):
        return self.sampler.draw_sets(0) if form == "pointwise" else self.sampler.draw(0)


FORMS = ("pointwise", "rows")


def build(name: str, *, width: int, sizes, num_eval: int, resample: bool, data_seed: int = 0,
          model_seed: int = 1, eval_seed: int = 12345) -> PinnBench:
    pde = PDES[name]
    apply = mlp_apply
    params = torch_linear_init(model_seed, (pde.dim, width, 1))
    sampler = Sampler(pde, sizes, data_seed)
    rows, zeros = sampler.draw(0)  # fixed points: draw 0 is all there is
    residual = om.ResidualProblem(point_sets(pde, apply, pde.groups(
        np.random.default_rng((data_seed, 0)), tuple(sizes))))
    sampler = sampler if resample else None
    problem = om.Problem(point_residual_fn(pde, apply), rows, zeros)
    held_out = np.random.default_rng(eval_seed).uniform(size=(num_eval, pde.dim))
    eval_points, exact = jnp.asarray(held_out), jnp.asarray(pde.exact(held_out, np))

    def error_fn(params):
        pred = jax.vmap(lambda p: apply(params, p)[0])(eval_points)
        return jnp.sqrt(jnp.mean((pred - exact) ** 2))

    k = om.num_parameters(params)
    desc = (f"{name}: MLP {pde.dim}-{width}-1 tanh (K = {k}), points {'+'.join(map(str, sizes))}"
            f" = {rows.shape[0]}{', redrawn every step' if resample else ''}; error on "
            f"{num_eval} held-out points")
    info = {"width": width, "sizes": list(sizes), "num_points": int(rows.shape[0]),
            "num_params": k, "num_eval": num_eval, "resample": resample, "data_seed": data_seed,
            "model_seed": model_seed, "eval_seed": eval_seed}
    return PinnBench(name, desc, pde, problem, params, apply, jax.jit(error_fn), sampler, info,
                     residual)


def poisson2d(quick: bool = False, data_seed: int = 0) -> PinnBench:
    if quick:
        return build("poisson2d", width=8, sizes=(40, 16), num_eval=200, resample=False,
                 data_seed=data_seed)
    return build("poisson2d", width=64, sizes=(900, 120), num_eval=9000, resample=False,
                 data_seed=data_seed)


def poisson5d(quick: bool = False, data_seed: int = 0) -> PinnBench:
    if quick:
        return build("poisson5d", width=8, sizes=(40, 16), num_eval=200, resample=True,
                 data_seed=data_seed)
    return build("poisson5d", width=64, sizes=(3000, 500), num_eval=30000, resample=True,
                 data_seed=data_seed)


def heat(quick: bool = False, data_seed: int = 0) -> PinnBench:
    if quick:
        return build("heat", width=8, sizes=(40, 8, 8), num_eval=200, resample=False,
                 data_seed=data_seed)
    return build("heat", width=64, sizes=(900, 60, 60), num_eval=9000, resample=False,
                 data_seed=data_seed)


BUILDERS = {"heat": heat, "poisson2d": poisson2d, "poisson5d": poisson5d}


# ----------------------------------------------------------------------------- the ENGD rule


class EngdState(NamedTuple):
    count: jax.Array
    step_size: jax.Array   # the η the grid search picked at the last step
    cost: jax.Array        # C before the last step


try:  # fit skips its own backward pass for update functions registered here (internal API)
    from outmetric._transform import GRADIENT_FREE as _GRADIENT_FREE
except ImportError:  # pragma: no cover - the core may rename it; fit then also computes ∇C
    _GRADIENT_FREE = None


def _gradient_free(update_fn):
    if _GRADIENT_FREE is not None:
        _GRADIENT_FREE.add(update_fn)
    return update_fn


#: The ENGD codes' step grid: η ∈ {2^0, 2^-1, …, 2^-30} (KFAC code: logspace(-30, 0, 31, base=2);
#: ICML code: 0.5 ** linspace(0, 30, 31)).
ENGD_GRID = tuple(2.0**-k for k in range(31))


def engd(damping: float = 0.0, *, solver: str = "lstsq", grid=ENGD_GRID
         ) -> optax.GradientTransformationExtraArgs:
    """Energy natural gradient descent as the published codes do it, in outmetric's terms.

    Direction: the Gauss–Newton step δ = (DᵀD + λI)⁺Dᵀr, which is ENGD's G⁺∇L (G = DᵀD/m is
    the energy Gram, ∇L = Dᵀr/m for L = C). `solver="lstsq"`: `jnp.linalg.lstsq` of the K×K
    Gram (SVD, cut-off ε·K·σ_max), as the ICML code does; `"cholesky"`:
    `om.output_metric_gradient(..., damping=λ, solver="cholesky")`. Step: θ − η·δ with η the
    grid point of lowest cost (taken even if it does not decrease C, as in the published code).
    Note λ here is on DᵀD; the ENGD codes' damping on G is λ/m.
    """
    if solver not in ("lstsq", "lstsq-jacobian", "cholesky"):
        raise ValueError(f"solver must be 'lstsq', 'lstsq-jacobian' or 'cholesky', got {solver!r}")
    steps = jnp.asarray(grid)

    def init_fn(params):
        dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
        return EngdState(jnp.asarray(0), jnp.asarray(0.0, dtype), jnp.asarray(jnp.inf, dtype))

    def update_fn(updates, state, params=None, *, problem, **extra):
        del updates, extra
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        if solver == "lstsq":
            outputs, jac = problem.linearize(params)
            r = (outputs - problem.targets).reshape(-1)
            gram = jac.T @ jac + damping * jnp.eye(jac.shape[1], dtype=jac.dtype)
            delta = jnp.linalg.lstsq(gram, jac.T @ r)[0]
            cost0 = problem.cost_from_outputs(outputs)
        elif solver == "lstsq-jacobian":
            outputs, jac = problem.linearize(params)
            r = (outputs - problem.targets).reshape(-1)
            delta = jnp.linalg.lstsq(jac, r)[0]
            cost0 = problem.cost_from_outputs(outputs)
        else:
            direction, _, lin = om.output_metric_gradient(problem, params, damping=damping,
                                                          solver="cholesky")
            delta = problem.num_samples * jax.flatten_util.ravel_pytree(direction)[0]
            cost0 = problem.cost_from_outputs(lin.outputs)
        costs = jax.vmap(lambda eta: problem.cost(unravel(flat - eta * delta)))(
            steps.astype(flat.dtype))
        costs = jnp.where(jnp.isfinite(costs), costs, jnp.inf)
        eta = steps.astype(flat.dtype)[jnp.argmin(costs)]
        return unravel(-eta * delta), EngdState(state.count + 1, eta, cost0)

    return optax.GradientTransformationExtraArgs(init_fn, _gradient_free(update_fn))


def lbfgs(reuse: bool = True) -> optax.GradientTransformationExtraArgs:
    """`optax.lbfgs()` (memory 10, zoom line search) fed with `value`, `grad` and `value_fn`
    from the `problem` extra argument. `reuse`: take the value and gradient the line search
    computed at the new point (right for fixed points; pass False when the points change every
    step, where they belong to the previous batch)."""
    inner = optax.lbfgs()

    def update_fn(updates, state, params=None, *, problem, **extra):
        del updates, extra
        if reuse:
            value, grad = optax.value_and_grad_from_state(problem.cost)(params, state=state)
        else:
            value, grad = jax.value_and_grad(problem.cost)(params)
        return inner.update(grad, state, params, value=value, grad=grad, value_fn=problem.cost)

    return optax.GradientTransformationExtraArgs(inner.init, _gradient_free(update_fn))


# ----------------------------------------------------------------------------- the runner


def _find_state(state, cls):
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, cls))
    return next((s for s in leaves if isinstance(s, cls)), None)


def describe_state(state) -> dict:
    """What the records keep of an optimizer state: outmetric's λ and step fraction, ENGD's η."""
    cls = getattr(om, "OutputMetricDescentState", None)
    s = None if cls is None else _find_state(state, cls)
    if s is not None:
        return {"damping": float(s.damping), "step_size": float(s.step_size)}
    s = _find_state(state, EngdState)
    if s is not None:
        return {"step_size": float(s.step_size)}
    return {}


class RunResult(NamedTuple):
    """One optimizer on one problem. `records`: dicts (step, seconds, cost, error, …state) every
    `record_every` steps; `seconds` excludes compilation and the records' own evaluation.
    `costs`: fit's per-step cost history (for fresh points: each batch's cost)."""

    name: str
    records: list
    status: str
    steps: int
    seconds: float
    costs: np.ndarray
    params: object


def run(bench: PinnBench, optimizer, name: str, *, max_steps: int, budget_s: float,
        record_every: int = 10, stop_error: float | None = min(THRESHOLDS),
        state_info: Callable = describe_state, on_record: Callable | None = None,
        extra_fn: Callable | None = None, form: str = "pointwise") -> RunResult:
    """Train with `om.fit` (fresh points through `batches=` for `poisson5d`) until the error is
    ≤ `stop_error`, `budget_s` seconds of training, or `max_steps`.

    Compilation happens in a warm-up `fit` call before the clock starts. Every `record_every`
    steps the callback evaluates the error and the cost (on the fixed points; for `poisson5d` on
    draw 0) and subtracts its own time from the clock. `form`: train the `pointwise`
    `ResidualProblem` or the per-sample `rows` problem (`PinnBench.training`)."""
    problem, sampler = bench.training(form)
    cost_fn = jax.jit(lambda p: problem.cost(p))
    kwargs = dict(progress=False)
    if sampler is None:
        kwargs["chunk_size"] = record_every
        om.fit(problem, bench.params, optimizer, max_steps=record_every, **kwargs)  # compile
    else:
        # Three steps: a state's dtypes or weak types may change after the first update,
        # which would compile `fit`'s step again inside the timed region.
        om.fit(problem, bench.params, optimizer, max_steps=3,
               batches=[bench.first_batch(form)] * 3, **kwargs)
    jax.block_until_ready((bench.error_fn(bench.params), cost_fn(bench.params)))

    records = [dict(step=0, seconds=0.0, cost=float(cost_fn(bench.params)),
                    error=float(bench.error_fn(bench.params)))]
    clock = {"excluded": 0.0, "start": 0.0}

    def record(step, params, state):
        entry = dict(step=step, seconds=clock["now"], cost=float(cost_fn(params)),
                     error=float(bench.error_fn(params)), **state_info(state),
                     **(extra_fn(params) if extra_fn is not None else {}))
        records.append(entry)
        if on_record is not None:
            on_record(entry)
        return entry

    def callback(step, params, state, cost):
        now = time.perf_counter()
        clock["now"] = now - clock["start"] - clock["excluded"]
        stop = clock["now"] >= budget_s or step >= max_steps
        if step % record_every == 0 or stop:
            e = record(step, params, state)["error"]
            stop = stop or (stop_error is not None and e <= stop_error) or not math.isfinite(e)
        clock["excluded"] += time.perf_counter() - now
        return stop

    status = "max_steps"
    clock["start"] = time.perf_counter()
    try:
        if sampler is None:
            result = om.fit(problem, bench.params, optimizer, max_steps=max_steps,
                            callback=callback, **kwargs)
        else:
            result = om.fit(problem, bench.params, optimizer, max_steps=max_steps,
                            callback=callback, batches=sampler, **kwargs)
    except om.NonFiniteError as err:
        result, status = err.result, "non-finite"
    seconds = time.perf_counter() - clock["start"] - clock["excluded"]
    last = records[-1]
    if last["step"] != result.num_steps:
        clock["now"] = seconds
        record(result.num_steps, result.params, result.state)
    last = records[-1]
    if status != "non-finite":
        if stop_error is not None and last["error"] <= stop_error:
            status = "target"
        elif last["seconds"] >= budget_s:
            status = "budget"
        elif result.num_steps < max_steps:
            status = "halted"
    return RunResult(name, records, status, result.num_steps, last["seconds"],
                     np.asarray(result.costs), result.params)


def first_reached(records, threshold):
    """(steps, seconds) of the first record with error ≤ threshold, or None."""
    for r in records:
        if math.isfinite(r["error"]) and r["error"] <= threshold:
            return r["step"], r["seconds"]
    return None


# ----------------------------------------------------------------------------- the suite


def summarize(r: RunResult, budget_s: float, note: str = "", max_trace: int = 40) -> dict:
    """The JSON row of a run: thresholds reached, final values and a thinned trace."""
    records = r.records
    stride = max(1, math.ceil(len(records) / max_trace))
    trace = records[::stride] + ([records[-1]] if (len(records) - 1) % stride else [])
    last = records[-1]
    return {
        "method": r.name, "note": note, "status": r.status, "steps": r.steps,
        "seconds": round(r.seconds, 3), "budget_s": round(budget_s, 3),
        "final_error": last["error"], "final_cost": last["cost"],
        "best_error": min(e["error"] for e in records),
        "reached": {f"{t:g}": first_reached(records, t) for t in THRESHOLDS},
        "trace": [[e["step"], round(e["seconds"], 3), e["cost"], e["error"]] for e in trace],
    }


def median_over_draws(rows: list[dict]) -> dict:
    """outmetric over several point draws: the median final error, and per threshold the
    median seconds to reach it (a draw that did not reach it counts as never)."""
    def median_seconds(t):
        median = statistics.median(r["reached"][f"{t:g}"][1] if r["reached"][f"{t:g}"]
                                   else math.inf for r in rows)
        return None if math.isinf(median) else median
    return {"draws": len(rows), "final_errors": [r["final_error"] for r in rows],
            "median_final_error": statistics.median(r["final_error"] for r in rows),
            "median_seconds_to": {f"{t:g}": median_seconds(t) for t in THRESHOLDS}}


def _rank_key(row: dict):
    """Best of a sweep: earliest time to the tightest threshold reached, then the best error."""
    for t in reversed(THRESHOLDS):
        hit = row["reached"][f"{t:g}"]
        if hit is not None:
            return (-t, hit[1], row["best_error"])
    return (-1.0, 0.0, row["best_error"])


METHODS = ("outmetric", "engd", "adam", "lbfgs")


def run_problem(bench: PinnBench, *, budget_s: float, max_steps: int, quick: bool, log=print,
                methods=METHODS, form: str = "pointwise") -> dict:
    """outmetric's default and the ENGD rule with `budget_s`; Adam (sweep) and L-BFGS with
    `BASELINE_FACTOR` × outmetric's time (`outmetric` always runs: it sets that time)."""
    rows = {}

    def go(opt, name, budget, steps, every, note):
        t0 = time.perf_counter()
        r = run(bench, opt, name, max_steps=steps, budget_s=budget, record_every=every,
                form=form)
        row = summarize(r, budget, note)
        log(f"  {name}: {row['status']} after {row['steps']} steps, {row['seconds']:.1f} s "
            f"(wall {time.perf_counter() - t0:.0f} s); error {row['final_error']:.3g}, "
            f"best {row['best_error']:.3g}")
        return row

    # None: fit's default optimizer, output_metric_descent() on fixed points and
    # output_metric_descent(gram_average=0.3) when batches redraws them.
    note = ("fit's default with batches=: output_metric_descent(gram_average=0.3) (the Gram "
            "averaged over the batches, scaled damping 1e-8, ENGD's grid line search)"
            if bench.sampler is not None else
            "fit's default: output_metric_descent() (tall side: trust region on the SVD, scaled "
            "damping, geodesic acceleration)")
    rows["outmetric"] = go(None, "outmetric", budget_s, max_steps, 10, note)
    if "engd" in methods:
        rows["engd"] = go(engd(), "engd", budget_s, max_steps, 10,
                          "ENGD as published: lstsq of the Gram, grid line search over 2^-k")
    base = BASELINE_FACTOR * rows["outmetric"]["seconds"]
    big = max_steps if quick else 10_000_000
    rates = ADAM_RATES[1:2] if quick else ADAM_RATES
    if "adam" not in methods:
        rates = ()
    sweep = [go(optax.adam(lr), f"adam(lr={lr:g})", 0.2 * base if len(rates) > 1 else base,
                big, 100, "screening: 20 % of the budget") for lr in rates]
    if sweep:
        best = min(range(len(sweep)), key=lambda i: _rank_key(sweep[i]))
        if len(rates) > 1 and sweep[best]["status"] == "budget":
            sweep[best] = go(optax.adam(rates[best]), f"adam(lr={rates[best]:g})", base, big,
                             100, "best of the screening, rerun with the full budget")
        rows["adam"] = sweep[best]
        rows["adam_screening"] = [s for i, s in enumerate(sweep) if i != best]
    if "lbfgs" in methods:
        rows["lbfgs"] = go(lbfgs(reuse=bench.sampler is None), "lbfgs", base, big, 20,
                           "optax.lbfgs() (memory 10, zoom line search)")
    return rows


def machine() -> dict:
    from .run import machine_info
    return machine_info()


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# PINN benchmarks (ENGD/KFAC settings)", "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB, backend "
        f"{m.get('backend')}; jax {m['versions'].get('jax')}, optax {m['versions'].get('optax')}; "
        "float64. Command: `" + results["command"] + "`"
        + (" (**--quick**: tiny problems, numbers mean nothing)" if results["quick"] else ""), "",
        "Error: root-mean-square of u_θ − u* over held-out uniform interior points (the KFAC "
        "code's `l2_error`). Times: training wall-clock seconds after compilation, the error "
        "evaluation excluded; steps to a threshold are resolved to the record interval (10 "
        "steps for outmetric and ENGD, 20 for L-BFGS, 100 for Adam). outmetric and ENGD get "
        f"the budget; Adam (best of lr ∈ {{{', '.join(f'{r:g}' for r in ADAM_RATES)}}}, each "
        "screened with 20 % of the budget) and L-BFGS get 10× outmetric's time. One run each.",
        "",
    ]
    for name, prob in results["problems"].items():
        pub = PUBLISHED.get(name, {})
        la = prob.get("load_average")
        lines += [f"## {name}", "", prob["description"] + (
            f". Load average (1 min) at start / end: {la[0]} / {la[1]}" if la else ""), "",
                  "| method | " + " | ".join(f"to {t:g}" for t in THRESHOLDS)
                  + " | final error | best error | steps | seconds | status |",
                  "|---|" + "---|" * (len(THRESHOLDS) + 5)]
        for key in METHODS:
            if key not in prob["runs"]:
                continue
            row = prob["runs"][key]
            cells = []
            for t in THRESHOLDS:
                hit = row["reached"][f"{t:g}"]
                cells.append("—" if hit is None else f"{hit[0]} / {hit[1]:.1f} s")
            lines.append(f"| {row['method']} | " + " | ".join(cells)
                         + f" | {row['final_error']:.2e} | {row['best_error']:.2e} | "
                         f"{row['steps']} | {row['seconds']:.1f} | {row['status']} |")
        if pub:
            lines.append(f"| published ENGD / Adam (best) | " + " | ".join("" for _ in THRESHOLDS)
                         + f" | {pub['ENGD']:.3g} / {pub['Adam']:.3g} | | | | |")
        lines.append("")
    for name, med in results.get("medians", {}).items():
        lines += [f"## {name}: outmetric over {med['draws']} point draws", "",
                  "| | " + " | ".join(f"to {t:g}" for t in THRESHOLDS) + " | final errors | "
                  "median final error |",
                  "|---|" + "---|" * (len(THRESHOLDS) + 2),
                  "| median seconds | " + " | ".join(
                      "—" if med["median_seconds_to"][f"{t:g}"] is None
                      else f"{med['median_seconds_to'][f'{t:g}']:.1f} s" for t in THRESHOLDS)
                  + " | " + ", ".join(f"{e:.3g}" for e in med["final_errors"])
                  + f" | {med['median_final_error']:.3g} |", ""]
    lines += ["Published numbers: the best L² errors quoted in the task brief for ENGD and Adam "
              "(Müller & Zeinhofer 2023; Dangel, Müller & Zeinhofer 2024), reached on GPUs with "
              "tuned hyperparameters and far longer runs; cells are steps / seconds.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pinn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny problems (smoke run)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step cap for outmetric and ENGD (default 3000; quick 20)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for outmetric and ENGD (default 60; quick 0.5)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which methods (outmetric always runs)")
    parser.add_argument("--form", choices=FORMS, default="pointwise",
                        help="the problem trained: om.ResidualProblem (pointwise, default) or "
                        "the per-sample om.Problem of rows")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0],
                        help="point draws: each problem runs once per seed of its collocation "
                        "points (default 0); with several, the markdown adds outmetric's median")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 60.0)
    max_steps = args.max_steps if args.max_steps is not None else (20 if args.quick else 3000)
    names = args.only or ["heat", "poisson2d", "poisson5d"]
    cmd = "python -m benchmarks.pinn " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"machine": machine(), "quick": args.quick, "command": cmd.strip(),
               "form": args.form,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "thresholds": list(THRESHOLDS), "published": PUBLISHED, "problems": {}}
    start = time.perf_counter()
    several = len(args.data_seeds) > 1
    for name in names:
        for seed in args.data_seeds:
            bench = BUILDERS[name](args.quick, data_seed=seed)
            key = f"{name}, points seed {seed}" if several else name
            print(f"{key}: {bench.description}", flush=True)
            load = os.getloadavg()[0]
            runs = run_problem(bench, budget_s=budget, max_steps=max_steps, quick=args.quick,
                               log=lambda s: print(s, flush=True), methods=args.methods,
                               form=args.form)
            results["problems"][key] = {"description": bench.description, "info": bench.info,
                                        "runs": runs, "load_average": [round(load, 2), round(
                                            os.getloadavg()[0], 2)]}
        if several:
            results.setdefault("medians", {})[name] = median_over_draws(
                [results["problems"][f"{name}, points seed {seed}"]["runs"]["outmetric"]
                 for seed in args.data_seeds])
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pinn.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "pinn.md"), "w") as f:
        f.write(render_markdown(results))
    print(f"wrote {os.path.join(args.out, 'pinn.json')} and pinn.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
