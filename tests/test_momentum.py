"""SPRING's momentum in `output_metric_descent` (``momentum=μ`` with a fixed damping λ):
φ_k = μφ_{k−1} + δ_k, δ_k = (DᵀĤD + λI)⁻¹DᵀĤ^{1/2}(r̂_k − μD̂φ_{k−1}), θ ← θ − ηφ_k, checked
against the recursion written out in numpy, on fixed and on redrawn data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import MODELS


def linear_problem(num_samples, num_params, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(num_samples, num_params))
    targets = rng.normal(size=(num_samples, 1))
    params = {"w": jnp.asarray(rng.normal(size=num_params))}
    return (lambda p, u: jnp.atleast_1d(p["w"] @ u)), jnp.asarray(inputs), jnp.asarray(
        targets), params


def spring_reference(jacobian, residual, previous, lam, mu):
    """φ = μφ_prev + (JᵀJ + λI)⁻¹Jᵀ(r − μJφ_prev), dense numpy."""
    k = jacobian.shape[1]
    delta = np.linalg.solve(jacobian.T @ jacobian + lam * np.eye(k),
                            jacobian.T @ (residual - mu * jacobian @ previous))
    return mu * previous + delta


@pytest.mark.parametrize("solver", ["cholesky", "svd"])
def test_spring_matches_the_dense_recursion_on_redrawn_batches(solver):
    """Least squares on a linear model, a new batch each update (wide: 6 rows, K = 15)."""
    apply, inputs, targets, params = linear_problem(24, 15)
    problem = om.Problem(apply, inputs, targets)
    lam, mu, eta = 0.05, 0.8, 0.7
    opt = om.output_metric_descent(damping=lam, momentum=mu, learning_rate=eta,
                                   linesearch=None, solver=solver)
    state = opt.init(params)
    theta, phi = np.asarray(params["w"]), np.zeros(15)
    a, y = np.asarray(inputs), np.asarray(targets)[:, 0]
    for k in range(6):
        rows = slice(6 * (k % 4), 6 * (k % 4) + 6)
        batch = problem.with_data(inputs[rows], targets[rows])
        updates, state = opt.update(None, state, params, problem=batch, fresh_data=True)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
        phi = spring_reference(a[rows], a[rows] @ theta - y[rows], phi, lam, mu)
        theta = theta - eta * phi
        np.testing.assert_allclose(params["w"], theta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.momentum, phi, rtol=1e-10, atol=1e-12)


def test_spring_weighs_cross_entropy_by_the_loss_hessian():
    """For cross-entropy the recursion runs on D̂ = Ĥ^{1/2}D and r̂ = Ĥ^{+1/2}r (the default
    loss-Hessian weighting), on a small wide classifier."""
    model = MODELS["tanh_mlp"](jax.random.PRNGKey(1), 4, 3, width=6)
    inputs = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
    problem = om.Problem(model.apply, inputs, jnp.arange(5) % 3, loss="cross_entropy")
    params = model.params
    lam, mu = 1e-2, 0.9
    opt = om.output_metric_descent(damping=lam, momentum=mu, linesearch=None, solver="svd")
    state = opt.init(params)
    flat, unravel = ravel_pytree(params)
    phi = np.zeros(flat.shape[0])
    for _ in range(3):
        jac = np.asarray(jax.jacfwd(lambda f: problem.outputs(unravel(f)).reshape(-1))(flat))
        p = np.asarray(jax.nn.softmax(problem.outputs(unravel(flat)), axis=-1))
        y = np.asarray(problem.targets)
        # Ĥ_j = diag p − ppᵀ (one unit of label mass per sample); r̂ = Ĥ^{+1/2}(p − y).
        roots, weighted_residual = [], []
        for pj, yj in zip(p, y):
            values, vectors = np.linalg.eigh(np.diag(pj) - np.outer(pj, pj))
            values = np.clip(values, 0.0, None)
            roots.append(vectors @ np.diag(np.sqrt(values)) @ vectors.T)
            inverse = np.where(values > 1e-12 * values.max(), 1 / np.sqrt(
                np.where(values > 0, values, 1.0)), 0.0)
            weighted_residual.append(vectors @ np.diag(inverse) @ vectors.T @ (pj - yj))
        q = p.shape[1]
        root = np.zeros((jac.shape[0],) * 2)
        for j, block in enumerate(roots):
            root[j * q:(j + 1) * q, j * q:(j + 1) * q] = block
        phi = spring_reference(root @ jac, np.concatenate(weighted_residual), phi, lam, mu)
        updates, state = opt.update(None, state, params, problem=problem)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
        flat = flat - phi
        np.testing.assert_allclose(ravel_pytree(params)[0], flat, rtol=1e-7, atol=1e-9)


def test_momentum_keeps_the_direction_backtracking_took():
    """With backtracking the state keeps αφ, the direction of the step taken (the step is
    −ηαφ); μ = 0 keeps no state and is the plain fixed-λ step."""
    apply, inputs, targets, params = linear_problem(6, 10, seed=3)
    problem = om.Problem(apply, inputs, targets)
    opt = om.output_metric_descent(damping=1e-3, momentum=0.5, learning_rate=0.5)
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(None, state, params, problem=problem)
        np.testing.assert_allclose(-updates["w"] / 0.5, state.momentum, rtol=1e-12)
        params = jax.tree_util.tree_map(jnp.add, params, updates)
    plain = om.output_metric_descent(damping=1e-3)
    plain_state = plain.init(params)
    assert plain_state.momentum.shape == (0,)
    with_zero = om.output_metric_descent(damping=1e-3, momentum=0.0)
    a, _ = plain.update(None, plain_state, params, problem=problem)
    b, _ = with_zero.update(None, with_zero.init(params), params, problem=problem)
    np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, True, "0.9", None])
def test_momentum_out_of_range_is_named(momentum):
    with pytest.raises(ValueError, match="momentum"):
        om.output_metric_descent(damping=1e-3, momentum=momentum)


def test_momentum_needs_a_fixed_damping():
    with pytest.raises(ValueError, match="momentum.*fixed damping"):
        om.output_metric_descent(momentum=0.9)
