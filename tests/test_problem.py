"""Problem: outputs, cost, per-sample Jacobian against jacrev of the stacked function, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import MODELS, make_problem


def stacked_jacobian(problem, params):
    """Reference: jax.jacrev of the stacked batch function (the N-times-costlier path)."""
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda f: problem.outputs(unravel(f)).reshape(-1))(flat)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_jacobian_matches_stacked_jacrev(name):
    problem, params = make_problem(name, n=6, q=3)
    x, jac = problem.linearize(params)
    assert jac.shape == (6 * 3, om.num_parameters(params))
    np.testing.assert_allclose(jac, stacked_jacobian(problem, params), atol=1e-12, rtol=0)
    np.testing.assert_allclose(x, problem.outputs(params), atol=1e-14, rtol=0)


def test_jacobian_forward_mode_when_few_parameters():
    # K = 2 < Q = 5: the per-sample Jacobian goes forward; the result must not change.
    inputs = jnp.linspace(0.0, 1.0, 4)
    targets = jnp.zeros((4, 5))

    def apply(p, u):
        return jnp.sin(p["a"] * u * jnp.arange(1.0, 6.0)) + p["b"]

    params = {"a": jnp.asarray(1.3), "b": jnp.asarray(0.2)}
    problem = om.Problem(apply, inputs, targets)
    np.testing.assert_allclose(problem.jacobian(params), stacked_jacobian(problem, params),
                               atol=1e-12, rtol=0)


def test_batched_apply_fn_matches_per_sample():
    problem, params = make_problem("tanh_mlp", n=5, q=2)
    batched = om.Problem(jax.vmap(problem.apply_fn, in_axes=(None, 0)), problem.inputs,
                         problem.targets, batched=True)
    np.testing.assert_allclose(batched.outputs(params), problem.outputs(params), atol=1e-14)
    np.testing.assert_allclose(batched.jacobian(params), problem.jacobian(params), atol=1e-12)


def test_cost_and_output_gradient_closed_form():
    problem, params = make_problem("tanh_mlp", n=7, q=2)
    x = problem.outputs(params)
    y = problem.targets
    assert problem.num_samples == 7 and problem.output_dim == 2
    np.testing.assert_allclose(problem.cost(params), np.sum((x - y) ** 2) / (2 * 7), rtol=1e-14)
    np.testing.assert_allclose(problem.output_gradient(x), (x - y) / 7, rtol=1e-14)
    np.testing.assert_allclose(jax.grad(problem.cost_from_outputs)(x), (x - y) / 7, rtol=1e-14)


def test_jvp_vjp_match_dense_jacobian():
    problem, params = make_problem("residual_net", n=5, q=2)
    flat, unravel = ravel_pytree(params)
    jac = problem.jacobian(params)
    v = jax.random.normal(jax.random.PRNGKey(1), flat.shape)
    w = jax.random.normal(jax.random.PRNGKey(2), (5, 2))
    np.testing.assert_allclose(problem.jvp(params, unravel(v)).reshape(-1), jac @ v, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(problem.vjp(params, w))[0], w.reshape(-1) @ jac,
                               atol=1e-12)


def test_from_residual_rosenbrock():
    def residual(p):
        return jnp.stack([10.0 * (p[1] - p[0] ** 2), 1.0 - p[0]])

    params = jnp.array([-1.2, 1.0])
    problem = om.Problem.from_residual(residual, example_params=params)
    assert (problem.num_samples, problem.output_dim) == (2, 1)
    np.testing.assert_allclose(problem.cost(params), 0.25 * jnp.sum(residual(params) ** 2))
    np.testing.assert_allclose(problem.jacobian(params), jax.jacfwd(residual)(params), atol=1e-14)


# ---------------------------------------------------------------------------------- bad input


def _mlp():
    problem, params = make_problem("tanh_mlp", n=4, q=2)
    return problem.apply_fn, problem.inputs, problem.targets, params


def test_mismatched_sample_counts():
    apply, inputs, targets, _ = _mlp()
    with pytest.raises(ValueError, match="inputs and targets have different numbers of samples"):
        om.Problem(apply, inputs, targets[:3])


def test_integer_params_rejected():
    apply, inputs, targets, params = _mlp()
    problem = om.Problem(apply, inputs, targets)
    bad = jax.tree_util.tree_map(lambda a: a.astype(jnp.int32), params)
    with pytest.raises(TypeError, match="params leaf .* has dtype int32"):
        problem.cost(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_non_finite_data_rejected(value, where):
    apply, inputs, targets, _ = _mlp()
    data = {"inputs": np.array(inputs), "targets": np.array(targets)}
    data[where][1, 0] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or inf"):
        om.Problem(apply, data["inputs"], data["targets"])


def test_wrong_output_shape_rejected():
    _, inputs, targets, params = _mlp()
    problem = om.Problem(lambda p, u: jnp.zeros(3) + p["params"]["Dense_0"]["bias"][0], inputs,
                         targets)
    with pytest.raises(ValueError, match=r"apply_fn returned shape \(3,\) per sample; expected \(2,\)"):
        problem.outputs(params)


def test_cost_is_never_nan_for_valid_input():
    problem, params = make_problem("gelu_softplus_mlp")
    assert np.isfinite(problem.cost(params))


def test_with_data_keeps_cross_entropy_classes_and_smoothing():
    """A mini-batch that lacks the highest class still has Q classes and the same smoothing."""
    apply_fn = lambda p, u: p["w"] @ u  # noqa: E731
    params = {"w": jnp.ones((4, 2))}
    labels = jnp.array([0, 1, 3, 2])
    problem = om.Problem(apply_fn, jnp.ones((4, 2)), labels, loss="cross_entropy",
                         label_smoothing=0.2)
    batch = problem.with_data(jnp.ones((2, 2)), jnp.array([0, 1]))
    assert batch.output_dim == 4
    np.testing.assert_allclose(batch.targets, problem.targets[:2], rtol=0, atol=1e-15)
    assert batch.outputs(params).shape == (2, 4)


def test_cross_entropy_rejects_single_column_float_targets():
    with pytest.raises(ValueError, match="cross-entropy targets"):
        om.Problem(lambda p, u: p @ u, jnp.ones((3, 2)), jnp.ones(3), loss="cross_entropy")


def test_mlp_shares_one_apply_per_activation_across_depths_and_seeds():
    """`om.mlp` returns one `apply` per activation (so jitted code keyed on it compiles once for
    every seed of an architecture), and that one function reads depth and widths off `params`."""
    deep_apply, deep = om.mlp(jax.random.PRNGKey(0), [3, 5, 4, 2], "tanh")
    shallow_apply, shallow = om.mlp(jax.random.PRNGKey(1), [3, 7, 2], "tanh")
    gelu_apply, _ = om.mlp(jax.random.PRNGKey(0), [3, 5, 2], "gelu")
    assert deep_apply is shallow_apply and gelu_apply is not deep_apply
    u = jnp.array([0.3, -1.2, 0.8])

    def reference(params, u):
        h = u
        for layer in params[:-1]:
            h = np.tanh(np.asarray(layer["w"]).T @ h + np.asarray(layer["b"]))
        return np.asarray(params[-1]["w"]).T @ h + np.asarray(params[-1]["b"])

    for params in (deep, shallow):
        np.testing.assert_allclose(deep_apply(params, u), reference(params, np.asarray(u)),
                                   rtol=1e-6, atol=1e-6)
