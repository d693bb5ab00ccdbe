"""The loss-Hessian weighting of `output_metric_descent` (``loss_hessian``): for a loss other than
L² the step solves (DᵀĤD + λS)δ = Dᵀr with Ĥ = N∇²ₓC, checked against dense references built
here from the closed-form softmax Hessian, on both sides and through every solve path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import MODELS, make_problem
from outmetric import _solve
from outmetric._gram import gram_diagonal
from outmetric._loss import apply_sample_blocks, get_loss, output_hessian_roots


def classifier(n, width, key=1):
    """A tanh MLP 4-width-width-3 on n Gaussian inputs, cross-entropy on labels i mod 3."""
    model = MODELS["tanh_mlp"](jax.random.PRNGKey(key), 4, 3, width=width)
    inputs = jax.random.normal(jax.random.PRNGKey(2), (n, 4))
    problem = om.Problem(model.apply, inputs, jnp.arange(n) % 3, loss="cross_entropy")
    return problem, model.params


def dense_reference(problem, params):
    """(D, Ĥ, r) in float64 numpy: the Jacobian by forward mode, Ĥ block-diagonal with
    ⟨1, y_j⟩(diag p_j − p_jp_jᵀ), and r = N∇ₓC = p⟨1, y⟩ − y."""
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacfwd(lambda f: problem.outputs(unravel(f)).reshape(-1))(flat))
    p = np.asarray(jax.nn.softmax(problem.outputs(params), axis=-1))
    y = np.asarray(problem.targets)
    total = y.sum(axis=1)
    blocks = [t * (np.diag(pj) - np.outer(pj, pj)) for t, pj in zip(total, p)]
    hessian = np.zeros((jac.shape[0],) * 2)
    q = p.shape[1]
    for j, block in enumerate(blocks):
        hessian[j * q:(j + 1) * q, j * q:(j + 1) * q] = block
    residual = (p * total[:, None] - y).reshape(-1)
    return jac, hessian, residual


def test_output_hessian_roots_are_the_softmax_hessian_square_roots():
    problem, params = classifier(12, 4)
    x = problem.outputs(params)
    root, pinv_root = output_hessian_roots(get_loss("cross_entropy"), x, problem.targets)
    p = jax.nn.softmax(x, axis=-1)
    hessian = jax.vmap(lambda pj: jnp.diag(pj) - jnp.outer(pj, pj))(p)
    np.testing.assert_allclose(root @ root, hessian, atol=1e-14)
    # R⁺R is the projector onto 1⊥: the direction along which the cost is constant is dropped.
    v = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    projected = apply_sample_blocks(pinv_root, apply_sample_blocks(root, v.reshape(-1)))
    np.testing.assert_allclose(projected.reshape(x.shape), v - v.mean(axis=1, keepdims=True),
                               atol=1e-12)
    l2_root, l2_pinv = output_hessian_roots(get_loss("l2"), x, problem.targets)
    np.testing.assert_allclose(l2_root, jnp.broadcast_to(jnp.eye(3), l2_root.shape), atol=1e-14)
    np.testing.assert_allclose(l2_pinv, l2_root, atol=1e-14)


@pytest.mark.parametrize("n, width", [(30, 5), (4, 6)], ids=["tall", "wide"])
@pytest.mark.parametrize("solver", ["cholesky", "svd", "eigh", "cg"])
def test_fixed_damping_step_is_the_dense_generalized_gauss_newton_step(n, width, solver):
    problem, params = classifier(n, width)
    jac, hessian, residual = dense_reference(problem, params)
    lam = 1e-2
    opt = om.output_metric_descent(damping=lam, linesearch=None, scaling="identity",
                                   solver=solver, cg_tol=1e-13)
    updates, state = opt.update(None, opt.init(params), params, problem=problem)
    assert om.SOLVERS[int(state.solver)] == solver
    step = -np.asarray(ravel_pytree(updates)[0])
    reference = np.linalg.solve(jac.T @ hessian @ jac + lam * np.eye(jac.shape[1]),
                                jac.T @ residual)
    np.testing.assert_allclose(step, reference, rtol=0, atol=1e-9 * np.abs(reference).max())
    euclidean = np.linalg.solve(jac.T @ jac + lam * np.eye(jac.shape[1]), jac.T @ residual)
    assert np.abs(euclidean - reference).max() > 1e-2 * np.abs(reference).max()


def test_the_wide_structured_gram_is_reweighted_as_the_dense_one():
    problem, params = classifier(4, 6)  # M = 12 < K
    x = problem.outputs(params)
    root, _ = output_hessian_roots(get_loss("cross_entropy"), x, problem.targets)
    dense = _solve.weight_rows(_solve.linearize(problem, params, method="cholesky",
                                                gram="jacobian"), root)
    structured = _solve.weight_rows(_solve.linearize(problem, params, method="cholesky",
                                                     gram="structured"), root)
    assert structured.jacobian is None
    np.testing.assert_allclose(structured.gram, dense.gram, atol=1e-12)
    np.testing.assert_allclose(structured.diagonal(), dense.diagonal(), atol=1e-12)


@pytest.mark.parametrize("wide", [True, False])
def test_weighted_gram_diagonal_in_chunks(wide):
    problem, params = classifier(11, 4)
    jac, hessian, _ = dense_reference(problem, params)
    x = problem.outputs(params)
    root, _ = output_hessian_roots(get_loss("cross_entropy"), x, problem.targets)
    block = np.asarray(jax.scipy.linalg.block_diag(*root))
    weighted = block @ jac
    expected = (weighted**2).sum(axis=1 if wide else 0)
    for chunk in (None, 4):
        got = gram_diagonal(problem, params, wide=wide, chunk_size=chunk, row_root=root)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    if not wide:  # the column norms of RD are those of Ĥ^{1/2}D: diag(DᵀĤD)
        np.testing.assert_allclose(expected, np.diag(jac.T @ hessian @ jac), rtol=1e-10)


def test_l2_steps_are_unchanged():
    problem, params = make_problem("tanh_mlp", n=8, q=2)
    steps = []
    for flag in (None, True, False):
        opt = om.output_metric_descent(loss_hessian=flag)
        updates, _ = opt.update(None, opt.init(params), params, problem=problem)
        steps.append(ravel_pytree(updates)[0])
    np.testing.assert_array_equal(steps[0], steps[1])
    np.testing.assert_array_equal(steps[0], steps[2])


def test_default_reaches_the_cross_entropy_floor_where_the_euclidean_step_crawls():
    """Overparametrised (rank D = QN), the minimum is the labels' entropy (DESIGN §2's fibre
    minimiser). The weighted default gets within 1e-9 of it in ≤ 25 updates; the Euclidean
    step, whose output moves by −(p − y), shrinks the error in a class of probability p by
    only about (1 − p) per update and is still > 1e-4 above it."""
    problem, params = classifier(6, 8)
    y = np.asarray(problem.targets)
    floor = -np.sum(y * np.log(y)) / y.shape[0]
    weighted = om.fit(problem, params, max_steps=25, progress=False)
    euclidean = om.fit(problem, params, om.output_metric_descent(loss_hessian=False),
                       max_steps=25, progress=False)
    assert float(weighted.costs[-1]) - floor < 1e-9
    assert float(euclidean.costs[-1]) - floor > 1e-4


def test_tall_chunked_gram_is_refused_when_asked_and_skipped_by_default():
    problem, params = classifier(30, 5)  # K = 73 < QN = 90
    forced = om.output_metric_descent(solver="cholesky", chunk_size=7, loss_hessian=True)
    with pytest.raises(ValueError, match="loss_hessian=False"):
        forced.update(None, forced.init(params), params, problem=problem)
    default = om.output_metric_descent(solver="cholesky", chunk_size=7)
    plain = om.output_metric_descent(solver="cholesky", chunk_size=7, loss_hessian=False)
    u_default, _ = default.update(None, default.init(params), params, problem=problem)
    u_plain, _ = plain.update(None, plain.init(params), params, problem=problem)
    np.testing.assert_array_equal(ravel_pytree(u_default)[0], ravel_pytree(u_plain)[0])


def test_loss_hessian_must_be_a_flag():
    with pytest.raises(TypeError, match="loss_hessian must be True or False"):
        om.output_metric_descent(loss_hessian="yes")
