"""The benchmark problems: each builder returns a `BenchProblem` (a `Problem`, initial params, a
target and a time budget).

Every problem is deterministic (fixed seeds) and built in the current default float dtype
(`benchmarks.run` turns float64 on). `quick=True` builds a smaller version for the smoke run.

| name | what | regime | target |
|---|---|---|---|
| `diabetes` | MLP 10-64-64-1 (tanh) on the bundled diabetes data, N = 442 | K = 4 929 ≥ QN | C ≤ 1e-10·C(0) |
| `oscillating` | MLP 1-48-48-1 (tanh) on 256 equispaced points of an oscillating function; the Gram matrix is numerically singular | K = 2 497 ≥ QN | C ≤ 1e-10·C(0) |
| `synthetic` | MLP 8-64-64-2 (tanh) on 256 Gaussian inputs, targets from a random teacher network plus noise | K = 4 866 ≥ QN = 512 | C ≤ 1e-10·C(0) |
| `sinc` | curve fit of sinc(10x) on 200 points by a 1-20-1 tanh network (61 parameters), the setting Levenberg–Marquardt libraries advertise; nearly representable | K < N | C ≤ 1e-10·C(0) |
| `underparametrised` | MLP 10-8-1 (tanh) on the diabetes data | K = 97 < QN = 442 | C within 1 % of the best cost any method reached |
| `pinn_poisson` | physics-informed network for −Δu = f on the unit square, u = sin(πx)sin(πy); MLP 2-32-1 (tanh); 784 interior + 116 boundary residuals on a 30×30 grid, one residual per sample | K = 129 < 900 | relative L² error ≤ 1e-6 (and Adam's 1e-3) |

The PINN loss is the one of Müller & Zeinhofer, *Achieving high accuracy with PINNs via energy
natural gradient descent* (ICML 2023):
$L(\\theta) = \\frac{1}{2N_\\Omega}\\sum(\\Delta u_\\theta + f)^2 + \\frac{1}{2N_{\\partial}}\\sum u_\\theta^2$,
written as outmetric's $\\frac1{2m}\\lVert r\\rVert^2$ by scaling each residual group by
$\\sqrt{m/N_\\text{group}}$.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import outmetric as om


@dataclass(frozen=True)
class BenchProblem:
    """One benchmark problem.

    - `problem`, `params`: the outmetric `Problem` and the initial parameters (shared by every
      method).
    - `target`: absolute cost at which a run stops (None: run to the budget and measure the
      time to within `relative_gap` of the best cost any method reached).
    - `budget_s`, `max_steps`: per-run wall-time budget (after compilation) and step cap;
      `family_budgets` overrides the budget for some method families (Adam on the PINN needs
      about a minute to reach its target).
    - `error_fn`: optional jittable `params -> scalar` error metric (the PINN's relative L²
      error), evaluated between chunks outside the timed region; `error_targets` are the
      thresholds whose first-crossing times are reported.
    """

    name: str
    description: str
    problem: om.Problem
    params: object
    target: float | None
    budget_s: float
    max_steps: int
    regime: str
    relative_gap: float = 0.01
    family_budgets: dict = field(default_factory=dict)
    error_fn: Callable | None = None
    error_name: str | None = None
    error_targets: tuple[float, ...] = ()
    info: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return om.num_parameters(self.params)

    @property
    def num_outputs(self) -> int:
        return self.problem.num_samples * self.problem.output_dim

    @property
    def cost0(self) -> float:
        return float(self.problem.cost(self.params))


def _mlp_problem(name, description, inputs, targets, sizes, *, seed, budget_s, max_steps,
                 target_ratio=1e-10, regime=None, **extra):
    apply, params = om.mlp(jax.random.PRNGKey(seed), sizes, "tanh")
    problem = om.Problem(apply, jnp.asarray(inputs), jnp.asarray(targets))
    k = om.num_parameters(params)
    m = problem.num_samples * problem.output_dim
    regime = regime or ("over" if k >= m else "under")
    target = target_ratio * float(problem.cost(params)) if target_ratio is not None else None
    return BenchProblem(name, description, problem, params, target, budget_s, max_steps, regime,
                        **extra)


def diabetes(quick: bool = False) -> BenchProblem:
    """Issue #3 (a): overparametrised MLP regression on real data (the bundled dataset)."""
    data = om.load_dataset()
    n, width = (64, 16) if quick else (442, 64)
    return _mlp_problem(
        "diabetes", f"MLP 10-{width}-{width}-1 on the bundled diabetes data (N={n})",
        data.inputs[:n], data.targets[:n], [10, width, width, 1], seed=0,
        budget_s=0.5 if quick else 10.0, max_steps=50 if quick else 10_000_000,
    )


def oscillating_targets(x):
    """An oscillating 1-D function with several scales: sin(6πx) + 0.5·cos(13x²)·x."""
    return np.sin(6 * np.pi * x) + 0.5 * np.cos(13 * x**2) * x


def oscillating(quick: bool = False) -> BenchProblem:
    """Issue #3 (b): an ill-conditioned 1-D regression (equispaced points, numerically singular Gram)."""
    n, width = (48, 12) if quick else (256, 48)
    x = np.linspace(-1.0, 1.0, n)[:, None]
    y = oscillating_targets(x)
    return _mlp_problem(
        "oscillating", f"MLP 1-{width}-{width}-1 on {n} equispaced points of "
        "sin(6πx) + 0.5x·cos(13x²)", x, y, [1, width, width, 1], seed=1,
        budget_s=0.5 if quick else 20.0, max_steps=50 if quick else 10_000_000,
    )


def synthetic(quick: bool = False) -> BenchProblem:
    """Overparametrised regression on synthetic data with two outputs (a teacher network + noise)."""
    n, d, q, width = (32, 4, 2, 12) if quick else (256, 8, 2, 64)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d))
    teacher_apply, teacher = om.mlp(jax.random.PRNGKey(100), [d, 32, q], "tanh")
    y = np.asarray(jax.vmap(teacher_apply, in_axes=(None, 0))(teacher, jnp.asarray(x)))
    y = y + 0.1 * rng.normal(size=y.shape)
    return _mlp_problem(
        "synthetic", f"MLP {d}-{width}-{width}-{q} on {n} Gaussian inputs, teacher-network "
        "targets + noise", x, y, [d, width, width, q], seed=3,
        budget_s=0.5 if quick else 6.0, max_steps=50 if quick else 10_000_000,
    )


def sinc(quick: bool = False) -> BenchProblem:
    """A 1-D curve fit with a small network: sinc(10x) by 1-20-1 tanh (61 parameters).

    K = 61 < N = 200, but 20 tanh units represent sinc(10x) on [−1, 1] almost exactly
    (Levenberg–Marquardt drives C below 1e-15·C(0)), so the target is C ≤ 1e-10·C(0).
    """
    n, width = (40, 8) if quick else (200, 20)
    x = np.linspace(-1.0, 1.0, n)[:, None]
    y = np.sinc(10 * x / np.pi)  # sin(10x)/(10x)
    return _mlp_problem(
        "sinc", f"curve fit of sin(10x)/(10x) on {n} points, MLP 1-{width}-1", x, y,
        [1, width, 1], seed=4, budget_s=0.5 if quick else 6.0,
        max_steps=50 if quick else 10_000_000,
    )


def underparametrised(quick: bool = False) -> BenchProblem:
    """An underparametrised fit (K < QN): a narrow MLP on the diabetes data."""
    data = om.load_dataset()
    n, width = (64, 3) if quick else (442, 8)
    return _mlp_problem(
        "underparametrised", f"MLP 10-{width}-1 on the diabetes data (N={n})",
        data.inputs[:n], data.targets[:n], [10, width, 1], seed=5, target_ratio=None,
        budget_s=0.5 if quick else 5.0, max_steps=50 if quick else 10_000_000,
    )


# ---------------------------------------------------------------------------------- the PINN


def poisson_exact(p):
    """u(x, y) = sin(πx) sin(πy)."""
    return jnp.sin(jnp.pi * p[..., 0]) * jnp.sin(jnp.pi * p[..., 1])


def poisson_source(p):
    """f = −Δu = 2π² sin(πx) sin(πy)."""
    return 2 * jnp.pi**2 * poisson_exact(p)


def unit_square_grid(n: int):
    """The n×n grid on [0, 1]², split into interior and boundary points."""
    t = np.linspace(0.0, 1.0, n)
    xx, yy = np.meshgrid(t, t, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    on_boundary = (np.isclose(pts, 0.0) | np.isclose(pts, 1.0)).any(axis=1)
    return jnp.asarray(pts[~on_boundary]), jnp.asarray(pts[on_boundary])


def poisson_pinn(key, *, width: int = 32, grid: int = 30, eval_grid: int = 100,
                 stacked: bool = False):
    """The PINN for −Δu = f on [0, 1]² with zero boundary values.

    Returns `(problem, params, apply, rel_l2_error)`. The cost of `problem` is the
    Müller–Zeinhofer loss; `rel_l2_error(params)` is ‖u_θ − u‖/‖u‖ on an `eval_grid`² grid.

    By default the problem is written **per collocation point**: each sample is a row
    `(x, y, interior?, weight, f)` and `apply_fn(params, row)` returns that point's residual, so
    `Problem` computes the Jacobian per sample (one reverse pass per point, DESIGN §4). With
    `stacked=True` it is the same loss as `Problem.from_residual` of the stacked residual
    vector, whose Jacobian costs K forward passes over all points (≈ 20× slower here).
    """
    apply, params = om.mlp(key, [2, width, 1], "tanh")
    interior, boundary = unit_square_grid(grid)
    n_in, n_bd = interior.shape[0], boundary.shape[0]
    m = n_in + n_bd
    w_in, w_bd = math.sqrt(m / n_in), math.sqrt(m / n_bd)

    def u(params, p):
        return apply(params, p)[0]

    def laplacian(params, p):
        return jnp.trace(jax.hessian(u, argnums=1)(params, p))

    if stacked:
        f_in = poisson_source(interior)

        def residual(params):
            lap = jax.vmap(laplacian, in_axes=(None, 0))(params, interior)
            r_in = w_in * (lap + f_in)
            r_bd = w_bd * jax.vmap(u, in_axes=(None, 0))(params, boundary)
            return jnp.concatenate([r_in, r_bd])

        problem = om.Problem.from_residual(residual, m)
    else:
        pts = jnp.concatenate([interior, boundary])
        inside = jnp.concatenate([jnp.ones(n_in), jnp.zeros(n_bd)])
        rows = jnp.column_stack([pts, inside, jnp.where(inside > 0, w_in, w_bd),
                                 jnp.where(inside > 0, poisson_source(pts), 0.0)])

        def point_residual(params, row):
            p, is_inside, weight, f = row[:2], row[2], row[3], row[4]
            r = jnp.where(is_inside > 0, laplacian(params, p) + f, u(params, p))
            return (weight * r)[None]

        problem = om.Problem(point_residual, rows, jnp.zeros((m, 1)))
    t = jnp.linspace(0.0, 1.0, eval_grid)
    xx, yy = jnp.meshgrid(t, t, indexing="ij")
    grid_pts = jnp.stack([xx.ravel(), yy.ravel()], axis=1)
    exact = poisson_exact(grid_pts)
    exact_norm = jnp.linalg.norm(exact)

    def rel_l2_error(params):
        pred = jax.vmap(u, in_axes=(None, 0))(params, grid_pts)
        return jnp.linalg.norm(pred - exact) / exact_norm

    return problem, params, apply, rel_l2_error


def pinn_poisson(quick: bool = False) -> BenchProblem:
    """The energy-natural-gradient PINN setting: Poisson on the unit square, MLP 2-32-1."""
    width, grid = (8, 10) if quick else (32, 30)
    problem, params, _, error = poisson_pinn(jax.random.PRNGKey(6), width=width, grid=grid,
                                             eval_grid=40 if quick else 100)
    return BenchProblem(
        "pinn_poisson", f"PINN for −Δu = f on [0,1]², u = sin(πx)sin(πy), MLP 2-{width}-1, "
        f"{grid}×{grid} grid ({problem.num_samples} residuals)", problem, params,
        target=None, budget_s=0.5 if quick else 10.0, max_steps=50 if quick else 10_000_000,
        regime="under", family_budgets={} if quick else {"adam": 80.0}, error_fn=error, error_name="relative L2 error",
        error_targets=(1e-3, 1e-6),
    )


PROBLEMS: dict[str, Callable[[bool], BenchProblem]] = {
    "diabetes": diabetes,
    "oscillating": oscillating,
    "synthetic": synthetic,
    "sinc": sinc,
    "underparametrised": underparametrised,
    "pinn_poisson": pinn_poisson,
}
