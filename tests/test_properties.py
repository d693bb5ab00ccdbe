"""Property tests (hypothesis) over random MLPs: widths, depths, N, Q and seeds.

1. The adapted velocity moves the outputs by the projected gradient: D·θ' = −P∇ₓC (float64).
2. The damped step is the same vector on both sides: Dᵀ(DDᵀ + λI)⁻¹r = (DᵀD + λI)⁻¹Dᵀr, and
   every dense solver returns it.
3. A finite input never yields a non-finite update, whatever the conditioning (saturated or
   zero weights, repeated inputs), in float32 and float64, and no solve along the way met NaN
   or inf (`state.finite`: the solve zeroes a non-finite δ, so finite updates alone would not
   show a solver that produced NaN; `test_the_properties_catch_a_solver_that_produces_nan`).

Each property evaluates everything it needs in one jitted function (compiled once per shape);
3 draws from two fixed architectures, so its examples reuse the compilations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import outmetric as om
from outmetric._solve import _svd as _SVD

SETTINGS = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlp_problems(draw, max_n=6, max_q=3):
    """(problem, params) for a random tanh MLP d-w-…-w-Q on N random samples (float64)."""
    seed = draw(st.integers(0, 2**16))
    d_in = draw(st.integers(1, 3))
    q = draw(st.integers(1, max_q))
    n = draw(st.integers(1, max_n))
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    k_model, k_in, k_out = jax.random.split(jax.random.PRNGKey(seed), 3)
    apply, params = om.mlp(k_model, [d_in, *widths, q], "tanh", dtype=jnp.float64)
    inputs = jax.random.normal(k_in, (n, d_in), jnp.float64)
    targets = jax.random.normal(k_out, (n, q), jnp.float64)
    return om.Problem(apply, inputs, targets), params


def relative_error(actual, desired, scale):
    return float(np.linalg.norm(np.asarray(actual) - np.asarray(desired)) / max(scale, 1e-300))


@jax.jit
def _velocity(problem, params):
    """(D, ∇ₓC, θ') at params, θ' the adapted velocity."""
    grad_x = problem.output_gradient(problem.outputs(params))
    return problem.jacobian(params), grad_x, om.adapted_flow(problem)(0.0, params)


@jax.jit
def _damped_steps(problem, params, damping):
    """(D, x - y, the damped step of each dense solver) at params."""
    steps = {}
    for solver in ("cholesky", "qr", "svd"):
        opt = om.scale_by_output_metric(damping=damping, solver=solver)
        update, state = opt.update(None, opt.init(params), params, problem=problem)
        steps[solver] = (ravel_pytree(update)[0], state.finite)
    return problem.jacobian(params), problem.outputs(params) - problem.targets, steps


@SETTINGS
@given(mlp_problems())
def test_adapted_velocity_moves_outputs_by_minus_projected_gradient(case):
    problem, params = case
    jac, grad_x, velocity = _velocity(problem, params)
    jac, grad_x = np.asarray(jac), np.asarray(grad_x).reshape(-1)
    projected = jac @ (np.linalg.pinv(jac) @ grad_x)  # P∇ₓC, P the projector onto range D
    moved = jac @ np.asarray(ravel_pytree(velocity)[0])  # D·θ'
    assert np.all(np.isfinite(moved))
    assert relative_error(moved, -projected, np.linalg.norm(grad_x)) <= 1e-8


@SETTINGS
@given(mlp_problems(), st.floats(-3.0, 1.0))
def test_damped_step_is_the_same_on_both_sides(case, log_damping):
    problem, params = case
    jac, residual, _ = _damped_steps(problem, params, 1.0)  # compiles; λ is traced
    jac, residual = np.asarray(jac), np.asarray(residual).reshape(-1)
    lam = 10.0**log_damping * max(float(np.mean(np.sum(jac**2, axis=1))), 1e-3)
    steps = _damped_steps(problem, params, lam)[2]
    rows, cols = jac.shape
    wide = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(rows), residual)
    tall = np.linalg.solve(jac.T @ jac + lam * np.eye(cols), jac.T @ residual)
    scale = np.linalg.norm(wide)
    assert relative_error(wide, tall, scale) <= 1e-8
    for solver, (step, finite) in steps.items():
        assert bool(finite), solver  # the solve met no NaN or inf (it would zero the step)
        assert relative_error(step, wide, scale) <= 1e-8, solver


# ------------------------------------------------------- finite input -> finite update

#: Two fixed architectures (d_in, widths, Q, N): K = 13 < QN = 14, and K = 74 > QN = 8.
ARCHITECTURES = [(1, (4,), 2, 7), (3, (6, 6), 2, 4)]

#: Every optimizer, all updated by one jitted function (compiled once per architecture and dtype).
OPTIMIZERS = {
    "default": om.output_metric_descent(),
    "undamped": om.output_metric_descent(damping=0.0),
    "euler": om.output_metric_descent(damping=0.0, linesearch=None),
    "cholesky": om.scale_by_output_metric(solver="cholesky"),
    "qr": om.scale_by_output_metric(solver="qr"),
    "svd": om.scale_by_output_metric(solver="svd"),
    "cg": om.scale_by_output_metric(solver="cg", damping=1e-6),
}


@jax.jit
def _all_updates(problem, params):
    return {name: opt.update(None, opt.init(params), params, problem=problem)
            for name, opt in OPTIMIZERS.items()}


APPLIES = {arch: om.mlp(jax.random.PRNGKey(0), [arch[0], *arch[1], arch[2]], "tanh")[0]
           for arch in ARCHITECTURES}


@st.composite
def degenerate_cases(draw):
    arch = draw(st.sampled_from(ARCHITECTURES))
    d_in, widths, q, n = arch
    dtype = draw(st.sampled_from([jnp.float32, jnp.float64]))
    seed = draw(st.integers(0, 2**16))
    weight_scale = 10.0 ** draw(st.floats(-4.0, 3.0))  # zero-ish to fully saturated
    input_scale = 10.0 ** draw(st.floats(-3.0, 3.0))
    repeats = draw(st.integers(0, n - 1))  # samples equal to sample 0 (rank loss)
    zero_layer = draw(st.sampled_from([None, 0, -1]))
    k_model, k_in, k_out = jax.random.split(jax.random.PRNGKey(seed), 3)
    _, params = om.mlp(k_model, [d_in, *widths, q], "tanh", dtype=dtype)
    params = jax.tree_util.tree_map(lambda a: a * weight_scale, params)
    if zero_layer is not None:
        params[zero_layer] = jax.tree_util.tree_map(jnp.zeros_like, params[zero_layer])
    inputs = input_scale * jax.random.normal(k_in, (n, d_in), dtype)
    inputs = inputs.at[1:1 + repeats].set(inputs[0])
    targets = jax.random.normal(k_out, (n, q), dtype)
    problem = om.Problem(APPLIES[arch], inputs, targets)
    return problem, params


@settings(max_examples=15, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(degenerate_cases())
def test_finite_input_never_yields_a_non_finite_update(case):
    problem, params = case
    check_finite_updates(problem, params, _all_updates(problem, params))


def check_finite_updates(problem, params, results):
    """Property 3 for `results` = {name: (updates, state)}: finite updates in the params' dtype,
    a finite state, no solve that met NaN or inf, and no cost increase where safeguarded."""
    cost = float(problem.cost(params))
    for name, (updates, state) in results.items():
        leaves = jax.tree_util.tree_leaves(updates)
        assert all(u.dtype == p.dtype for u, p in zip(leaves, jax.tree_util.tree_leaves(params)))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in leaves), name
        assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree_util.tree_leaves(state)), name
        assert bool(state.finite), f"{name}: the solve met NaN or inf (its δ was zeroed)"
        if name in ("default", "undamped"):  # safeguarded: the cost never increases
            assert float(problem.cost(optax.apply_updates(params, updates))) <= cost, name


def test_the_properties_catch_a_solver_that_produces_nan(monkeypatch):
    """A solver whose δ is NaN is zeroed by the solve, so the updates stay finite: the check
    must still fail, on `state.finite`."""
    from outmetric import _solve

    def broken_svd(jac, rhs, lam, rtol, *, fallback):
        result = _SVD(jac, rhs, lam, rtol, fallback=fallback)
        return result._replace(delta=result.delta * jnp.nan)

    monkeypatch.setattr(_solve, "_svd", broken_svd)
    arch = ARCHITECTURES[0]
    _, params = om.mlp(jax.random.PRNGKey(1), [arch[0], *arch[1], arch[2]], "tanh")
    inputs = jax.random.normal(jax.random.PRNGKey(2), (arch[3], arch[0]))
    problem = om.Problem(APPLIES[arch], inputs, jnp.zeros((arch[3], arch[2])))
    opt = OPTIMIZERS["svd"]
    updates, state = opt.update(None, opt.init(params), params, problem=problem)  # not jitted
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    with pytest.raises(AssertionError, match="the solve met NaN or inf"):
        check_finite_updates(problem, params, {"svd": (updates, state)})
