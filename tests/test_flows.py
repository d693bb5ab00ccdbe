"""The theorems of DESIGN §2 checked along integrated flows (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import outmetric as om
from helpers import linear_model_problem, make_problem

THEOREM_MODELS = ["tanh_mlp", "gelu_softplus_mlp", "residual_net", "conv_net"]


@pytest.mark.parametrize("name", THEOREM_MODELS)
def test_uniform_exponential_rate_and_a_priori_stopping_time(name):
    problem, params = make_problem(name, n=8, d_in=5, q=2)
    num_params = om.num_parameters(params)
    assert num_params >= problem.num_samples * problem.output_dim  # overparametrised
    eps = 1e-10
    traj = om.integrate(problem, params, eps=eps)
    cost0 = traj.costs[0]
    predicted = cost0 * jnp.exp(-2.0 * traj.ts / problem.num_samples)
    assert traj.result == "successful"
    assert len(traj.ts) > 50
    np.testing.assert_array_less(jnp.abs(traj.costs - predicted), 1e-6 * predicted)
    t_eps = om.stopping_time(cost0, eps, problem.num_samples)
    assert traj.stopping_time == pytest.approx(t_eps)
    assert traj.ts[-1] == pytest.approx(t_eps, rel=1e-6)
    assert traj.costs[-1] <= eps * (1 + 1e-6)


def test_stopping_time_closed_form():
    assert om.stopping_time(1.0, np.exp(-4.0), 10) == pytest.approx(20.0)
    assert om.stopping_time(1e-12, 1e-10, 10) == 0.0
    with pytest.raises(ValueError, match="eps must be a positive"):
        om.stopping_time(1.0, 0.0, 10)


def test_underparametrised_linear_model_reaches_least_squares():
    problem, params, features = linear_model_problem(n=20, d_in=4)
    assert om.num_parameters(params) < problem.num_samples
    traj = om.integrate(problem, params, t1=40.0 * problem.num_samples)
    assert np.all(np.diff(np.asarray(traj.costs)) <= 1e-15)
    w_lstsq = np.linalg.lstsq(np.asarray(features), np.asarray(problem.targets), rcond=None)[0]
    np.testing.assert_allclose(traj.final_params["w"], w_lstsq, atol=1e-8, rtol=0)


def test_underparametrised_network_cost_decreases_to_critical_point():
    # A 2-3-1 tanh network (K = 13) on 24 points, K < QN: targets from a teacher of the same
    # shape plus noise, so the flow has a non-degenerate minimum with non-zero residual to find.
    # (From many other starts this flow runs into rank loss in finite time, where D^T D turns
    # singular and the speed diverges: the pseudo-inverse field is discontinuous there.)
    k0, k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(3), 6)
    inputs = jax.random.normal(k0, (24, 2))
    teacher = {"w1": jax.random.normal(k1, (2, 3)), "b1": 0.5 * jax.random.normal(k2, (3,)),
               "w2": jax.random.normal(k3, (3, 1)), "b2": jnp.zeros(1)}

    def apply(p, u):
        return jnp.tanh(u @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    targets = jax.vmap(apply, (None, 0))(teacher, inputs) + 0.05 * jax.random.normal(k4, (24, 1))
    start = jax.tree_util.tree_map(
        lambda a, k: a + 0.1 * jax.random.normal(k, a.shape), teacher,
        dict(zip(teacher, jax.random.split(k5, 4))),
    )
    problem = om.Problem(apply, inputs, targets)
    assert om.num_parameters(start) < problem.num_samples
    traj = om.integrate(problem, start, t1=40.0 * problem.num_samples)
    assert traj.result == "successful"
    assert np.all(np.diff(np.asarray(traj.costs)) <= 1e-14 * traj.costs[0])
    x, jac = problem.linearize(traj.final_params)
    stationarity = jnp.linalg.norm(jac.T @ (x - problem.targets).reshape(-1))
    assert stationarity <= 1e-8
    assert traj.costs[-1] > 1e-4  # a genuine residual: the fit is a projection, not a solution


def rank_deficient_problem():
    """Duplicated hidden units and a repeated input with two different targets: rank D < QN."""
    key = jax.random.PRNGKey(7)
    k1, k2, k3 = jax.random.split(key, 3)
    inputs = jax.random.normal(k1, (6, 2))
    inputs = inputs.at[1].set(inputs[0])  # repeated input ...
    targets = jax.random.normal(k2, (6, 1))
    targets = targets.at[1].set(targets[0] + 1.5)  # ... with a different target
    w1 = jax.random.normal(k3, (2, 5))
    w1 = jnp.concatenate([w1, w1[:, :2]], axis=1)  # two duplicated hidden units
    params = {"w1": w1, "b1": jnp.zeros(7), "w2": jnp.full((7, 1), 0.3), "b2": jnp.zeros(1)}

    def apply(p, u):
        return jnp.tanh(u @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return om.Problem(apply, inputs, targets), params


def test_rank_loss_pseudo_inverse_flow_stays_finite_and_stops_above_zero():
    problem, params = rank_deficient_problem()
    num_rows = problem.num_samples * problem.output_dim
    _, result, _ = om.output_metric_gradient(problem, params)
    assert int(result.rank) < num_rows and bool(result.fallback)
    traj = om.integrate(problem, params, t1=30.0 * problem.num_samples)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(traj.params))
    # The repeated pair can only meet at the mean of its targets: C* = (y0 - y1)^2 / (4N).
    gap = problem.targets[0, 0] - problem.targets[1, 0]
    floor = gap**2 / (4 * problem.num_samples)
    assert traj.costs[-1] > 0
    np.testing.assert_allclose(traj.costs[-1], floor, rtol=1e-6)


def test_standard_flow_is_minus_parameter_gradient():
    problem, params = make_problem("tanh_mlp")
    velocity = om.standard_flow(problem)(0.0, params, None)
    grad = jax.grad(problem.cost)(params)
    for v, g in zip(jax.tree_util.tree_leaves(velocity), jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(v, -g, atol=1e-15)


def test_adapted_flow_moves_outputs_by_minus_output_gradient():
    problem, params = make_problem("tanh_mlp")
    velocity = om.adapted_flow(problem)(0.0, params, None)
    x_dot = problem.jvp(params, velocity)
    np.testing.assert_allclose(x_dot, -problem.output_gradient(problem.outputs(params)),
                               atol=1e-12)


def test_integrate_rejects_bad_arguments():
    problem, params = make_problem("tanh_mlp")
    with pytest.raises(ValueError, match="needs eps"):
        om.integrate(problem, params)
    with pytest.raises(ValueError, match="eps must be a positive"):
        om.integrate(problem, params, eps=-1.0)
    with pytest.raises(ValueError, match="t1 must be a positive"):
        om.integrate(problem, params, t1=float("nan"))
    with pytest.raises(ValueError, match="solver='lu' is not a known solver"):
        om.adapted_flow(problem, solver="lu")
