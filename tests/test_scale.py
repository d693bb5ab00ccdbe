"""Scale (issue #4): matrix-free, chunked and structured solves against dense float64 references.

Every check compares with a dense reference built from the materialised Jacobian D:
the structured Gram with D·Dᵀ (to 1e-10), chunked Gram tiles and Jacobians with their unchunked
values, and each solver's step with D⁺g or Dᵀ(DDᵀ + λI)⁻¹g (to 1e-8). The 8-device checks are in
test_sharding.py; the benchmarks run here only as a `--quick` smoke run.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import outmetric as om
from helpers import MODELS, make_problem
from outmetric import _gram, _solve, _transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_error(actual, desired):
    actual, desired = np.asarray(actual), np.asarray(desired)
    return float(np.linalg.norm(actual - desired) / np.linalg.norm(desired))


def mlp_problem(n=7, sizes=(5, 9, 3), batched=False, seed=0):
    apply, params = om.mlp(jax.random.PRNGKey(seed), list(sizes))
    ku, ky = jax.random.split(jax.random.PRNGKey(seed + 1))
    inputs = jax.random.normal(ku, (n, sizes[0]))
    targets = jax.random.normal(ky, (n, sizes[-1]))
    if batched:
        batch_apply = jax.vmap(apply, in_axes=(None, 0))
        return om.Problem(batch_apply, inputs, targets, batched=True), params
    return om.Problem(apply, inputs, targets), params


# ------------------------------------------------------------------------- structured Gram

#: Parameters the structured Gram must cover per registry model (the rest goes through D_r).
COVERED = {"tanh_mlp": 1.0, "gelu_softplus_mlp": 1.0, "residual_net": 1.0, "equinox_mlp": 1.0,
           "conv_net": 39 / 55}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_gram_equals_jjt_on_registry(name):
    problem, params = make_problem(name, n=7, q=3)
    jac = problem.jacobian(params)
    structure = om.gram_structure(problem, params)
    assert structure.num_structured == pytest.approx(COVERED[name] * structure.num_params)
    x, gram = jax.jit(om.structured_gram, static_argnames="chunk_size")(problem, params)
    assert relative_error(gram, jac @ jac.T) <= 1e-10
    np.testing.assert_allclose(x, problem.outputs(params), atol=1e-14)


@pytest.mark.parametrize("batched", [False, True])
def test_structured_gram_of_reference_mlp_in_chunks(batched):
    problem, params = mlp_problem(batched=batched)
    structure = om.gram_structure(problem, params)
    assert len(structure.layers) == 2 and structure.num_structured == structure.num_params
    jac = problem.jacobian(params)
    _, gram = om.structured_gram(problem, params, chunk_size=3)  # 7 samples: padded chunks
    assert relative_error(gram, jac @ jac.T) <= 1e-10
    assert relative_error(om.gram_matrix(problem, params), jac @ jac.T) <= 1e-10


def test_shared_weight_is_not_taken_for_a_dense_layer():
    # W used twice: ∂x/∂W is a sum of two outer products, so it must go through its Jacobian.
    def apply(p, u):
        h = jnp.tanh(u @ p["w"] + p["b"])
        return (h @ p["w"].T)[:2] + p["c"]

    ku, kw = jax.random.split(jax.random.PRNGKey(3))
    params = {"w": jax.random.normal(kw, (4, 4)), "b": jnp.ones(4), "c": jnp.zeros(2)}
    problem = om.Problem(apply, jax.random.normal(ku, (5, 4)), jnp.zeros((5, 2)))
    structure = om.gram_structure(problem, params)
    assert structure.num_structured == 0
    jac = problem.jacobian(params)
    assert relative_error(om.structured_gram(problem, params)[1], jac @ jac.T) <= 1e-10


# ------------------------------------------------------------------------- chunked Jacobian and Gram


def test_chunked_jacobian_and_gram_tiles():
    chunk_size = 3  # 7 samples: 3 strided chunks of 3, two of them padded
    problem, params = make_problem("conv_net", n=7, q=2)
    x, jac = problem.linearize(params)
    x_c, jac_c = problem.linearize(params, chunk_size=chunk_size)
    np.testing.assert_allclose(jac_c, jac, atol=1e-14)
    np.testing.assert_allclose(x_c, x, atol=1e-14)
    wide = _gram.jacobian_gram(problem, params, chunk_size=chunk_size)
    tall = _gram.jacobian_gram(problem, params, wide=False, chunk_size=chunk_size)
    assert relative_error(wide, jac @ jac.T) <= 1e-12
    assert relative_error(tall, jac.T @ jac) <= 1e-12
    diag = _gram.gram_diagonal(problem, params, chunk_size=chunk_size)
    np.testing.assert_allclose(diag, jnp.sum(jac**2, axis=1), rtol=1e-12)
    col = _gram.gram_diagonal(problem, params, wide=False, chunk_size=chunk_size)
    np.testing.assert_allclose(col, jnp.sum(jac**2, axis=0), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- steps against dense

#: (solver, scale options): every mode that must reproduce the dense step.
MODES = [
    ("cholesky", {"gram": "structured"}),
    ("cholesky", {"chunk_size": 4}),
    ("qr", {"chunk_size": 4}),
    ("cg", {}),
    ("cg", {"preconditioner": "jacobi"}),
    ("cg", {"preconditioner": "nystrom", "preconditioner_rank": 6}),
    ("lsmr", {}),
]


def all_steps(problem, params, dampings, modes):
    """Every (damping, mode) step from one jitted function: one compilation per problem."""

    cases = [(damping, solver, options) for damping in dampings for solver, options in modes]

    @jax.jit
    def steps(params, problem):
        out = []
        for damping, solver, options in cases:
            opt = om.scale_by_output_metric(damping=damping, solver=solver, cg_tol=1e-13,
                                            **options)
            direction, state = opt.update(None, opt.init(params), params, problem=problem)
            out.append((ravel_pytree(direction)[0], state))
        return out

    return [case + result for case, result in zip(cases, steps(params, problem))]


def dense_step(problem, params, damping):
    jac = problem.jacobian(params)
    residual = (problem.outputs(params) - problem.targets).reshape(-1)
    if damping == 0:
        return np.linalg.pinv(np.asarray(jac)) @ np.asarray(residual)
    if jac.shape[0] <= jac.shape[1]:
        return jac.T @ jnp.linalg.solve(jac @ jac.T + damping * jnp.eye(jac.shape[0]), residual)
    return jnp.linalg.solve(jac.T @ jac + damping * jnp.eye(jac.shape[1]), jac.T @ residual)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_mode_matches_the_dense_step_on_the_wide_side(name):
    modes = MODES
    problem, params = make_problem(name, n=6, q=2)
    references = {d: dense_step(problem, params, d) for d in (1e-3, 0.0)}
    for damping, solver, options, step, state in all_steps(problem, params, (1e-3, 0.0), modes):
        assert relative_error(step, references[damping]) <= 1e-8, (solver, options, damping)
        assert bool(state.converged) and om.SOLVERS[int(state.solver)] == solver


def test_every_mode_matches_the_dense_step_on_the_tall_side():
    problem, params = make_problem("tanh_mlp", n=30, q=2, width=4, depth=1)
    assert om.num_parameters(params) < 60
    references = {d: dense_step(problem, params, d) for d in (1e-3, 0.0)}
    for damping, solver, options, step, _ in all_steps(problem, params, (1e-3, 0.0), MODES):
        assert relative_error(step, references[damping]) <= 1e-8, (solver, options, damping)


def test_rank_loss_without_a_dense_jacobian_falls_back_to_the_gram_eigendecomposition():
    # Two repeated samples: DDᵀ is singular, the structured Cholesky must detect it and
    # return the pseudo-inverse step, D never being formed.
    problem, params = make_problem("tanh_mlp", n=6, q=2)
    inputs = problem.inputs.at[5].set(problem.inputs[0])
    problem = problem.with_data(inputs, problem.targets)
    lin = _solve.linearize(problem, params, method="cholesky", gram="structured")
    assert lin.jacobian is None and lin.gram is not None
    residual = (lin.outputs - problem.targets).reshape(-1)
    result = _solve.solve(lin, residual, damping=0.0, solver="cholesky")
    assert bool(result.fallback) and int(result.rank) == 10
    assert relative_error(result.delta, dense_step(problem, params, 0.0)) <= 1e-6


def test_levenberg_marquardt_update_is_the_same_with_a_structured_or_chunked_gram():
    # The adaptive λ starts from the Gram's trace, so these three take identical steps.
    problem, params = make_problem("residual_net", n=8, q=2)

    @jax.jit
    def updates(params, problem):
        out = []
        for options in ({"gram": "jacobian"}, {"gram": "structured"}, {"chunk_size": 3}):
            opt = om.output_metric_descent(**options)
            step, state = opt.update(None, opt.init(params), params, problem=problem)
            out.append((ravel_pytree(step)[0], state))
        return out

    (reference, state0), *others = updates(params, problem)
    for step, state in others:
        assert relative_error(step, reference) <= 1e-8
        np.testing.assert_allclose(state.damping, state0.damping, rtol=1e-8)
        assert om.SOLVERS[int(state.solver)] == "cholesky"


def test_jitted_matrix_free_update_does_not_recompile_and_descends():
    problem, params = make_problem("tanh_mlp", n=8)
    other, _ = make_problem("tanh_mlp", n=8, seed=5)
    other = problem.with_data(other.inputs, other.targets)
    opt = om.output_metric_descent(solver="cg", preconditioner="nystrom", preconditioner_rank=4)
    update = jax.jit(opt.update)
    updates, state = update(None, opt.init(params), params, problem=problem)
    new_params = optax.apply_updates(params, updates)
    # One solve per update: the direction is taken whole or backtracked (α = 1/2, …).
    assert problem.cost(new_params) < problem.cost(params) and float(state.step_size) > 0
    update(None, state, new_params, problem=other)
    assert update._cache_size() == 1


# ------------------------------------------------------------------------- "auto"


def test_auto_plans_from_sizes_and_memory_and_reports_the_pick(caplog):
    problem, params = make_problem("tanh_mlp", n=8, q=2)  # M = 16, K = 402
    itemsize, rows, k = 8, 16, om.num_parameters(params)
    gram_bytes, dense_bytes = rows * rows * itemsize, rows * k * itemsize
    big = 2**40
    assert om.plan_solve(problem, params, damping=0, memory_budget=big).method == "qr"
    plan = om.plan_solve(problem, params, damping=1.0, memory_budget=big)
    assert (plan.method, plan.gram, plan.chunk_size) == ("cholesky", "jacobian", None)
    # D does not fit, the structured Gram does:
    plan = om.plan_solve(problem, params, damping=1.0, memory_budget=3 * gram_bytes)
    assert (plan.method, plan.gram) == ("cholesky", "structured")
    # ... and without structure: a chunked Gram of chunks that fit beside it.
    per_sample = 2 * 2 * k * itemsize
    budget = 3 * gram_bytes + 3 * per_sample
    assert budget < 2 * dense_bytes + 3 * gram_bytes
    plan = om.plan_solve(problem, params, damping=1.0, gram="jacobian", memory_budget=budget)
    assert (plan.method, plan.gram, plan.chunk_size) == ("cholesky", "jacobian", 3)
    assert om.plan_solve(problem, params, damping=1.0, memory_budget=100).method == "cg"
    assert om.plan_solve(problem, params, damping=0, memory_budget=100).method == "lsmr"
    # The optimizer state says what "auto" picked, and so does the log.
    opt = om.output_metric_descent(memory_budget=100, cg_tol=1e-12)
    with caplog.at_level(logging.INFO, logger="outmetric"):
        updates, state = opt.update(None, opt.init(params), params, problem=problem)
    assert om.SOLVERS[int(state.solver)] == "cg"
    assert "picked 'cg'" in caplog.text
    assert problem.cost(optax.apply_updates(params, updates)) < problem.cost(params)


def test_the_plan_names_the_memory_it_budgets():
    problem, params = make_problem("tanh_mlp", n=8, q=2)  # M = 16, K = 402
    k, b = om.num_parameters(params), 8
    plan = om.plan_solve(problem, params, damping=1.0, gram="jacobian", memory_budget=2**40)
    assert plan.method == "cholesky" and plan.gram == "jacobian"
    planned = _solve.estimate_memory_bytes(plan, 16, k, b, 8)
    assert planned == 2 * 16 * k * b + 3 * 16 * 16 * b
    assert f"needs about {_solve._bytes(planned)}" in plan.reason
    structured = om.SolvePlan("cholesky", None, "structured", "")
    assert _solve.estimate_memory_bytes(structured, 16, k, b, 8) == 3 * 16 * 16 * b
    assert _solve.estimate_memory_bytes(om.SolvePlan("cg", None, "jacobian", ""), 16, k, b) == 0


def test_auto_picks_the_kept_sketch_where_one_cholesky_costs_more_than_its_products():
    """The optimizer's "auto" on the wide side: matrix-free CG (with the kept Nyström sketch)
    once M³/3 > MATRIX_FREE_PRODUCTS · 8NK, the structured Cholesky below; the memory it names
    is `sketch_bytes` of the rank `sketch_rank` gives; the tall side and single solves are not
    affected. Sizes only: nothing is computed."""
    def plan(m, k, q=10, many=True, budget=12 * 2**30):
        return _solve._auto_plan(1.0, m, k, 8, budget, structured=True, num_samples=m // q,
                                 output_dim=q, chunkable=True, chunk_size=None,
                                 many_dampings=many)
    digits = plan(17970, 71935)  # 1.9e12 flops against 1000 products of 1.0e9
    assert digits.method == "cg"
    rank = _solve.sketch_rank(71935, 8, 12 * 2**30)
    assert 0 < rank <= _solve.SKETCH_RANK and rank * 71935 * 8 <= 12 * 2**30 / 32
    assert _solve._bytes(_solve.sketch_bytes(rank, 17970, 71935, 8)) in digits.reason
    assert _solve.estimate_memory_bytes(digits, 17970, 71935, 8, 1797, sketch=rank) == (
        _solve.sketch_bytes(rank, 17970, 71935, 8))
    assert plan(4000, 16060).method == "cholesky"  # 2.1e10 against 1000 × 5.1e7
    assert plan(17970, 71935, many=False).method == "cholesky"  # one solve: no sketch to keep
    assert plan(4096, 1035001, q=1).method == "cholesky"  # the 1M-parameter step: products cost
    assert _solve.sketch_rank(9, 8) == 0  # small models keep no sketch


def test_auto_picks_the_parameter_side_cg_where_the_dense_tall_route_costs_more():
    """The optimizer's "auto" on the tall side: matrix-free CG on the K side (column-scaled,
    column norms in chunks) once forming DᵀD and its Cholesky, MK² + K³/3 flops, cost more than
    MATRIX_FREE_PRODUCTS · 8NK; the SVD or the dense Cholesky below. Digits cross-entropy
    (issue #15): QN = 13,470, K = 9,610, 1.5e12 flops against 1000 × 1.0e8. Sizes only."""
    budget = 12 * 2**30

    def plan(m, k, q=10, many=True, b=8):
        return _solve._auto_plan(1.0, m, k, b, budget, structured=True, num_samples=m // q,
                                 output_dim=q, chunkable=True, chunk_size=None,
                                 many_dampings=many)
    for b in (8, 4):
        digits = plan(13470, 9610, b=b)
        assert digits.method == "cg" and "parameter side" in digits.reason
        chunk = digits.chunk_size
        assert 1 <= chunk < 1347 and chunk * 10 * 9610 * b <= _solve.COLUMN_CHUNK_BYTES
        rank = _solve.sketch_rank(9610, b, budget)
        planned = _solve.estimate_memory_bytes(digits, 13470, 9610, b, 1347, sketch=rank)
        # The chunk of per-sample Jacobians and their squares, and the kept sketch of DᵀD (K×ℓ
        # in the state and the loop, four K×ℓ arrays while sketching).
        assert planned == 2 * chunk * 10 * 9610 * b + 6 * rank * 9610 * b
        assert f"about {_solve._bytes(planned)}" in digits.reason
    assert plan(13470, 9610, many=False).method == "cholesky"  # a single solve: dense
    assert plan(3000, 1810).method == "svd"  # small K: one SVD serves every λ
    assert plan(20000, 4000, q=1).method == "cholesky"  # 3.4e11 flops against 1000 × 6.4e8


@pytest.mark.parametrize("loss_hessian, initial_damping", [(None, 1.0), (False, 0.1)],
                         ids=["weighted", "explicit"])
def test_the_tall_matrix_free_step_agrees_with_the_dense_damped_step(monkeypatch, loss_hessian,
                                                                     initial_damping):
    """What "auto" picks on the tall side at digits size (the K-side CG: on the loss-Hessian
    weighted D̂ with isotropic damping by default, with column scaling for the explicit step),
    forced at a small size, takes the dense (Cholesky) step of the same update: the same λ,
    the same damping scale, and a direction equal within the CG tolerance."""
    model = MODELS["tanh_mlp"](jax.random.PRNGKey(1), 4, 3, width=5)  # K = 73 < QN = 90
    inputs = jax.random.normal(jax.random.PRNGKey(2), (30, 4))
    problem = om.Problem(model.apply, inputs, jnp.arange(30) % 3, loss="cross_entropy")
    params = model.params
    monkeypatch.setattr(_solve, "MATRIX_FREE_PRODUCTS", 0)
    monkeypatch.setattr(_solve, "SPECTRAL_MAX_PARAMS", 0)
    # λ's unit, ‖D̂‖_F²/K, is a one-probe Hutchinson estimate on the matrix-free path (below);
    # here the exact one, so that both paths solve at the same λ.
    exact = _transform._mean_gram_diagonal
    monkeypatch.setattr(_transform, "_mean_gram_diagonal", lambda lin, _: exact(lin, True))
    assert om.plan_solve(problem, params, damping=1.0, many_dampings=True).method == "cg"
    # λ₀ large enough that both accept their first trial (the rules differ after a rejection).
    free = om.output_metric_descent(initial_damping=initial_damping, cg_tol=1e-10,
                                    loss_hessian=loss_hessian)
    dense = om.output_metric_descent(initial_damping=initial_damping, solver="cholesky",
                                     loss_hessian=loss_hessian)
    u_free, s_free = free.update(None, free.init(params), params, problem=problem)
    u_dense, s_dense = dense.update(None, dense.init(params), params, problem=problem)
    assert om.SOLVERS[int(s_free.solver)] == "cg" and bool(s_free.solve_converged)
    assert float(s_free.step_size) == float(s_dense.step_size) == 1.0
    np.testing.assert_allclose(s_free.damping, s_dense.damping, rtol=1e-10)
    np.testing.assert_allclose(s_free.scale, s_dense.scale, rtol=1e-10)
    flat_free, flat_dense = ravel_pytree(u_free)[0], ravel_pytree(u_dense)[0]
    np.testing.assert_allclose(flat_free, flat_dense, rtol=0, atol=1e-8 * jnp.abs(flat_dense).max())
    assert problem.cost(optax.apply_updates(params, u_free)) < problem.cost(params)


def test_the_matrix_free_damping_unit_estimates_the_frobenius_norm():
    """Without D, its Gram or its column norms at hand, λ's unit ‖D‖_F²/min(QN, K) comes from
    one Rademacher probe, ‖Dᵀz‖²: unbiased, and within a factor of 2 of the exact value here,
    where the exact one would cost a pass of per-sample Jacobians."""
    model = MODELS["tanh_mlp"](jax.random.PRNGKey(1), 4, 3, width=5)
    problem = om.Problem(model.apply, jax.random.normal(jax.random.PRNGKey(2), (30, 4)),
                         jnp.arange(30) % 3, loss="cross_entropy")
    lin = _solve.linearize(problem, model.params, method="cg")
    assert lin.jacobian is None and lin.gram is None
    dense = problem.jacobian(model.params).reshape(-1, lin.shape[1])
    exact = float(jnp.sum(dense**2)) / min(lin.shape)
    estimate = float(_transform._mean_gram_diagonal(lin, False))
    assert estimate != exact and 0.5 * exact < estimate < 2 * exact
    columns = lin._replace(column_diagonal=lambda: jnp.sum(dense**2, axis=0))
    np.testing.assert_allclose(_transform._mean_gram_diagonal(columns, True), exact, rtol=1e-12)


def test_a_step_that_will_take_long_is_logged(caplog, monkeypatch):
    problem, params = make_problem("tanh_mlp", n=8, q=2)  # M = 16, K = 402
    flops = _solve.estimate_step_flops("cholesky", 16, 402, 8)
    assert flops == 4.0 * 16 * 402 + 2.0 * 16 * 16 * 402 + 16**3 / 3
    assert _solve.estimate_step_flops("cg", 16, 402, 8) == 50 * 8.0 * 8 * 402
    with caplog.at_level(logging.WARNING, logger="outmetric"):
        om.plan_solve(problem, params, damping=1.0)
    assert "will take about" not in caplog.text
    monkeypatch.setattr(_solve, "SLOW_STEP_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="outmetric"):
        om.plan_solve(problem, params, damping=1.0, solver="cg")
    assert "one step with solver 'cg'" in caplog.text and "M=16, K=402" in caplog.text


# ------------------------------------------------------------------------- bad input


def test_bad_scale_arguments_are_named():
    problem, params = make_problem("tanh_mlp")
    with pytest.raises(ValueError, match="chunk_size"):
        problem.linearize(params, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        om.output_metric_descent(chunk_size=2.5)
    with pytest.raises(ValueError, match="gram='fast'"):
        om.scale_by_output_metric(gram="fast")
    with pytest.raises(ValueError, match="preconditioner='ilu'"):
        om.output_metric_descent(solver="cg", preconditioner="ilu")
    with pytest.raises(ValueError, match="applies to solver='cg'"):
        om.scale_by_output_metric(solver="qr", preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner_rank"):
        om.scale_by_output_metric(solver="cg", preconditioner="nystrom", preconditioner_rank=0)
    with pytest.raises(ValueError, match="memory_budget"):
        om.plan_solve(problem, params, memory_budget=-1)
    with pytest.raises(ValueError, match="method='fast'"):
        om.gram_matrix(problem, params, method="fast")
    with pytest.raises(TypeError, match="problem must be"):
        om.structured_gram(None, params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match="axis='model'"):
        om.shard_samples(problem, mesh, axis="model")
    with pytest.raises(TypeError, match="mesh must be"):
        om.shard_samples(problem, "data")


# ------------------------------------------------------------------------- benchmark smoke runs


@pytest.mark.parametrize("script", ["scale_solvers.py", "scale_gram.py"])
def test_benchmark_quick_smoke_run(script, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert data["machine"]["jax"] == jax.__version__
    assert data["results"] and all("error" not in r for r in data["results"])
