"""The optimizer core (DESIGN §6): the damped family from one factorization, scaled damping,
the trust region, the matrix-free step, and termination — each against a dense reference or
a theorem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from outmetric._solve import (
    DirectFactor,
    SpectralFactor,
    linearize,
    normal_equations_cg,
    output_space_cg,
    prepare_preconditioner,
    scale_columns,
)
from helpers import make_problem
from outmetric import _transform


def exponential_fit(scale=(1.0, 1.0, 1.0), noise=0.05, m=40):
    """y = b1·exp(−b2·x) + b3 + noise: a non-zero minimum, parameters θ = scale ⊙ φ."""
    x = jnp.linspace(0.0, 4.0, m)
    rng = np.random.default_rng(0)
    y = 2.5 * jnp.exp(-1.3 * x) + 0.5 + noise * jnp.asarray(rng.normal(size=m))
    c = jnp.asarray(scale)

    def residual(phi):
        b = c * phi
        return y - (b[0] * jnp.exp(-b[1] * x) + b[2])

    return om.Problem.from_residual(residual, m), jnp.array([1.0, 0.5, 0.0]) / c


def dense_damped(jac, r, lam):
    k = jac.shape[1]
    return np.linalg.solve(jac.T @ jac + lam * np.eye(k), jac.T @ r)


@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("use_gram", [False, True])
def test_spectral_factor_gives_every_damped_step_and_its_model(shape, use_gram):
    n = 6 if shape == "wide" else 40
    problem, params = make_problem("tanh_mlp", n=n, q=1, width=4)
    lin = linearize(problem, params, method="svd")
    rng = np.random.default_rng(1)
    d = jnp.asarray(np.exp(rng.normal(size=lin.shape[1])))  # a diagonal S^{-1/2}
    scaled = scale_columns(lin, d)
    jac = np.asarray(lin.jacobian) * np.asarray(d)
    r = np.asarray(problem.outputs(params) - problem.targets).reshape(-1)
    factor = SpectralFactor(scaled, jnp.asarray(r), 1e-14, use_gram=use_gram)
    tol = 1e-9 if use_gram else 1e-11
    for lam in (1e-3, 1e-1, 10.0):
        step = factor.step(lam)
        want = dense_damped(jac, r, lam)
        np.testing.assert_allclose(step.delta, want, rtol=tol * 1e2, atol=tol * np.abs(want).max())
        image = jac @ want
        np.testing.assert_allclose(step.model_linear, r @ image, rtol=tol * 1e2)
        np.testing.assert_allclose(step.model_quadratic, image @ image, rtol=tol * 1e2)
        np.testing.assert_allclose(step.norm, np.linalg.norm(want), rtol=tol * 1e2)
        # The O(n) norm agrees with the step's.
        np.testing.assert_allclose(factor.norm(lam), step.norm, rtol=1e-12)
        # Another right-hand side on the same factorization (the geodesic acceleration's).
        b = rng.normal(size=r.shape)
        other = dense_damped(jac, b, lam)
        np.testing.assert_allclose(factor.solve_for(lam, jnp.asarray(b)), other, rtol=tol * 1e2,
                                   atol=tol * np.abs(other).max())


def test_damping_for_radius_solves_the_secular_equation():
    problem, params = exponential_fit()
    lin = linearize(problem, params, method="svd")
    r = problem.outputs(params).reshape(-1) - problem.targets.reshape(-1)
    factor = SpectralFactor(lin, r, 1e-14)
    gauss_newton = float(factor.norm(0.0))
    for radius in (1e-3 * gauss_newton, 0.1 * gauss_newton, 0.7 * gauss_newton):
        lam = factor.damping_for_radius(radius)
        assert lam > 0
        assert abs(float(factor.norm(lam)) - radius) <= 0.1 * radius
    # The Gauss–Newton step inside the region: λ = 0.
    assert float(factor.damping_for_radius(2 * gauss_newton)) == 0.0


def test_direct_factor_equals_the_spectral_one():
    problem, params = make_problem("tanh_mlp", n=6, q=1, width=4)
    r = (problem.outputs(params) - problem.targets).reshape(-1)
    spectral = SpectralFactor(linearize(problem, params, method="svd"), r, 1e-14)
    direct = DirectFactor(linearize(problem, params, method="cholesky"), r, "cholesky", None)
    for lam in (1e-2, 1.0):
        a, b = spectral.step(lam), direct.step(lam)
        np.testing.assert_allclose(a.delta, b.delta, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(a.model_linear, b.model_linear, rtol=1e-9)
        np.testing.assert_allclose(a.model_quadratic, b.model_quadratic, rtol=1e-9)


def test_eigh_solver_matches_svd_and_cholesky_in_solve():
    problem, params = make_problem("tanh_mlp", n=6, q=2, width=4)
    steps = {method: om.output_metric_gradient(problem, params, damping=1e-2, solver=method)[1]
             for method in ("eigh", "svd", "cholesky")}
    for method in ("svd", "cholesky"):
        np.testing.assert_allclose(steps[method].delta, steps["eigh"].delta, rtol=1e-8,
                                   atol=1e-12)


def test_scaled_damping_is_invariant_to_rescaling_the_parameters():
    """DESIGN §6: with S = diag(DᵀD) the iterates do not depend on a diagonal rescaling of θ."""
    scale = (1e3, 1e-4, 1e2)
    problem, phi = exponential_fit()
    rescaled, psi = exponential_fit(scale)
    opt = om.output_metric_descent(scaling="jacobian")
    path = []
    for prob, p, c in ((problem, phi, np.ones(3)), (rescaled, psi, np.asarray(scale))):
        state = opt.init(p)
        update = jax.jit(lambda s, p, prob=prob: opt.update(None, s, p, problem=prob))
        thetas = []
        for _ in range(6):
            u, state = update(state, p)
            p = optax.apply_updates(p, u)
            thetas.append(np.asarray(p) * c)
        path.append(np.stack(thetas))
    np.testing.assert_allclose(path[1], path[0], rtol=1e-8, atol=1e-10)
    # ... which isotropic damping is not.
    iso = om.output_metric_descent(scaling="identity")
    u1 = iso.update(None, iso.init(phi), phi, problem=problem)[0]
    u2 = iso.update(None, iso.init(psi), psi, problem=rescaled)[0]
    assert np.max(np.abs(np.asarray(u2) * np.asarray(scale) - np.asarray(u1))) > 1e-3


def test_geodesic_acceleration_matches_a_dense_second_order_reference():
    """The first trust-region update (Gauss–Newton inside the first radius, so λ = 0) against
    numpy: δ̃ = D̃⁺r, a second derivative of the outputs from the full Hessian tensor, ã =
    D̃⁺x''_u, and the step S^{-1/2}(δ̃ + ½ã), which here lowers C below the plain step's;
    farther out, where 2‖ã‖ > ‖δ̃‖/4, the plain step."""
    problem, _ = exponential_fit()
    outputs = lambda t: problem.outputs(t).reshape(-1)  # noqa: E731
    derivatives = jax.jit(lambda t: (jax.jacfwd(outputs)(t), jax.hessian(outputs)(t)))
    opt = om.output_metric_descent()
    update = jax.jit(lambda t: opt.update(None, opt.init(t), t, problem=problem))
    for theta, tried in (([2.6, 1.4, 0.45], True), ([2.2, 1.1, 0.45], False)):
        _check_first_accelerated_update(problem, jnp.array(theta), tried, derivatives, update)


def _check_first_accelerated_update(problem, theta, tried, derivatives, update_fn):
    outputs = lambda t: problem.outputs(t).reshape(-1)  # noqa: E731
    jac, hess = map(np.asarray, derivatives(theta))
    r = np.asarray(outputs(theta) - problem.targets.reshape(-1))
    inv_sqrt = 1.0 / np.sqrt(np.sum(jac**2, axis=0))
    scaled = jac * inv_sqrt
    velocity = np.linalg.lstsq(scaled, r, rcond=None)[0]
    u = inv_sqrt * velocity
    accel = np.linalg.lstsq(scaled, np.einsum("mij,i,j->m", hess, u, u), rcond=None)[0]
    plain, fast = inv_sqrt * velocity, inv_sqrt * (velocity + 0.5 * accel)
    # The premises: λ = 0, the acceleration small enough to try (or not), better than plain.
    assert np.linalg.norm(velocity) <= np.linalg.norm(theta / inv_sqrt)
    assert (0 < 2 * np.linalg.norm(accel) <= 0.25 * np.linalg.norm(velocity)) == tried
    assert float(problem.cost(theta - fast)) < float(problem.cost(theta - plain))
    update, state = update_fn(theta)
    assert float(state.damping) == 0.0
    np.testing.assert_allclose(-np.asarray(update), fast if tried else plain, rtol=1e-9,
                               atol=1e-12)


def test_a_model_without_forward_mode_runs_without_the_acceleration():
    """A `jax.custom_vjp` model has no JVP of a JVP: the default update is then exactly the
    one with `geodesic_acceleration=False`, not a tracing error."""
    @jax.custom_vjp
    def squash(x):
        return jnp.tanh(x)

    squash.defvjp(lambda x: (squash(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))
    inputs = jnp.linspace(-1.0, 1.0, 12)[:, None]
    problem = om.Problem(lambda p, x: squash(p["w"] * x + p["b"]).reshape(1), inputs,
                         jnp.sin(inputs))
    params = {"w": jnp.asarray(0.5), "b": jnp.asarray(0.1)}
    default = om.output_metric_descent()
    plain = om.output_metric_descent(geodesic_acceleration=False)
    step = default.update(None, default.init(params), params, problem=problem)[0]
    reference = plain.update(None, plain.init(params), params, problem=problem)[0]
    for leaf, other in zip(jax.tree_util.tree_leaves(step), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(leaf, other)
    assert float(jnp.abs(step["w"])) > 0


def test_a_nonzero_minimum_stops_by_itself_with_a_convergence_code():
    problem, b0 = exponential_fit()
    result = om.fit(problem, b0, max_steps=500, progress=False)
    assert result.status in (om.RESULTS.ftol_reached, om.RESULTS.xtol_reached,
                             om.RESULTS.gtol_reached)
    assert result.converged and result.num_steps < 50
    # It is the least-squares minimum: the gradient DᵀR vanishes there, to what a cost that has
    # stopped falling in float64 can tell (|∇C|² ~ 2(C − C*)‖D‖², with C − C* at round-off):
    # nine digits below the gradient at the start (measured 4e-12 and 2e-10 of it, with XLA's
    # optimised and unoptimised CPU code).
    grad = jax.grad(problem.cost)(result.params)
    assert np.max(np.abs(grad)) <= 1e-9 * np.max(np.abs(jax.grad(problem.cost)(b0)))
    # Another update there takes no step: round-off is not progress.
    opt = om.output_metric_descent()
    _, state = opt.update(None, result.state, result.params, problem=problem)
    assert int(state.status) != om.RESULTS.running


def test_zero_residual_without_eps_stops_converged():
    problem, params = make_problem("tanh_mlp", n=6, q=1, width=8)  # K ≫ QN: a zero minimum
    result = om.fit(problem, params, max_steps=300, progress=False)
    assert result.converged, result.status
    assert result.num_steps < 100
    assert result.costs[-1] <= 1e-20 * result.costs[0]


def test_gtol_at_a_stationary_point_takes_no_step():
    x = jnp.linspace(0.0, 1.0, 20)
    y = jnp.cos(3 * x)
    features = jnp.stack([jnp.ones_like(x), x, x**2], axis=1)
    problem = om.Problem.from_residual(lambda b: features @ b - y, 20)
    best = jnp.linalg.lstsq(features, y)[0]
    opt = om.output_metric_descent()
    updates, state = opt.update(None, opt.init(best), best, problem=problem)
    assert om.RESULTS(int(state.status)) == om.RESULTS.gtol_reached
    assert float(jnp.max(jnp.abs(updates))) == 0.0


def test_fit_reports_why_it_stopped():
    problem, b0 = exponential_fit()
    assert om.fit(problem, b0, max_steps=2, progress=False).status == om.RESULTS.max_steps_reached
    assert not om.fit(problem, b0, max_steps=2, progress=False).converged
    result = om.fit(problem, b0, max_steps=50, progress=False, chunk_size=1,
                    callback=lambda *a: True)
    assert result.status == om.RESULTS.stopped_by_callback and not result.converged
    result = om.fit(problem, b0, eps=0.01, progress=False)
    assert result.status == om.RESULTS.eps_reached and result.converged
    assert "eps" in result.message


def test_matrix_free_step_meets_its_forcing_tolerance_and_warm_starts():
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=6)
    lin = linearize(problem, params, method="cg")
    r = (problem.outputs(params) - problem.targets).reshape(-1)
    jac = np.asarray(problem.jacobian(params))
    lam = 1e-2
    want = dense_damped(jac, np.asarray(r), lam)
    zero = jnp.zeros(lin.shape[1])
    loose = normal_equations_cg(lin, r, lam, initial=zero, forcing=0.3, max_steps=500)
    b = jac.T @ np.asarray(r)
    residual = b - (jac.T @ (jac @ np.asarray(loose.delta)) + lam * np.asarray(loose.delta))
    assert np.linalg.norm(residual) <= 0.3 * np.linalg.norm(b) * (1 + 1e-9)
    assert bool(loose.solve.converged)
    tight = normal_equations_cg(lin, r, lam, initial=zero, forcing=1e-12, max_steps=500)
    np.testing.assert_allclose(tight.delta, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())
    # Warm-started at the answer, CG has nothing left to do.
    warm = normal_equations_cg(lin, r, lam, initial=tight.delta, forcing=1e-8, max_steps=500)
    assert int(warm.solve.num_steps) == 0
    # Capped below what it needs, it says it did not converge.
    capped = normal_equations_cg(lin, r, lam, initial=zero, forcing=1e-14, max_steps=2)
    assert not bool(capped.solve.converged)


def test_output_side_step_meets_its_forcing_and_equals_the_dense_damped_step():
    """Wide side: (DDᵀ + λI)z = r by (Nyström-)preconditioned CG; the forcing bounds the
    output-side residual, and a tight one gives δ = Dᵀz = the dense damped step."""
    problem, params = make_problem("tanh_mlp", n=6, q=2, width=8)  # M = 12 < K
    lin = linearize(problem, params, method="cg")
    assert lin.shape[0] < lin.shape[1]
    r = (problem.outputs(params) - problem.targets).reshape(-1)
    jac = np.asarray(problem.jacobian(params))
    pre = jax.jit(lambda: prepare_preconditioner(lin, "nystrom", 4))()
    solve = jax.jit(lambda lam, forcing, pre: output_space_cg(
        lin, r, lam, forcing=forcing, max_steps=200, preconditioner=pre))
    for lam in (1e-6, 1e-2, 1.0):
        want = dense_damped(jac, np.asarray(r), lam)
        loose = solve(lam, 0.3, pre)
        z_side = np.linalg.solve(jac @ jac.T + lam * np.eye(12), np.asarray(r))
        # the linear model's new residual is within 0.3‖r‖ of the exact damped step's
        image = jac @ np.asarray(loose.delta)
        exact_image = jac @ (jac.T @ z_side)
        assert np.linalg.norm(image - exact_image) <= 0.3 * np.linalg.norm(r) * (1 + 1e-6)
        assert bool(loose.solve.converged)
        tight = solve(lam, 1e-12, pre)
        np.testing.assert_allclose(tight.delta, want, rtol=1e-7,
                                   atol=1e-9 * np.abs(want).max())
        np.testing.assert_allclose(tight.model_linear, np.asarray(r) @ (jac @ want), rtol=1e-7)


def test_matrix_free_nystrom_update_is_the_damped_step_at_its_damping():
    """The adaptive matrix-free update with preconditioner='nystrom' on the wide side takes
    the dense damped step at the λ it solved with (tight cg_tol, first update, accepted)."""
    problem, params = make_problem("tanh_mlp", n=6, q=2, width=8)
    opt = om.output_metric_descent(solver="cg", preconditioner="nystrom", preconditioner_rank=6,
                                   cg_tol=1e-12)
    state = opt.init(params)
    u, new = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))(state, params)
    assert float(new.step_size) == 1.0 and bool(new.solve_converged)
    lin = linearize(problem, params, method="cg")
    lam = 1e-3 * float(_transform._mean_gram_diagonal(lin, None))  # the first λ
    assert float(new.damping) < lam  # accepted: λ shrank for the next update
    jac = np.asarray(problem.jacobian(params))
    r = np.asarray(problem.outputs(params) - problem.targets).reshape(-1)
    want = dense_damped(jac, r, lam)
    np.testing.assert_allclose(-ravel_pytree(u)[0], want, rtol=1e-7,
                               atol=1e-9 * np.abs(want).max())


def test_nystrom_sketch_is_kept_across_updates_and_renewed_when_cg_slows():
    """The adaptive matrix-free update sketches once and keeps U, μ̂ in the state; the next
    update reuses them (no new sketch) unless marked for renewal, which `_reuse_sketch` does
    when a solve takes more than SKETCH_GROWTH times the iterations of the first after it."""
    problem, params = make_problem("tanh_mlp", n=6, q=2, width=8)  # M = 12 < K
    opt = om.output_metric_descent(solver="cg", preconditioner="nystrom", preconditioner_rank=5)
    update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))
    state = opt.init(params)
    assert state.sketch_basis.shape == (ravel_pytree(params)[0].size, 5)
    u, first = update(state, params)
    basis = np.asarray(first.sketch_basis)
    assert np.all(np.asarray(first.sketch_values) > 0) and not bool(first.sketch_refresh)
    np.testing.assert_allclose(basis[:12].T @ basis[:12], np.eye(5), atol=1e-10)
    assert np.all(basis[12:] == 0)  # the output side's 12 rows of the K
    assert float(first.sketch_effort) > 0
    params2 = optax.apply_updates(params, u)
    _, second = update(first, params2)
    np.testing.assert_array_equal(second.sketch_basis, basis)  # kept: D moved, U did not
    _, renewed = update(first._replace(sketch_refresh=jnp.asarray(True)), params2)
    assert not np.allclose(renewed.sketch_basis, basis)  # a new sketch of the new Gram
    # The renewal rule: effort = iterations / sqrt(1 + μ̂_ℓ/λ) against the first solve's.
    mu = float(first.sketch_values[-1])
    kept = _transform.Preconditioner(basis=first.sketch_basis[:12], eigenvalues=first.sketch_values)
    base = first._replace(sketch_effort=jnp.asarray(100.0))
    growth = _transform.SKETCH_GROWTH
    assert _transform.SKETCH_MIN_FRACTION * 5 < 283  # ℓ = 5: the iteration floor is not binding
    for steps, lam, sketched, want in (
            (int(growth * 100 * np.sqrt(2)) + 2, mu, False, True),  # grew beyond λ's share
            (int(growth * 100 * np.sqrt(2)) - 2, mu, False, False),
            (int(growth * 100 * np.sqrt(1 + 1e4)), mu * 1e-4, False, False),  # λ's doing
            (10**5, mu, True, False)):  # a fresh sketch sets the base instead
        refresh, effort = _transform._reuse_sketch(kept, jnp.asarray(sketched), steps, lam,
                                                   base, 12)[2:]
        assert bool(refresh) == want, (steps, lam, sketched)
        if sketched:
            np.testing.assert_allclose(float(effort), steps / np.sqrt(1 + mu / lam))
        else:
            assert float(effort) == 100.0
    # Fewer iterations than half of ℓ never renew, however much the effort grew.
    small = base._replace(sketch_effort=jnp.asarray(0.1))
    big = _transform.Preconditioner(basis=jnp.zeros((12, 400)), eigenvalues=jnp.full(400, mu))
    assert not bool(_transform._reuse_sketch(big, jnp.asarray(False), 199, mu, small._replace(
        sketch_basis=jnp.zeros((small.sketch_basis.shape[0], 400)),
        sketch_values=jnp.zeros(400)), 12)[2])


def test_matrix_free_default_descends_with_one_solve_per_update():
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=6)
    opt = om.output_metric_descent(solver="cg")
    update = jax.jit(lambda s, p, prob: opt.update(None, s, p, problem=prob))
    state, costs = opt.init(params), [float(problem.cost(params))]
    for _ in range(15):
        u, state = update(state, params, problem)
        params = optax.apply_updates(params, u)
        costs.append(float(problem.cost(params)))
        assert bool(state.solve_converged)
    assert np.all(np.diff(costs) <= 0)
    assert costs[-1] <= 1e-3 * costs[0]
    other = problem.with_data(problem.inputs * 0.5, problem.targets)
    update(state, params, other)
    assert update._cache_size() == 1


def test_matrix_free_update_solves_once_even_when_the_direction_is_rejected(monkeypatch):
    """One Krylov solve per update (counted as it runs), the first update included; a rejected
    direction is backtracked (0 < α < 1) and λ grows for the next update."""
    from outmetric import _transform

    solves = []
    step = _transform._KrylovFactor.step

    def counted(self, lam):
        out = step(self, lam)
        jax.debug.callback(lambda: solves.append(1))
        return out

    monkeypatch.setattr(_transform._KrylovFactor, "step", counted)
    problem, params = make_problem("tanh_mlp", n=8)
    opt = om.output_metric_descent(solver="cg")
    update = jax.jit(lambda s, p: opt.update(None, s, p, problem=problem))
    state, alphas, dampings = opt.init(params), [], []
    for _ in range(6):
        before = len(solves)
        u, state = update(state, params)
        jax.block_until_ready(u)
        assert len(solves) - before == 1
        params = optax.apply_updates(params, u)
        alphas.append(float(state.step_size))
        dampings.append(float(state.damping))
    assert 0.0 < alphas[0] < 1.0  # this start's first direction is too long: backtracked
    assert dampings[1] > dampings[0] / 3  # ... and λ was raised, not shrunk, for the next


def test_spectral_default_reports_rank_loss():
    """A duplicated parameter direction: rank D = K − 1 is read off the spectrum."""
    x = jnp.linspace(0.0, 1.0, 30)
    y = jnp.exp(x)
    problem = om.Problem.from_residual(lambda b: (b[0] + b[1]) * jnp.exp(b[2] * x) - y, 30)
    b0 = jnp.array([0.3, 0.4, 0.5])
    opt = om.output_metric_descent()
    assert om.plan_solve(problem, b0, damping=1.0, many_dampings=True).method == "svd"
    _, state = opt.update(None, opt.init(b0), b0, problem=problem)
    assert int(state.rank) == 2 and bool(state.fallback)


def test_new_arguments_are_checked():
    with pytest.raises(ValueError, match="scaling"):
        om.output_metric_descent(scaling="column")
    with pytest.raises(ValueError, match="step_rule"):
        om.output_metric_descent(step_rule="dogleg")
    with pytest.raises(ValueError, match="ftol"):
        om.output_metric_descent(ftol=-1.0)
    with pytest.raises(ValueError, match="xtol"):
        om.output_metric_descent(xtol=2.0)
    with pytest.raises(ValueError, match="gtol"):
        om.output_metric_descent(gtol="small")
    with pytest.raises(TypeError, match="geodesic_acceleration"):
        om.output_metric_descent(geodesic_acceleration="yes")


def test_last_step_to_a_nonfinite_cost_is_undone_and_raised():
    """Issue #14, item 1: the budget's last step lands on NaN: NonFiniteError, finite result."""
    problem, params = make_problem("tanh_mlp", n=6, q=1, width=4)
    calls = []

    def poison(step, params, state, cost):
        calls.append(step)

    # An SGD step so large the cost overflows to inf on the last step of the budget.
    opt = optax.sgd(1e200)
    with pytest.raises(om.NonFiniteError) as info:
        om.fit(problem, params, opt, max_steps=1, progress=False, callback=poison)
    result = info.value.result
    assert np.isfinite(result.costs[-1])
    assert result.status == om.RESULTS.nonfinite
    flat = ravel_pytree(result.params)[0]
    assert np.all(np.isfinite(flat))


def _tall_tanh_problem(seed, m=30):
    """y ≈ sin(2x) on m random points, model Σ a tanh(w x + b) + c of width 3 (K = 10 < m)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1.0, 1.0, (m, 1)))
    return x, jnp.sin(2.0 * x)


def _tanh_model(p, x):
    return (p["a"] @ jnp.tanh(p["w"] * x[0] + p["b"]) + p["c"]).reshape(1)


def test_redrawn_batches_average_the_gram_and_take_the_best_grid_step():
    """`fit(batches=...)` with the default optimizer (issue #13): the state's Gram is the
    average $G_k = 0.3G_{k-1} + 0.7D_k^\\top D_k$ over the batches, and each update is the step
    α·S^{-1/2}(G̃ + λI)^{-1}S^{-1/2}D_kᵀr_k (S = diag G_k, λ = AVERAGED_DAMPING) with α the
    first local minimum of that batch's cost along 1, 1/2, …, 2^-30 — replayed here densely,
    batch by batch.
    Fixed data keep the trust region (no averaged Gram in the state)."""
    batches = [_tall_tanh_problem(seed) for seed in range(4)]
    problem = om.Problem(_tanh_model, *batches[0])
    params = {"a": jnp.asarray([0.5, -0.3, 0.2]), "w": jnp.asarray([1.0, -0.7, 0.4]),
              "b": jnp.asarray([0.1, 0.2, -0.3]), "c": jnp.asarray(0.05)}
    result = om.fit(problem, params, batches=batches, max_steps=4, progress=False)

    flat, unravel = ravel_pytree(params)
    lam = _transform.AVERAGED_DAMPING
    grid = 2.0 ** -np.arange(31.0)
    gram = None
    for inputs, targets in batches:
        batch = problem.with_data(inputs, targets)
        outputs, jac = batch.linearize(unravel(flat))
        r = np.asarray(outputs - targets).reshape(-1)
        jac = np.asarray(jac)
        gram = jac.T @ jac if gram is None else 0.3 * gram + 0.7 * jac.T @ jac
        d = 1.0 / np.sqrt(np.diag(gram))
        mu, vecs = np.linalg.eigh(d[:, None] * gram * d[None, :])
        delta = d * (vecs @ ((vecs.T @ (d * (jac.T @ r))) / (mu + lam)))
        best, best_cost = 0.0, float(batch.cost(unravel(flat)))
        for a in grid:  # from α = 1 down: the first local minimum below C(θ)
            c = float(batch.cost(unravel(flat - a * delta)))
            if c < best_cost:
                best, best_cost = a, c
            elif best > 0:
                break
        assert best > 0
        flat = flat - best * delta
    assert result.state.gram_average.shape == (10, 10)
    np.testing.assert_allclose(result.state.gram_average, gram, rtol=1e-6)
    np.testing.assert_allclose(ravel_pytree(result.params)[0], flat, rtol=1e-6, atol=1e-7)
    assert result.costs[-1] < result.costs[0]

    fixed = om.fit(problem, params, max_steps=4, progress=False)
    assert fixed.state.gram_average.shape == (0, 0) and float(fixed.state.radius) > 0


def test_a_fresh_batch_turns_the_geodesic_acceleration_off():
    """The `fresh_data=True` extra argument (`fit` passes it with `batches=`): the default
    update is then exactly the one without the acceleration; without it, the one with it;
    and the two differ on this curved fit."""
    problem, _ = exponential_fit()
    b0 = jnp.array([2.6, 1.4, 0.45])  # where the first update takes the acceleration (above)
    default = om.output_metric_descent()
    state = default.init(b0)
    on = om.output_metric_descent(geodesic_acceleration=True)
    off = om.output_metric_descent(geodesic_acceleration=False)
    fresh = default.update(None, state, b0, problem=problem, fresh_data=True)[0]
    fixed = default.update(None, state, b0, problem=problem)[0]
    np.testing.assert_array_equal(fresh, off.update(None, state, b0, problem=problem)[0])
    np.testing.assert_array_equal(fixed, on.update(None, state, b0, problem=problem)[0])
    assert not np.array_equal(fresh, fixed)
    with pytest.raises(TypeError, match="fresh_data"):
        default.update(None, state, b0, problem=problem, fresh_data="yes")
    for bad in (1.0, -0.1, True, "0.3", jnp.asarray(1.5)):
        with pytest.raises(ValueError, match="gram_average"):
            om.output_metric_descent(gram_average=bad)
    # An array β, as optax.inject_hyperparams passes it, is read at init: it sets the state.
    injected = optax.inject_hyperparams(om.output_metric_descent)(gram_average=0.3)
    assert injected.init(b0).inner_state.gram_average.shape == (b0.size, b0.size)
