"""output_metric_descent / scale_by_output_metric: optax citizenship, DESIGN §3 exactness, solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import MODELS, make_problem


def overparametrised_linear_problem(n=6, k=15, q=1, seed=0):
    """x_j = Φ(u_j)·w with K = k*q > N*Q features: D = Φ ⊗ I has full row rank."""
    ku, ky, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
    inputs = jax.random.normal(ku, (n, 3))
    proj = jax.random.normal(kw, (3, k))

    def apply(params, u):
        return jnp.sin(u @ proj) @ params["w"]

    params = {"w": 0.1 * jnp.ones((k, q))}
    return om.Problem(apply, inputs, jax.random.normal(ky, (n, q))), params


def assert_relative(actual, desired, tol):
    """‖actual − desired‖ ≤ tol·‖desired‖ (relative error of the whole vector)."""
    error = np.linalg.norm(np.asarray(actual) - np.asarray(desired))
    assert error <= tol * np.linalg.norm(np.asarray(desired)), error / np.linalg.norm(desired)


def run(opt, problem, params, steps):
    state = opt.init(params)
    update = jax.jit(opt.update)
    costs = [problem.cost(params)]
    for _ in range(steps):
        updates, state = update(None, state, params, problem=problem)
        params = optax.apply_updates(params, updates)
        costs.append(problem.cost(params))
    return params, state, jnp.stack(costs)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.2])
def test_linear_model_residual_shrinks_by_one_minus_eta(eta):
    problem, params = overparametrised_linear_problem()
    opt = om.output_metric_descent(eta, damping=0.0, linesearch=None)
    state = opt.init(params)
    residual = problem.outputs(params) - problem.targets
    for _ in range(4):
        updates, state = opt.update(None, state, params, problem=problem)
        params = optax.apply_updates(params, updates)
        new_residual = problem.outputs(params) - problem.targets
        np.testing.assert_allclose(new_residual, (1 - eta) * residual, atol=1e-10, rtol=0)
        residual = new_residual


def test_chain_with_learning_rate_is_the_euler_step():
    problem, params = overparametrised_linear_problem()
    opt = optax.chain(om.scale_by_output_metric(), optax.scale_by_learning_rate(0.3))
    state = opt.init(params)
    updates, _ = opt.update(jax.grad(problem.cost)(params), state, params, problem=problem)
    flat_u = ravel_pytree(updates)[0]
    jac = problem.jacobian(params)
    residual = (problem.outputs(params) - problem.targets).reshape(-1)
    np.testing.assert_allclose(flat_u, -0.3 * np.linalg.pinv(jac) @ residual, atol=1e-12)


def test_tanh_mlp_reaches_1e_minus_20_within_15_steps():
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=32)
    assert om.num_parameters(params) >= 10 * problem.num_samples * problem.output_dim
    opt = om.output_metric_descent(1.0, damping=0.0, linesearch="backtracking")
    _, _, costs = run(opt, problem, params, 15)
    assert costs[-1] <= 1e-20
    assert np.all(np.diff(np.asarray(costs)) <= 0)


def test_default_adaptive_damping_converges_on_overparametrised_mlp():
    problem, params = make_problem("residual_net", n=8, q=2)
    result = om.fit(problem, params, eps=1e-20, max_steps=40, progress=False)
    assert result.converged and result.num_steps <= 25
    assert np.all(np.diff(result.costs) <= 0)
    assert float(result.state.damping) > 0 and int(result.state.rank) == 16


def ill_conditioned_problem(num_points=200, width=60):
    """Equispaced points of an oscillating function: the Gram matrix is numerically singular."""
    inputs = jnp.linspace(-1.0, 1.0, num_points)[:, None]
    targets = jnp.sin(8.0 * inputs) * jnp.exp(-inputs)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": 3.0 * jax.random.normal(k1, (1, width)),
              "b1": jax.random.normal(k2, (width,)),
              "w2": jax.random.normal(k3, (width, 1)) / jnp.sqrt(width), "b2": jnp.zeros(1)}

    def apply(p, u):
        return jnp.tanh(u @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return om.Problem(apply, inputs, targets), params


@pytest.mark.parametrize("scaling", ["auto", "identity"])
def test_damped_rules_make_fast_progress_where_undamped_backtracking_stalls(scaling):
    """K = 181 < QN = 200: the default is MINPACK's trust region with scaled damping; on this
    tanh fit the isotropic damping of the theory (scaling="identity") goes further in 30 steps
    (README: where each damping wins), and both leave undamped backtracking far behind."""
    problem, params = ill_conditioned_problem()
    gram = problem.jacobian(params) @ problem.jacobian(params).T
    eig = jnp.linalg.eigvalsh(gram)
    assert eig[0] <= 1e-13 * eig[-1]  # numerically singular
    _, state, damped = run(om.output_metric_descent(scaling=scaling), problem, params, 30)
    _, _, undamped = run(om.output_metric_descent(damping=0.0), problem, params, 30)
    assert np.all(np.diff(np.asarray(damped)) <= 0)  # the cost never increases
    assert np.all(np.diff(np.asarray(undamped)) <= 0)
    assert damped[-1] <= (1e-4 if scaling == "identity" else 1e-3) * damped[0]
    assert damped[-1] <= (1e-3 if scaling == "identity" else 2e-3) * undamped[-1]
    assert bool(jnp.isfinite(state.damping)) and float(state.damping) > 0


@pytest.mark.parametrize("name", ["tanh_mlp", "conv_net"])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_damped_step_is_the_same_on_both_sides(name, damping):
    problem, params = make_problem(name, n=6, q=2)
    jac = problem.jacobian(params)
    rhs = (problem.outputs(params) - problem.targets).reshape(-1)
    over = jac.T @ jnp.linalg.solve(jac @ jac.T + damping * jnp.eye(jac.shape[0]), rhs)
    under = jnp.linalg.solve(jac.T @ jac + damping * jnp.eye(jac.shape[1]), jac.T @ rhs)
    assert_relative(over, under, 1e-10)
    for solver in ["cholesky", "qr", "svd", "cg"]:
        opt = om.scale_by_output_metric(damping=damping, solver=solver)
        step = ravel_pytree(opt.update(None, opt.init(params), params, problem=problem)[0])[0]
        assert_relative(step, over, 1e-8 if solver == "cg" else 1e-10)


def test_tall_side_solvers_agree():
    # K < QN: the solve works on the K x K side.
    problem, params = make_problem("tanh_mlp", n=60, q=2, width=4, depth=1)
    num_params = om.num_parameters(params)
    assert num_params < 120
    jac = problem.jacobian(params)
    rhs = (problem.outputs(params) - problem.targets).reshape(-1)
    reference = np.linalg.lstsq(np.asarray(jac), np.asarray(rhs), rcond=None)[0]
    for solver in ["cholesky", "qr", "svd", "cg"]:
        opt = om.scale_by_output_metric(solver=solver, damping=0.0, cg_tol=1e-13)
        step = ravel_pytree(opt.update(None, opt.init(params), params, problem=problem)[0])[0]
        assert_relative(step, reference, 1e-8)
    # Damped: Dᵀ(DDᵀ + λI)⁻¹r (the wide formula, dense reference) from the K × K solve.
    for damping in [1e-3, 1.0]:
        wide = jac.T @ jnp.linalg.solve(jac @ jac.T + damping * jnp.eye(jac.shape[0]), rhs)
        for solver in ["cholesky", "qr", "svd"]:
            opt = om.scale_by_output_metric(solver=solver, damping=damping)
            step = ravel_pytree(opt.update(None, opt.init(params), params, problem=problem)[0])[0]
            assert_relative(step, wide, 1e-10)


def test_composes_with_inject_hyperparams_schedule_and_apply_if_finite():
    problem, params = make_problem("tanh_mlp")
    injected = optax.inject_hyperparams(om.output_metric_descent)(learning_rate=0.5)
    _, state, costs = run(injected, problem, params, 3)
    assert float(state.hyperparams["learning_rate"]) == 0.5
    assert costs[-1] < costs[0]

    # A learning rate changed in the injected state mid-run takes effect, without recompiling:
    # on a model linear in θ the residual shrinks by exactly 1 − η each step.
    linear, linear_params = overparametrised_linear_problem()
    injected = optax.inject_hyperparams(om.output_metric_descent)(
        learning_rate=0.5, damping=0.0, linesearch=None)
    update = jax.jit(injected.update)
    state = injected.init(linear_params)
    residual = linear.outputs(linear_params) - linear.targets
    for eta in [0.5, 0.25, 0.75]:
        state.hyperparams["learning_rate"] = jnp.asarray(eta)
        updates, state = update(None, state, linear_params, problem=linear)
        linear_params = optax.apply_updates(linear_params, updates)
        new_residual = linear.outputs(linear_params) - linear.targets
        np.testing.assert_allclose(new_residual, (1 - eta) * residual, atol=1e-10, rtol=0)
        residual = new_residual
    assert update._cache_size() == 1

    # In a jitted optax.chain behind gradient clipping: the clip sees the gradient, the step
    # is output-metric descent's own (it does not read the clipped gradient).
    chained = optax.chain(optax.clip_by_global_norm(1e-3), om.output_metric_descent())
    plain = om.output_metric_descent()
    grads = jax.grad(problem.cost)(params)
    chained_updates, _ = jax.jit(chained.update)(grads, chained.init(params), params,
                                                 problem=problem)
    plain_updates, _ = plain.update(grads, plain.init(params), params, problem=problem)
    assert_relative(ravel_pytree(chained_updates)[0], ravel_pytree(plain_updates)[0], 1e-12)

    linear, linear_params = overparametrised_linear_problem()
    schedule = optax.linear_schedule(0.5, 0.9, 1)  # η_0 = 0.5, then 0.9
    _, _, scheduled = run(om.output_metric_descent(schedule, damping=0.0, linesearch=None),
                          linear, linear_params, 2)
    np.testing.assert_allclose(scheduled[1:] / scheduled[:-1], [0.5**2, 0.1**2], rtol=1e-6)  # optax schedules are float32

    guarded = optax.apply_if_finite(om.output_metric_descent(), max_consecutive_errors=3)
    state = guarded.init(params)
    nan_grads = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), params)
    updates, state = guarded.update(nan_grads, state, params, problem=problem)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
    assert int(state.notfinite_count) == 1
    # With finite gradients the guarded optimizer takes exactly the unguarded step.
    grads = jax.grad(problem.cost)(params)
    updates, state = guarded.update(grads, state, params, problem=problem)
    plain = om.output_metric_descent()
    expected, _ = plain.update(grads, plain.init(params), params, problem=problem)
    assert int(state.notfinite_count) == 0
    assert_relative(ravel_pytree(updates)[0], ravel_pytree(expected)[0], 1e-12)


def test_jitted_update_does_not_recompile():
    problem, params = make_problem("tanh_mlp")
    other, _ = make_problem("tanh_mlp", seed=5)
    other_batch = problem.with_data(other.inputs, other.targets)  # same model and shapes
    opt = om.output_metric_descent()
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, state = update(None, state, params, problem=problem)
    params = optax.apply_updates(params, updates)
    update(None, state, params, problem=other_batch)
    assert update._cache_size() == 1


def test_state_is_a_namedtuple_of_arrays():
    problem, params = make_problem("tanh_mlp")
    opt = om.output_metric_descent()
    _, state, _ = run(opt, problem, params, 2)
    assert isinstance(state, om.OutputMetricDescentState)
    assert all(isinstance(leaf, jax.Array) for leaf in state)
    assert int(state.count) == 2 and int(state.rank) == 16


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="learning_rate must lie in"):
        om.output_metric_descent(1.5)
    with pytest.raises(ValueError, match="solver='lu'"):
        om.output_metric_descent(solver="lu")
    with pytest.raises(ValueError, match="damping must be"):
        om.output_metric_descent(damping=-1.0)
    problem, params = make_problem("tanh_mlp")
    opt = om.output_metric_descent()
    with pytest.raises(ValueError, match="problem=problem"):
        opt.update(None, opt.init(params), params)


# ------------------------------------------------------------------------------------ fit


def test_fit_stops_at_eps_and_records_history():
    problem, params = make_problem("gelu_softplus_mlp")
    result = om.fit(problem, params, eps=1e-12, max_steps=100, progress=False)
    assert result.converged
    assert result.costs[-1] <= 1e-12 and np.all(result.costs[:-1] > 1e-12)
    assert len(result.costs) == result.num_steps + 1
    np.testing.assert_allclose(result.costs[-1], problem.cost(result.params), rtol=1e-6)


def test_fit_with_a_plain_optax_optimizer_and_callback():
    problem, params = make_problem("tanh_mlp")
    seen = []

    def callback(step, params, state, cost):
        seen.append(step)
        return step >= 20

    result = om.fit(problem, params, optax.adam(1e-2), max_steps=100, chunk_size=10,
                    callback=callback, progress=False)
    assert seen == [10, 20] and result.num_steps == 20
    assert result.costs[-1] < result.costs[0]


def test_fit_history_across_blocks_matches_single_steps():
    # A chunk keeps its per-step costs in blocks of HISTORY_BLOCK (64) entries; a 150-step
    # chunk must give the history that 150 one-step chunks give, entry for entry.
    from outmetric._fit import HISTORY_BLOCK

    problem, params = make_problem("tanh_mlp")
    long = om.fit(problem, params, optax.sgd(1e-3), max_steps=150, chunk_size=150,
                  progress=False)
    short = om.fit(problem, params, optax.sgd(1e-3), max_steps=150, chunk_size=1,
                   progress=False)
    assert long.num_steps == short.num_steps == 150 > 2 * HISTORY_BLOCK
    np.testing.assert_allclose(long.costs, short.costs, rtol=1e-10)
    assert np.all(np.diff(long.costs) < 0)  # a small enough step descends every time


def test_fit_mini_batches():
    # The stochastic adapted method: one solve per batch of 8 (QB = 8 <= K); with η = 1 each
    # step interpolates its batch, and the full cost falls as the batches cycle.
    problem, params = make_problem("tanh_mlp", n=32, q=1, width=32)
    inputs = problem.inputs
    targets = jnp.sin(inputs[:, :1]) + 0.5 * inputs[:, 1:2] ** 2
    problem = problem.with_data(inputs, targets)

    def batches():
        for epoch in range(5):
            for start in range(0, 32, 8):
                yield inputs[start:start + 8], targets[start:start + 8]

    result = om.fit(problem, params, batches=batches(), max_steps=20, progress=False)
    assert result.num_steps == 20
    assert problem.cost(result.params) < 0.1 * problem.cost(params)
