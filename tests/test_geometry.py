"""Geometry of the output metric (DESIGN §2): rank, horizontal/vertical split, pull-back length,
equilibria, critical-set dimension, the homotopy and interpolation flows, cross-entropy fibres.

Every check compares with a closed form or a dense NumPy reference, in float64.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import (
    levenberg_marquardt,
    linear_model_problem,
    make_problem,
    split_units,
    teacher_problem,
    tanh_mlp,
)

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def flat_jax(tree):
    return ravel_pytree(tree)[0]


def random_tangent(params, seed=1):
    f, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), f.shape, f.dtype))


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def overparam():
    """tanh MLP, N = 8, Q = 2, K = 402: overparametrised with rank D = QN."""
    return make_problem("tanh_mlp", n=8, d_in=5, q=2)


@pytest.fixture(scope="session")
def duplicated():
    """Critical points of a 2-3-1 tanh net (K = 13) and of its embedding into width 5 (K = 21)
    by splitting hidden units 0 and 1, with exact teacher targets and with noisy ones."""
    out = {}
    for label, noise in (("exact", 0.0), ("noisy", 0.1)):
        problem, teacher = teacher_problem(noise)
        small = teacher if noise == 0.0 else levenberg_marquardt(problem, teacher)
        big = split_units(small, [0, 1], [0.3, 0.6])
        out[label] = (problem, small, big)
    return out


#: The tests of the 15 s `adapted_path` integration share one pytest-xdist worker.
ADAPTED_PATH_GROUP = pytest.mark.xdist_group("geometry_adapted_path")


@pytest.fixture(scope="session")
def adapted_path(overparam):
    problem, params = overparam
    return om.integrate(problem, params, eps=1e-6, num_saves=41)


# ----------------------------------------------------------------------------- rank condition


def test_spectrum_rank_and_regime_match_dense_svd(overparam, duplicated):
    problem, params = overparam
    jac = np.asarray(problem.jacobian(params))
    reference = np.linalg.svd(jac, compute_uv=False)
    spectrum = om.jacobian_spectrum(problem, params)
    assert spectrum.shape == (16,)
    np.testing.assert_allclose(spectrum, reference, rtol=1e-12)
    assert np.all(np.diff(np.asarray(spectrum)) <= 0)
    assert int(om.numerical_rank(problem, params)) == np.linalg.matrix_rank(jac) == 16
    cut = 0.3
    assert int(om.numerical_rank(problem, params, rtol=cut)) == np.sum(reference > cut * reference[0])
    info = om.regime(problem, params)
    assert (info.name, info.rank, info.num_outputs, info.num_params) == (
        "overparametrised", 16, 16, 402)
    assert info.smallest_singular_value == pytest.approx(reference[-1], rel=1e-12)
    assert str(info).startswith("overparametrised: rank D = QN = 16 <= K = 402")

    problem, params, _ = linear_model_problem()
    info = om.regime(problem, params)
    assert (info.name, info.rank) == ("underparametrised", 9)
    assert "underparametrised" in str(info)

    # Splitting two hidden units adds 2·(d + 2) = 8 columns to D but no new directions: the
    # columns of a unit and its copy are proportional (input weights, bias) or equal (output
    # weight), so rank D stays K_small = 13 < min(QN, K) = 21.
    problem, small, big = duplicated["noisy"]
    assert om.regime(problem, small).name == "underparametrised"
    info = om.regime(problem, big)
    assert (info.name, info.rank, info.num_params) == ("rank-lost", 13, 21)
    assert "rank-lost: rank D = 13 < min(QN, K) = 21" in str(info)


@pytest.mark.parametrize("solver", ["cholesky", "qr"])
def test_fit_records_the_smallest_singular_value_each_step(overparam, duplicated, solver):
    """σ_min(D) per step equals the dense SVD's at the params each step started from; at a
    split-unit network it is zero to round-off (rank lost), and untracked runs report -1."""
    problem, params = overparam
    seen = []
    opt = om.output_metric_descent(damping=1e-8, solver=solver, track_min_singular_value=True)
    result = om.fit(problem, params, opt, max_steps=4, chunk_size=1, progress=False,
                    callback=lambda step, p, state, cost: seen.append(p) and False)
    assert result.min_singular_values.shape == (result.num_steps,) == (4,)
    starts = [params] + seen[:-1]
    for sigma, start in zip(result.min_singular_values, starts):
        reference = np.linalg.svd(np.asarray(problem.jacobian(start)), compute_uv=False)
        assert sigma == pytest.approx(reference[-1], rel=1e-8)

    plain = om.fit(problem, params, om.output_metric_descent(), max_steps=2, progress=False)
    np.testing.assert_array_equal(plain.min_singular_values, [-1.0, -1.0])

    problem, _, big = duplicated["noisy"]
    result = om.fit(problem, big, opt, max_steps=1, progress=False)
    spectrum = np.asarray(om.jacobian_spectrum(problem, big))
    assert result.min_singular_values[0] <= 1e-6 * spectrum[0]
    assert result.min_rank == 13


# ----------------------------------------------------------------------------- sub-Riemannian split


@pytest.mark.parametrize("case", ["overparam", "underparam", "rank-lost"])
def test_horizontal_and_vertical_are_the_svd_projections(case, overparam, duplicated):
    if case == "overparam":
        problem, params = overparam
    elif case == "underparam":
        problem, params, _ = linear_model_problem()
    else:
        problem, _, params = duplicated["noisy"]
    v = random_tangent(params)
    jac = np.asarray(problem.jacobian(params))
    u, s, vt = np.linalg.svd(jac, full_matrices=False)
    rank = np.sum(s > max(jac.shape) * np.finfo(float).eps * s[0])
    basis = vt[:rank]  # orthonormal basis of range Dᵀ
    v_flat = flat(v)
    h_flat, vert_flat = flat(om.horizontal(problem, params, v)), flat(om.vertical(problem, params, v))
    np.testing.assert_allclose(h_flat, basis.T @ (basis @ v_flat), atol=1e-10 * np.linalg.norm(v_flat))
    np.testing.assert_allclose(h_flat + vert_flat, v_flat, atol=1e-14 * np.linalg.norm(v_flat))
    assert np.linalg.norm(jac @ vert_flat) <= 1e-9 * s[0] * np.linalg.norm(v_flat)  # Dv_V = 0
    assert abs(h_flat @ vert_flat) <= 1e-10 * np.linalg.norm(v_flat) ** 2  # H ⟂ V
    if case == "underparam":  # ker D = {0}
        assert np.linalg.norm(vert_flat) <= 1e-12 * np.linalg.norm(v_flat)


@ADAPTED_PATH_GROUP
def test_adapted_velocity_is_horizontal_along_the_trajectory(overparam, adapted_path):
    problem, _ = overparam
    flow = om.adapted_flow(problem)

    @eqx.filter_jit
    def split(params):
        velocity = flow(0.0, params, None)
        vertical = om.vertical(problem, params, velocity)
        return ravel_pytree(velocity)[0], ravel_pytree(vertical)[0]

    # lax.map, not vmap: XLA's multi-threaded Eigen pool on CPU can wedge executing batched
    # factorizations (a known XLA CPU hang), and a sequential map tests the same thing.
    velocities, verticals = jax.lax.map(split, adapted_path.params)
    speed = np.linalg.norm(velocities, axis=1)
    assert np.all(speed > 0)
    np.testing.assert_array_less(np.linalg.norm(verticals, axis=1), 1e-10 * speed)
    # A generic direction is not horizontal: K − QN = 386 vertical dimensions.
    params = adapted_path.final_params
    v = random_tangent(params)
    assert np.linalg.norm(flat(om.vertical(problem, params, v))) > 0.5 * np.linalg.norm(flat(v))


@ADAPTED_PATH_GROUP
def test_pullback_length_of_adapted_orbit_is_the_output_distance(overparam, adapted_path):
    problem, _ = overparam
    y = problem.targets.reshape(-1)
    x = jax.vmap(problem.outputs)(adapted_path.params).reshape(len(adapted_path.ts), -1)
    distance = np.linalg.norm(x - y, axis=1)
    lengths = om.pullback_length(problem, adapted_path, cumulative=True)
    assert lengths.shape == adapted_path.ts.shape and lengths[0] == 0
    expected = distance[0] - distance
    np.testing.assert_allclose(lengths[1:], expected[1:], rtol=1e-6)
    assert om.pullback_length(problem, adapted_path) == pytest.approx(expected[-1], rel=1e-6)


def test_pullback_length_of_a_curved_path_converges_to_its_arc_length():
    # x(θ) = θ (N = 2, Q = 1): D = I, so the g-length is the Euclidean length of θ(s). Along the
    # quarter circle θ(s) = (cos s, sin s) it is π/2; the inscribed polygon with S − 1 chords of
    # angle h has length (S − 1)·2 sin(h/2).
    problem = om.Problem.from_residual(lambda p: p["z"], num_residuals=2)
    ts = jnp.linspace(0.0, math.pi / 2, 201)
    path = {"z": jnp.stack([jnp.cos(ts), jnp.sin(ts)], axis=1)}
    traj = om.Trajectory(ts, path, jnp.zeros_like(ts), None, 200, None, "successful")
    h = math.pi / 2 / 200
    length = float(om.pullback_length(problem, traj))
    assert length == pytest.approx(200 * 2 * math.sin(h / 2), rel=1e-13)
    assert abs(length - math.pi / 2) <= (math.pi / 2) * h**2 / 24 * 1.01


# ----------------------------------------------------------------------------- equilibria


def test_critical_dimension_at_duplicated_units_matches_hand_count(duplicated):
    d_in, num_split = 2, 2
    # Exact teacher targets: the residual vanishes, the Hessian is DᵀD/N, and its nullity is
    # K_big − rank D = 21 − 13 = num_split·(d_in + 2): per split unit, d_in + 1 directions moving
    # the two copies' (w, b) against each other and 1 trading their output weights.
    problem, small, big = duplicated["exact"]
    assert bool(om.is_equilibrium(problem, small)) and bool(om.is_equilibrium(problem, big))
    assert om.critical_dimension(problem, small) == 0
    assert om.critical_dimension(problem, big) == num_split * (d_in + 2) == 8
    # Noisy targets: a non-degenerate minimum with residual r ≠ 0 of the narrow net. Splitting a
    # unit (λ ∉ {0, 1}) gives a line of critical points (trading a_i between the copies), whose
    # direction is null; the d_in + 1 "separating" directions (w_i + (1−λ)ε, w_copy − λε) now
    # have curvature λ(1−λ)a_i/N · εᵀ[Σ_j r_j tanh''(w_i·u_j + b_i) ũ_j ũ_jᵀ]ε, generically
    # non-zero (Fukumizu & Amari 2000): one null direction per split unit.
    problem, small, big = duplicated["noisy"]
    assert bool(om.is_equilibrium(problem, small)) and bool(om.is_equilibrium(problem, big))
    assert problem.cost(small) > 1e-3  # a genuine residual
    assert om.critical_dimension(problem, small) == 0
    assert om.critical_dimension(problem, big) == num_split == 2
    assert om.critical_dimension(problem, big, method="lanczos") == 2
    # The hand count, checked directly: the split-line direction is a null vector of the Hessian.
    f, unravel = ravel_pytree(big)
    hessian = jax.hessian(lambda z: problem.cost(unravel(z)))(f)
    a0 = small["w2"][0, 0]
    line = {k: jnp.zeros_like(v) for k, v in big.items()}
    line["w2"] = line["w2"].at[0, 0].set(a0).at[3, 0].set(-a0)  # a_0 ↔ a_copy
    direction = ravel_pytree(line)[0]
    assert jnp.linalg.norm(hessian @ direction) <= 1e-12 * jnp.linalg.norm(hessian)


def test_global_minima_of_overparametrised_fit_have_dimension_k_minus_qn(overparam):
    problem, params = overparam
    minimum = levenberg_marquardt(problem, params)
    assert problem.cost(minimum) < 1e-26
    assert not bool(om.is_equilibrium(problem, params))
    assert bool(om.is_equilibrium(problem, minimum))
    num_params, num_rows = om.num_parameters(params), problem.num_samples * problem.output_dim
    assert om.numerical_rank(problem, minimum) == num_rows
    assert om.critical_dimension(problem, minimum) == num_params - num_rows == 386
    assert om.critical_dimension(problem, minimum, method="lanczos") == 386


def test_critical_dimension_warns_away_from_critical_points_and_rejects_bad_input(overparam):
    problem, params = overparam
    with pytest.warns(RuntimeWarning, match="not an equilibrium"):
        om.critical_dimension(problem, params)
    with pytest.raises(ValueError, match="method='eig' is not known"):
        om.critical_dimension(problem, params, method="eig", check=False)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        om.critical_dimension(problem, params, tol=-1.0)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        om.is_equilibrium(problem, params, tol=float("nan"))


@ADAPTED_PATH_GROUP
def test_geometry_functions_name_their_bad_arguments(overparam, adapted_path):
    problem, params = overparam
    with pytest.raises(TypeError, match="v must be a pytree shaped like params"):
        om.horizontal(problem, params, [1.0, 2.0])
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["params"]["Dense_0"]["bias"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"v leaf .*Dense_0.*bias.* has shape \(3,\)"):
        om.vertical(problem, params, bad)
    with pytest.raises(ValueError, match=r"rtol must be a number in \(0, 1\) or None, got 2.0"):
        om.numerical_rank(problem, params, rtol=2.0)
    with pytest.raises(TypeError, match="problem must be an outmetric.Problem"):
        om.jacobian_spectrum(params, params)
    with pytest.raises(TypeError, match="trajectory must be an outmetric.Trajectory"):
        om.pullback_length(problem, adapted_path.params)
    with pytest.raises(ValueError, match="solver='lu' is not a known solver"):
        om.horizontal(problem, params, params, solver="lu")


# ----------------------------------------------------------------------------- homotopy


def test_homotopy_fields_vanish_at_the_same_points(overparam, duplicated):
    problem_eq, small, _ = duplicated["noisy"]  # underparametrised minimum with residual
    _, _, rank_lost = duplicated["noisy"]  # its split: an equilibrium where rank D is lost
    problem_ne, params_ne = overparam  # a non-equilibrium
    cases = [(problem_eq, small), (problem_eq, rank_lost), (problem_ne, params_ne)]

    @eqx.filter_jit
    def fields(flows, params):  # all α at once: α is an array leaf of the flow
        return jax.lax.map(lambda flow: flat_jax(flow(0.0, params, None)), flows)

    for problem, params in cases:
        standard = flat(om.standard_flow(problem)(0.0, params, None))
        adapted = flat(om.adapted_flow(problem)(0.0, params, None))
        gradient = flat(jax.grad(problem.cost)(params))
        equilibrium = bool(om.is_equilibrium(problem, params))
        flows = [om.homotopy_flow(problem, alpha) for alpha in ALPHAS]
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *flows)
        for alpha, v in zip(ALPHAS, np.asarray(fields(stacked, params))):
            np.testing.assert_allclose(v, (1 - alpha) * standard + alpha * adapted, atol=1e-13)
            if equilibrium:
                assert np.linalg.norm(v) <= 1e-12
            else:  # a descent direction: -⟨∇C, V_α⟩ = (1 − α)‖Dᵀ∇ₓC‖² + α‖P∇ₓC‖² > 0
                assert -gradient @ v > 0.5 * min(gradient @ gradient, -gradient @ adapted)
    assert not bool(om.is_equilibrium(problem_ne, params_ne))
    np.testing.assert_allclose(flat(om.homotopy_flow(problem_ne, 0.0)(0.0, params_ne, None)),
                               -flat(jax.grad(problem_ne.cost)(params_ne)), atol=1e-15)


def test_homotopy_rejects_bad_alpha(overparam):
    problem, _ = overparam
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        om.homotopy_flow(problem, 1.5)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        om.homotopy_flow(problem, "half")
    with pytest.raises(ValueError, match="solver='lu' is not a known solver"):
        om.homotopy_flow(problem, 0.5, solver="lu")


# ----------------------------------------------------------------------------- interpolation


def test_interpolation_flow_reaches_the_targets_at_time_one(overparam):
    problem, params = overparam
    flow = om.interpolation_flow(problem, params)
    traj = om.integrate(problem, params, flow=flow, t1=1.0, ts=jnp.array([0.0, 0.5, 1.0]))
    assert traj.result == "successful"
    np.testing.assert_allclose(traj.ts, [0.0, 0.5, 1.0])
    x = jax.vmap(problem.outputs)(traj.params)
    x0, y = problem.outputs(params), problem.targets
    np.testing.assert_allclose(x[1], 0.5 * (x0 + y), atol=1e-6)
    np.testing.assert_allclose(x[2], y, atol=1e-6)
    assert traj.costs[-1] < 1e-12


def test_interpolation_flow_rejects_bad_target(overparam):
    problem, params = overparam
    with pytest.raises(ValueError, match=r"target must have the outputs' shape \(8, 2\)"):
        om.interpolation_flow(problem, params, target=jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match="target contains NaN"):
        om.interpolation_flow(problem, params, target=jnp.full((8, 2), jnp.nan))
    with pytest.raises(TypeError, match="problem must be an outmetric.Problem"):
        om.interpolation_flow(None, params)


# ----------------------------------------------------------------------------- cross-entropy


@pytest.fixture(scope="session")
def classifier():
    """A tanh MLP with Q = 3 logits on N = 6 samples (K = 145 ≥ QN = 18), one apply function for
    all labelings so the integrations share their compilation."""
    key_model, key_data = jax.random.split(jax.random.PRNGKey(11))
    model = tanh_mlp(key_model, 4, 3, width=8, depth=2)
    inputs = jax.random.normal(key_data, (6, 4))
    return model, inputs


def fibre_minimiser(x0, labels):
    """x_j* = log y_j − mean(log y_j)·1 + (s_j(0)/Q)·1 (DESIGN §2)."""
    log_y = np.log(np.asarray(labels))
    s0 = np.asarray(x0).sum(axis=1, keepdims=True)
    return log_y - log_y.mean(axis=1, keepdims=True) + s0 / labels.shape[1]


@pytest.mark.parametrize("labels", ["vectors", "indices"])
def test_cross_entropy_adapted_flow_converges_to_fibre_minimiser(classifier, labels):
    model, inputs = classifier
    if labels == "vectors":  # positive label vectors summing to one
        targets = jax.nn.softmax(0.7 * jax.random.normal(jax.random.PRNGKey(5), (6, 3)), axis=1)
        problem = om.Problem(model.apply, inputs, targets, loss="cross_entropy")
        expected_labels = np.asarray(targets)
    else:
        classes = jnp.array([0, 2, 1, 1, 0, 2])
        problem = om.Problem(model.apply, inputs, classes, loss="cross_entropy",
                             label_smoothing=0.3)
        expected_labels = 0.7 * np.eye(3)[np.asarray(classes)] + 0.1
    np.testing.assert_allclose(problem.targets, expected_labels, rtol=1e-15)
    assert om.regime(problem, model.params).name == "overparametrised"
    # Linearised at x*, x_j' = -(diag p_j - p_j p_jᵀ)(x_j - x_j*)/N decays at rate ≥ ~min p/N.
    t1 = 40.0 * problem.num_samples / float(expected_labels.min())
    traj = om.integrate(problem, model.params, t1=t1, num_saves=21)
    assert traj.result == "successful"
    x = jax.vmap(problem.outputs)(traj.params)
    sums = np.asarray(x.sum(axis=2))  # s_j along the flow
    np.testing.assert_allclose(sums, np.broadcast_to(sums[0], sums.shape), atol=1e-10)
    assert np.all(np.diff(np.asarray(traj.costs)) <= 1e-14)
    np.testing.assert_allclose(x[-1], fibre_minimiser(x[0], expected_labels), atol=1e-8)


def test_cross_entropy_interpolation_flow_aims_at_the_fibre_minimiser(classifier):
    model, inputs = classifier
    targets = jax.nn.softmax(0.7 * jax.random.normal(jax.random.PRNGKey(5), (6, 3)), axis=1)
    problem = om.Problem(model.apply, inputs, targets, loss="cross_entropy")
    x0 = problem.outputs(model.params)
    flow = om.interpolation_flow(problem, model.params)
    np.testing.assert_allclose(flow.displacement, fibre_minimiser(x0, targets) - x0, atol=1e-13)
    velocity = flow(0.0, model.params, None)  # rank D = QN: the outputs move by x* − x(θ₀)
    np.testing.assert_allclose(problem.jvp(model.params, velocity), flow.displacement, atol=1e-9)
    one_hot = om.Problem(model.apply, inputs, jnp.eye(3)[jnp.arange(6) % 3], loss="cross_entropy")
    with pytest.raises(ValueError, match="needs label vectors with positive entries"):
        om.interpolation_flow(one_hot, model.params)
