"""The PINN benchmark problems (`benchmarks/pinn.py`): loss, Jacobian, PDE data, sampler, runner.

The stacked residuals below are written independently of the per-point rows: second
derivatives by forward-over-reverse per coordinate, sources and solutions from their formulas,
group weights from the group sizes. Never asserts a wall-clock number.
"""

import json
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import pinn


def _second(u, p, i):
    """∂²u/∂p_i² by a JVP of the gradient along e_i."""
    e = jnp.zeros_like(p).at[i].set(1.0)
    return jax.jvp(lambda q: jax.grad(u)(q)[i], (p,), (e,))[1]


def _stacked(bench):
    """(raw residual groups as functions of params, group sizes) written from the formulas."""
    pts = np.asarray(bench.problem.inputs)
    d = bench.pde.dim
    x, cond = jnp.asarray(pts[:, :d]), pts[:, d] > 0
    apply = bench.apply
    if bench.name == "heat":
        initial = cond & (pts[:, 0] == 0.0)
        groups = [x[~cond], x[initial], x[cond & ~initial]]

        def interior(params, p):
            u = lambda q: apply(params, q)[0]  # noqa: E731
            return jax.grad(u)(p)[0] - 0.25 * _second(u, p, 1)

        def exact(p):
            return jnp.exp(-jnp.pi**2 * p[0] / 4) * jnp.sin(jnp.pi * p[1])

        kinds = ["pde", "value", "value"]
    else:
        groups = [x[~cond], x[cond]]

        def interior(params, p):
            u = lambda q: apply(params, q)[0]  # noqa: E731
            lap = sum(_second(u, p, i) for i in range(d))
            f = (2 * jnp.pi**2 * jnp.prod(jnp.sin(jnp.pi * p)) if d == 2
                 else jnp.pi**2 * jnp.sum(jnp.cos(jnp.pi * p)))
            return lap + f

        def exact(p):
            return jnp.prod(jnp.sin(jnp.pi * p)) if d == 2 else jnp.sum(jnp.cos(jnp.pi * p))

        kinds = ["pde", "value"]

    def raw(params):
        out = []
        for g, kind in zip(groups, kinds):
            if kind == "pde":
                out.append(jax.vmap(lambda p: interior(params, p))(g))
            else:
                out.append(jax.vmap(lambda p: apply(params, p)[0] - exact(p))(g))
        return out

    return raw, [g.shape[0] for g in groups]


@pytest.fixture(scope="module", params=["heat", "poisson2d", "poisson5d"])
def bench(request):
    return pinn.BUILDERS[request.param](quick=True)


def test_group_sizes_match_the_setting(bench):
    _, sizes = _stacked(bench)
    assert sizes == bench.info["sizes"]
    assert bench.problem.num_samples == sum(sizes)


def test_cost_is_the_sum_of_group_mean_squares_and_jacobian_matches(bench):
    raw, sizes = _stacked(bench)
    m = sum(sizes)
    flat, unravel = jax.flatten_util.ravel_pytree(bench.params)

    def stacked(f):  # the weighted residual vector √(m/N_g)·r_g, stacked in group order
        return jnp.concatenate([math.sqrt(m / n) * r for r, n in zip(raw(unravel(f)), sizes)])

    @jax.jit
    def check(f):
        params = unravel(f)
        by_groups = sum(0.5 * jnp.mean(r**2) for r in raw(params))
        r = stacked(f)
        return (by_groups, jnp.sum(r**2) / (2 * m), bench.problem.cost(params),
                bench.problem.jacobian(params), jax.jacrev(stacked)(f))

    for theta in (flat, flat + 0.3):  # not only at the initial point
        by_groups, by_stacked, cost, jac, expected = check(theta)
        assert float(by_stacked) == pytest.approx(float(by_groups), rel=1e-12)
        assert float(cost) == pytest.approx(float(by_groups), rel=1e-12)
        assert jac.shape == (m, flat.shape[0])
        np.testing.assert_allclose(np.asarray(jac), np.asarray(expected), rtol=1e-10, atol=1e-10)


def test_pointwise_form_matches_the_rows_form(bench):
    """The `om.ResidualProblem` of the point groups has the rows problem's cost and Jacobian."""
    residual, rows = bench.residual, bench.problem
    assert list(residual.names) == list(pinn.GROUP_NAMES[bench.name])
    assert [s.num_points for s in residual.sets] == bench.info["sizes"]

    @jax.jit
    def both(params):
        return (residual.cost(params), rows.cost(params), residual.jacobian(params),
                rows.jacobian(params))

    c1, c2, j1, j2 = both(bench.params)
    assert float(c1) == pytest.approx(float(c2), rel=1e-12)
    np.testing.assert_allclose(np.asarray(j1), np.asarray(j2), rtol=0,
                               atol=1e-12 * float(jnp.max(jnp.abs(j2))))
    if bench.sampler is not None:  # a draw as point sets is the same draw as rows
        sets, (r, _) = bench.sampler.draw_sets(2), bench.sampler.draw(2)
        coords = np.concatenate([np.asarray(v) for v in sets.values()])
        np.testing.assert_array_equal(coords, np.asarray(r[:, :bench.pde.dim]))


def test_exact_solution_has_zero_residual(bench):
    """u* satisfies the PDE at interior points and the data at condition points; a perturbed
    u* does not (the check can fail)."""
    pde = bench.pde
    rows = bench.problem.inputs

    def residuals(u_fn):
        res = pinn.point_residual_fn(pde, lambda params, p: u_fn(p)[None])
        return jax.jit(jax.vmap(lambda row: res(None, row)[0]))(rows)

    r = residuals(pde.exact)
    assert float(jnp.max(jnp.abs(r))) < 1e-9
    wrong = residuals(lambda p: pde.exact(p) + 0.01 * jnp.sin(3.0 * jnp.sum(p)))
    assert float(jnp.max(jnp.abs(wrong))) > 1e-3
    # The PDE operator itself on u* at random interior points, outside the row machinery.
    p = jnp.asarray(np.random.default_rng(3).uniform(size=(16, pde.dim)))
    op = jax.jit(jax.vmap(lambda q: pde.operator(pde.exact, q) + pde.source(q)))(p)
    assert float(jnp.max(jnp.abs(op))) < 1e-9


def test_boundary_and_initial_points_lie_where_they_should(bench):
    pts = np.asarray(bench.problem.inputs)
    d = bench.pde.dim
    x, cond = pts[:, :d], pts[:, d] > 0
    assert np.all((x >= 0) & (x <= 1))
    on_face = np.any((x == 0.0) | (x == 1.0), axis=1)
    assert np.all(on_face[cond]) and not np.any(on_face[~cond])
    if bench.name == "heat":  # initial points at t = 0, boundary points at x ∈ {0, 1}
        c = x[cond]
        assert np.all((c[:, 0] == 0.0) | np.isin(c[:, 1], [0.0, 1.0]))
        assert np.sum(c[:, 0] == 0.0) == bench.info["sizes"][1]


def test_error_is_rms_over_held_out_points(bench):
    params = bench.params
    assert float(bench.error_fn(params)) > 1e-3
    pts = jnp.asarray(np.random.default_rng(bench.info["eval_seed"]).uniform(
        size=(bench.info["num_eval"], bench.pde.dim)))
    pred = jax.jit(jax.vmap(lambda p: bench.apply(params, p)[0]))(pts)
    rms = float(jnp.sqrt(jnp.mean((pred - bench.pde.exact(pts)) ** 2)))
    assert float(bench.error_fn(params)) == pytest.approx(rms, rel=1e-12)
    # Held-out: none of the evaluation points is a collocation point.
    coll = np.asarray(bench.problem.inputs[:, :bench.pde.dim])
    assert not np.any(np.all(np.isclose(np.asarray(pts)[:, None], coll[None]), axis=-1))


def test_sampler_draws_fresh_reproducible_points():
    bench = pinn.poisson5d(quick=True)
    sampler = bench.sampler
    it = iter(sampler)
    (a, ya), (b, yb) = next(it), next(it)
    assert a.shape == b.shape == bench.problem.inputs.shape and ya.shape == (a.shape[0], 1)
    assert not np.allclose(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, :5], bench.problem.inputs[:, :5])  # draw 0 is the problem's
    again = iter(pinn.Sampler(bench.pde, bench.info["sizes"], bench.info["data_seed"]))
    np.testing.assert_array_equal(np.asarray(next(again)[0]), np.asarray(a))
    other = iter(pinn.Sampler(bench.pde, bench.info["sizes"], bench.info["data_seed"] + 1))
    assert not np.allclose(np.asarray(next(other)[0][:, :5]), np.asarray(a[:, :5]))
    # The group structure (flags, weights) is the same in every draw; values follow u*, f.
    np.testing.assert_array_equal(np.asarray(a[:, 5:7]), np.asarray(b[:, 5:7]))


def test_quick_runner_writes_json_and_markdown(tmp_path):
    # outmetric and Adam only: each method's first compilation costs seconds (engd and lbfgs
    # are exercised by the step-rule study and the full run).
    assert pinn.main(["--quick", "--only", "heat", "--methods", "outmetric", "adam", "--out",
                      str(tmp_path)]) == 0
    data = json.loads((tmp_path / "pinn.json").read_text())
    assert data["quick"] is True and data["machine"]["cores"] >= 1
    runs = data["problems"]["heat"]["runs"]
    assert set(runs) == {"outmetric", "adam", "adam_screening"}
    for key in ("outmetric", "adam"):
        row = runs[key]
        assert row["status"] in ("target", "budget", "max_steps", "halted", "non-finite")
        steps = [p[0] for p in row["trace"]]
        times = [p[1] for p in row["trace"]]
        assert steps == sorted(steps) and times == sorted(times) and times[0] == 0.0
        assert set(row["reached"]) == {f"{t:g}" for t in pinn.THRESHOLDS}
        assert math.isfinite(row["final_error"])
    ours = runs["outmetric"]
    assert ours["final_error"] < ours["trace"][0][3]  # it made progress
    assert runs["adam"]["budget_s"] == pytest.approx(10 * ours["seconds"], rel=1e-6)
    md = (tmp_path / "pinn.md").read_text()
    assert "## heat" in md and "--quick" in md and "| outmetric |" in md


def test_engd_and_lbfgs_rules_on_a_linear_least_squares_problem():
    """For a model linear in θ the Gauss–Newton step with η = 1 solves the problem: ENGD's grid
    search must pick η = 1 and land on the least-squares solution; L-BFGS reaches its cost."""
    import outmetric as om

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(12, 3))), jnp.asarray(rng.normal(size=(12, 1)))
    problem = om.Problem(lambda w, u: u @ w, x, y)
    w0 = jnp.zeros((3, 1))
    best = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
    best_cost = float(problem.cost(jnp.asarray(best)))
    result = om.fit(problem, w0, pinn.engd(), max_steps=1, progress=False)
    assert float(result.state.step_size) == 1.0
    np.testing.assert_allclose(np.asarray(result.params), best, rtol=1e-8, atol=1e-10)
    assert float(problem.cost(result.params)) == pytest.approx(best_cost, rel=1e-10)
    result = om.fit(problem, w0, pinn.lbfgs(), max_steps=10, progress=False)
    assert result.costs[-1] == pytest.approx(best_cost, rel=1e-6)
