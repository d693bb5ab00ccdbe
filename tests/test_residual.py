"""Residual problems: `ResidualProblem` (named point sets, per-point Jacobian rows) against the
stacked form of `Problem.from_residual`, redrawn points without recompiling, weighted costs,
and bad input."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from outmetric._checkpoint import model_fingerprint

TRACES = {"interior": 0, "boundary": 0}


def net(params, p):
    h = jnp.tanh(p @ params[0]["w"] + params[0]["b"])
    return (h @ params[1]["w"] + params[1]["b"])[0]


def interior(params, p):
    """−Δu − f for −Δu = f, u* = sin πx sin πy."""
    TRACES["interior"] += 1
    u = lambda q: net(params, q)  # noqa: E731
    f = 2 * jnp.pi**2 * jnp.sin(jnp.pi * p[0]) * jnp.sin(jnp.pi * p[1])
    return -jnp.trace(jax.hessian(u)(p)) - f


def boundary(params, p):
    TRACES["boundary"] += 1
    return net(params, p)


def gradient_match(params, p):
    """A vector residual (q = 2): ∇u − ∇u*."""
    exact = jnp.pi * jnp.array([jnp.cos(jnp.pi * p[0]) * jnp.sin(jnp.pi * p[1]),
                                jnp.sin(jnp.pi * p[0]) * jnp.cos(jnp.pi * p[1])])
    return jax.grad(lambda q: net(params, q))(p) - exact


def init(width=6, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [{"w": jax.random.normal(k1, (2, width)) / math.sqrt(2),
             "b": 0.1 * jax.random.normal(k3, (width,))},
            {"w": jax.random.normal(k2, (width, 1)) / math.sqrt(width), "b": jnp.zeros(1)}]


def draw(seed, n_in=12, n_bd=8):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    xb = jax.random.uniform(k2, (n_bd, 2))
    side = jax.random.randint(k3, (n_bd,), 0, 2).astype(float)
    xb = xb.at[:, 0].set(jnp.where(jnp.arange(n_bd) % 2 == 0, side, xb[:, 0]))
    xb = xb.at[:, 1].set(jnp.where(jnp.arange(n_bd) % 2 == 1, side, xb[:, 1]))
    return {"interior": jax.random.uniform(k1, (n_in, 2)), "boundary": xb}


WEIGHTS = {"interior": 1.0, "boundary": 3.0, "gradient": 0.5}


def pointwise(points=None, gradient=True):
    points = draw(0) if points is None else points
    sets = {"interior": om.PointSet(interior, points["interior"], WEIGHTS["interior"]),
            "boundary": om.PointSet(boundary, points["boundary"], WEIGHTS["boundary"])}
    if gradient:
        sets["gradient"] = om.PointSet(gradient_match, points["interior"][:5],
                                       WEIGHTS["gradient"], num_outputs=2)
    return om.ResidualProblem(sets)


def stacked(problem: om.ResidualProblem):
    """The same loss as one stacked residual vector: √(w_s M/N_s) r_s, set by set."""
    m = problem.num_samples
    fns = {"interior": interior, "boundary": boundary, "gradient": gradient_match}

    def residual(params):
        blocks = []
        for name, pts in problem.points.items():
            n = pts.shape[0]
            r = jax.vmap(lambda p, name=name: fns[name](params, p))(pts)
            blocks.append(jnp.sqrt(WEIGHTS[name] * m / n) * r.reshape(-1))
        return jnp.concatenate(blocks)

    return om.Problem.from_residual(residual)


def hand_cost(problem, params):
    fns = {"interior": interior, "boundary": boundary, "gradient": gradient_match}
    total = 0.0
    for name, pts in problem.points.items():
        r = np.asarray(jax.vmap(lambda p, name=name: fns[name](params, p))(pts))
        total += WEIGHTS[name] / (2 * pts.shape[0]) * np.sum(r**2)
    return total


# --------------------------------------------------------------------------- the two forms agree


def test_pointwise_and_stacked_agree():
    problem, params = pointwise(), init()
    other = stacked(problem)
    assert problem.num_samples == 12 + 8 + 2 * 5 and problem.output_dim == 1
    # Compiled: the eager stacked Jacobian of Hessians dispatches thousands of tiny ops.
    linearize = eqx.filter_jit(lambda prob, p, **kw: prob.linearize(p, **kw))
    x1, jac1 = linearize(problem, params)
    x2, jac2 = linearize(other, params)
    assert other.num_samples == problem.num_samples  # sized by the first evaluation
    scale = float(jnp.max(jnp.abs(jac2)))
    np.testing.assert_allclose(x1, x2, atol=1e-12 * float(jnp.max(jnp.abs(x2))), rtol=0)
    np.testing.assert_allclose(jac1, jac2, atol=1e-12 * scale, rtol=0)
    np.testing.assert_allclose(problem.cost(params), other.cost(params), rtol=1e-12)
    # The Gram matrix and the chunked Jacobian.
    gram = eqx.filter_jit(om.gram_matrix)
    g1, g2 = gram(problem, params), gram(other, params)
    np.testing.assert_allclose(g1, g2, atol=1e-12 * float(jnp.max(jnp.abs(g2))), rtol=0)
    np.testing.assert_allclose(linearize(problem, params, chunk_size=5)[1], jac1,
                               atol=1e-12 * scale, rtol=0)
    # JVP and VJP against D.
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(3), flat.shape)
    np.testing.assert_allclose(problem.jvp(params, unravel(v)).reshape(-1), jac1 @ v,
                               atol=1e-12 * scale * float(jnp.sum(jnp.abs(v))))


@pytest.mark.parametrize("solver", ["auto", "cholesky", "cg"])
def test_pointwise_and_stacked_take_the_same_step(solver):
    problem, params = pointwise(), init()
    other = stacked(problem)
    other.cost(params)  # size it before the update reads N
    opt = om.output_metric_descent(solver=solver)
    update = eqx.filter_jit(lambda prob, p: opt.update(None, opt.init(p), p, problem=prob))
    steps = []
    for p in (problem, other):
        updates, state = update(p, params)
        steps.append(ravel_pytree(updates)[0])
    # Dense solves agree to round-off; CG stops at its inexact-Newton forcing tolerance, so
    # the two (round-off-different) operators give steps equal to that tolerance only.
    tol = 1e-8 if solver == "cg" else 1e-12
    np.testing.assert_allclose(steps[0], steps[1], atol=tol * float(jnp.max(jnp.abs(steps[1]))),
                               rtol=0)


def test_weighted_cost_and_term_costs():
    problem, params = pointwise(), init()
    expected = hand_cost(problem, params)
    np.testing.assert_allclose(problem.cost(params), expected, rtol=1e-12)
    terms = problem.term_costs(params)
    assert list(terms) == ["interior", "boundary", "gradient"]
    np.testing.assert_allclose(sum(terms.values()), expected, rtol=1e-12)
    # Equal weights and one set: the published ENGD loss (1/2N) Σ r².
    single = om.ResidualProblem(om.PointSet(interior, problem.points["interior"]))
    r = jax.vmap(lambda p: interior(params, p))(problem.points["interior"])
    np.testing.assert_allclose(single.cost(params), jnp.mean(r**2) / 2, rtol=1e-12)
    # A weight is data: changing it changes the cost, not the structure.
    heavier = eqx.tree_at(lambda q: q.sets[1].weight, problem, jnp.asarray(6.0))
    np.testing.assert_allclose(heavier.cost(params) - problem.cost(params), terms["boundary"],
                               rtol=1e-12)


# --------------------------------------------------------------------------- redrawn points


def test_redrawn_points_do_not_recompile():
    problem, params = pointwise(gradient=False), init()
    opt = om.output_metric_descent()

    @eqx.filter_jit
    def step(problem, params, state):
        updates, state = opt.update(None, state, params, problem=problem)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    params, state = step(problem, params, state)
    traced = dict(TRACES)
    for seed in (1, 2, 3):
        new = problem.with_points(draw(seed))
        assert not np.allclose(new.points["interior"], problem.points["interior"])
        params, state = step(new, params, state)
    assert TRACES == traced  # the residuals were not traced again


def test_fit_with_a_sampler_and_with_point_dicts():
    problem, params = pointwise(gradient=False), init()
    calls, traces_at = [], []

    def sampler(key):
        calls.append(key)
        traces_at.append(dict(TRACES))
        k1, k2 = jax.random.split(key)
        return {"interior": jax.random.uniform(k1, (12, 2)),
                "boundary": draw(int(jax.random.randint(k2, (), 0, 1000)))["boundary"]}

    result = om.fit(problem, params, batches=sampler, max_steps=4, progress=False)
    assert result.num_steps == 4 and len(calls) == 4
    assert traces_at[1] == traces_at[-1]  # nothing traced after the first step
    assert len(set(float(c) for c in result.costs)) == 4  # each step on its own points
    # The keys are those of the steps: a second run draws the same points.
    again = om.fit(problem, params, batches=sampler, max_steps=4, progress=False)
    np.testing.assert_array_equal(result.costs, again.costs)
    # An iterable of point dicts (a set left out keeps its points).
    batches = [{"interior": draw(s)["interior"]} for s in range(3)]
    result = om.fit(problem, params, batches=batches, progress=False)
    assert result.num_steps == 3
    with pytest.raises(TypeError, match=r"\{name: points\} dicts"):
        om.fit(problem, params, batches=[(1, 2)], progress=False)
    with pytest.raises(ValueError, match="unknown point set"):
        om.fit(problem, params, batches=[{"walls": draw(0)["boundary"]}], progress=False)


def test_fit_full_batch_converges_and_fingerprints():
    # A linear least-squares fit written per point: one Gauss-Newton step solves it.
    x = jnp.linspace(0.0, 1.0, 20)
    problem = om.ResidualProblem({
        "data": (lambda b, p: b[0] + b[1] * p[0] - p[1], jnp.stack([x, 1 + 2 * x], axis=1)),
        "prior": (lambda b, p: b[1] - 2.0, jnp.zeros((1, 1)), 0.1),
    })
    result = om.fit(problem, jnp.zeros(2), eps=1e-20, max_steps=20, progress=False)
    np.testing.assert_allclose(result.params, [1.0, 2.0], atol=1e-9)
    assert model_fingerprint(problem, jnp.zeros(2))


# --------------------------------------------------------------------------- the kinds


def test_kinds_share_the_interface():
    problem, params = pointwise(), init()
    lazy = stacked(problem)
    for p in (problem, lazy):
        assert isinstance(p, om.AbstractProblem) and isinstance(p, om.Problem)
        assert not p.per_sample
    assert om.Problem(lambda t, u: t * u, jnp.ones((3, 1)), jnp.ones((3, 1))).per_sample
    with pytest.raises(ValueError, match="not been evaluated yet"):
        lazy.num_samples  # noqa: B018
    # A sized from_residual and a lazily sized one agree; fit sizes the lazy one itself.
    result = om.fit(lazy, params, max_steps=2, progress=False)
    assert result.num_steps == 2 and lazy.num_samples == problem.num_samples
    with pytest.raises(ValueError, match="sample axis"):
        om.shard_samples(problem, jax.make_mesh((1,), ("data",)))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, error, match", [
    (lambda: om.PointSet("f", jnp.ones((3, 2))), TypeError, "residual_fn must be callable"),
    (lambda: om.PointSet(boundary, jnp.ones((3, 2)), weight=-1.0), ValueError,
     "weight must be a finite number >= 0"),
    (lambda: om.PointSet(boundary, jnp.ones((3, 2)), weight=float("nan")), ValueError, "weight"),
    (lambda: om.PointSet(boundary, jnp.ones((0, 2))), ValueError, "points is empty"),
    (lambda: om.PointSet(boundary, (jnp.ones((3, 1)), jnp.ones((4, 1)))), ValueError,
     r"points leaves have different numbers of points \(leading axes \[3, 4\]\)"),
    (lambda: om.PointSet(boundary, jnp.ones((3, 2)), num_outputs=0), ValueError, "num_outputs"),
    (lambda: om.ResidualProblem({}), ValueError, "sets is empty"),
    (lambda: om.ResidualProblem({"wall": (boundary, jnp.ones((3, 2)), -2.0)}), ValueError,
     "point set 'wall': weight"),
    (lambda: om.ResidualProblem({"wall": 3}), TypeError, "point set 'wall' must be a PointSet"),
    (lambda: pointwise(gradient=False).with_points({"interior": jnp.ones((12, 3))}), ValueError,
     r"point set 'interior': points of shape \(12, 3\) do not match"),
])
def test_bad_input_names_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_residual_of_the_wrong_shape_is_named():
    params = init()
    problem = om.ResidualProblem({"gradient": (gradient_match, jnp.ones((3, 2)))})
    with pytest.raises(ValueError, match="pass num_outputs=2"):
        problem.cost(params)
    batch_fn = om.ResidualProblem({"b": (lambda th, p: jnp.zeros((4, 1)), jnp.ones((3, 2)))})
    with pytest.raises(ValueError, match="one point"):
        batch_fn.cost(params)
