"""Reliability, round 2 (issue 14): rank checks that reveal ill-conditioning, huge targets and
overflowing Jacobians, precision of the Jacobian, deterministic solver choice, frozen layers
through optax.masked and multi_transform, and composition with upstream transformations."""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import outmetric as om
from helpers import make_problem


def linear(params, u):
    """x_j = ⟨u_j, θ⟩: the rows of the inputs are the rows of D."""
    return u @ params


def kahan(n, c):
    """Kahan's upper-triangular matrix: its diagonal stays O(s^n) while σ_min/σ_max falls far
    below it, so neither R's diagonal nor Cholesky pivots see the near rank loss."""
    s = np.sqrt(1 - c * c)
    return np.diag(s ** np.arange(n)) @ (np.eye(n) - c * np.triu(np.ones((n, n)), 1))


# ------------------------------------------------------------------- item 7: rank-revealing


@pytest.mark.parametrize("transpose", [False, True], ids=["D=Kahan", "D=Kahan^T"])
def test_qr_sees_the_rank_loss_of_a_kahan_matrix(transpose):
    jac = kahan(60, 0.36255826192852925)  # σ_min/σ_max = 5e-11
    sigma = np.linalg.svd(jac, compute_uv=False)
    assert 4e-11 < sigma[-1] / sigma[0] < 6e-11
    jac = jac.T if transpose else jac
    y = np.random.default_rng(0).standard_normal(60)
    problem = om.Problem(linear, jnp.asarray(jac), jnp.asarray(y)[:, None])
    delta, result, _ = om.output_metric_gradient(problem, jnp.zeros(60), solver="qr", rtol=1e-10)
    expected = np.linalg.pinv(jac, rcond=1e-10) @ (-y / 60)
    assert int(result.rank) == 59
    np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-8, atol=1e-10)


def test_adapted_flow_stands_still_at_an_ill_conditioned_equilibrium():
    """Underparametrised (QN = 80 > K = 60), σ_min/σ_max = 4e-16, at θ with Dᵀ(x − y) = 0:
    the velocity is zero to round-off (it was 8e9 with the unpivoted QR)."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((80, 60)))
    jac = basis @ kahan(60, 0.5207047358726578)
    theta = rng.standard_normal(60)
    normal = rng.standard_normal(80)
    normal -= basis @ (basis.T @ normal)  # orthogonal to range D
    problem = om.Problem(linear, jnp.asarray(jac), jnp.asarray(jac @ theta + normal)[:, None])
    assert om.regime(problem, jnp.asarray(theta)).name == "rank-lost"
    for solver in ("auto", "qr", "svd", "cholesky", "eigh"):
        velocity = om.adapted_flow(problem, solver=solver)(0.0, jnp.asarray(theta))
        assert float(jnp.linalg.norm(velocity)) < 1e-8, solver


def test_cholesky_and_eigh_measure_rank_on_the_singular_value_scale():
    """σ_min/σ_max = 1e-6 with rtol = 1e-4: rank lost on the σ scale (1e-6 < 1e-4), though the
    Gram's μ_min/μ_max = 1e-12 (the σ² scale) — both report it and give the pseudo-inverse."""
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((12, 8)))
    jac = (u * np.array([1, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01, 1e-6])) @ v.T  # M = 8 < K = 12
    y = rng.standard_normal(8)
    problem = om.Problem(linear, jnp.asarray(jac), jnp.asarray(y)[:, None])
    expected = np.linalg.pinv(jac, rcond=1e-4) @ (-y / 8)
    for solver in ("cholesky", "eigh", "qr", "svd"):
        delta, result, _ = om.output_metric_gradient(problem, jnp.zeros(12), solver=solver,
                                                      rtol=1e-4)
        assert int(result.rank) == 7, solver
        np.testing.assert_allclose(np.asarray(delta), expected, rtol=1e-6, atol=1e-9,
                                   err_msg=solver)


# ------------------------------------------------ item 5: huge targets, an overflowing Gram


def test_targets_dwarfing_the_model_end_with_a_warning_not_a_silent_convergence():
    problem, params = make_problem("residual_net")
    huge = om.Problem(problem.apply_fn, problem.inputs, 1e18 * problem.targets)
    with pytest.warns(RuntimeWarning, match=r"did not decrease .* targets are .* times the "
                                            r"model's outputs"):
        result = om.fit(huge, params, max_steps=20, progress=False)
    assert not result.converged
    assert result.status == om.RESULTS.stalled
    assert result.costs[-1] == result.costs[0]


def _sensitive(problem, gain):
    """The same model with parameters scaled by 1/gain: same outputs, D = gain·D."""
    def apply(params, u):
        return problem.apply_fn(jax.tree_util.tree_map(lambda a: gain * a, params), u)
    return apply


@pytest.mark.parametrize("batched", [False, True], ids=["full-batch", "mini-batch"])
def test_a_jacobian_whose_gram_overflows_is_a_named_error(batched):
    problem, params = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
    sensitive = om.Problem(_sensitive(problem, 1e160), problem.inputs, problem.targets)
    small = jax.tree_util.tree_map(lambda a: 1e-160 * a, params)
    batches = [(problem.inputs, problem.targets)] * 3 if batched else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious rank-loss warning
        with pytest.raises(om.NonFiniteError, match=r"finite but its squares overflow float64"
                                                    r".*Rescale the parameters") as info:
            om.fit(sensitive, small, max_steps=5, batches=batches, progress=False)
    assert info.value.result.status == om.RESULTS.overflow
    np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(info.value.result.params)[0],
                                  jax.flatten_util.ravel_pytree(small)[0])


def test_a_cost_that_overflows_from_finite_outputs_is_not_blamed_on_the_model():
    inputs = jnp.eye(3)
    problem = om.Problem(linear, inputs, jnp.ones((3, 1)))
    with pytest.raises(om.NonFiniteError, match=r"outputs stayed finite: the l2 cost overflows "
                                                r"float64") as info:
        om.fit(problem, jnp.zeros(3), optax.sgd(1e160), max_steps=5, progress=False)
    assert "the model or the optimizer produced" not in str(info.value)
    assert np.isfinite(info.value.result.costs).all()
    with pytest.raises(ValueError, match=r"outputs are finite .* the l2 cost overflows"):
        om.fit(problem, jnp.full(3, 1e160), max_steps=5, progress=False)


# ------------------------------------------------- optax: frozen leaves, upstream transforms


def two_block_problem():
    """x = U a + V b: D = [U V], so the step over `a` alone is −U⁺(x − y) by hand."""
    rng = np.random.default_rng(0)
    u, v, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2)), rng.standard_normal(10)

    def model(params, inputs):
        a, b = inputs
        return a @ params["a"] + b @ params["b"]

    problem = om.Problem(model, (jnp.asarray(u), jnp.asarray(v)), jnp.asarray(y))
    params = {"a": jnp.asarray(rng.standard_normal(3)), "b": jnp.asarray(rng.standard_normal(2))}
    return problem, params, u, v, y


@pytest.mark.parametrize("make", [
    lambda: om.output_metric_descent(damping=0.0, linesearch=None, solver="svd"),
    lambda: optax.chain(om.scale_by_output_metric(), optax.scale(-1.0)),
], ids=["output_metric_descent", "scale_by_output_metric"])
def test_optax_masked_solves_over_the_trained_leaves_only(make):
    problem, params, u, v, y = two_block_problem()
    opt = optax.masked(make(), {"a": True, "b": False})
    state = opt.init(params)
    grads = jax.grad(problem.cost)(params)
    updates, _ = opt.update(grads, state, params, problem=problem, full_params=params)
    residual = u @ np.asarray(params["a"]) + v @ np.asarray(params["b"]) - y
    np.testing.assert_allclose(updates["a"], -np.linalg.pinv(u) @ residual, rtol=1e-10)
    np.testing.assert_array_equal(updates["b"], grads["b"])  # optax.masked passes them through
    with pytest.raises(ValueError, match=r"frozen leaves \(optax.MaskedNode.*full_params=params"):
        opt.update(grads, state, params, problem=problem)


def test_multi_transform_freezes_a_layer_in_fit():
    problem, params, u, v, y = two_block_problem()
    opt = optax.multi_transform({"train": om.output_metric_descent(),
                                 "freeze": optax.set_to_zero()}, {"a": "train", "b": "freeze"})
    result = om.fit(problem, params, opt, max_steps=20, progress=False)
    assert result.converged
    np.testing.assert_array_equal(result.params["b"], params["b"])
    best, *_ = np.linalg.lstsq(u, y - v @ np.asarray(params["b"]), rcond=None)
    np.testing.assert_allclose(result.params["a"], best, rtol=1e-8)


def test_transformations_chained_before_the_descent_are_reported():
    problem, params, *_ = two_block_problem()
    before = optax.chain(optax.clip_by_global_norm(1.0), om.output_metric_descent())
    with pytest.warns(UserWarning, match=r"chains transformations before output_metric_descent"
                                         r".*discards the updates it receives"):
        om.fit(problem, params, before, max_steps=2, progress=False)
    after = optax.chain(om.output_metric_descent(), optax.clip_by_global_norm(1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = om.fit(problem, params, after, max_steps=1, progress=False)
    step = jax.flatten_util.ravel_pytree(result.params)[0] - jax.flatten_util.ravel_pytree(params)[0]
    assert float(jnp.linalg.norm(step)) <= 1e-3 * (1 + 1e-9)  # the clip acts on the step


# ---------------------------------------- item 8: the parameters' precision, a stable "auto"


@pytest.mark.parametrize("method, gram", [("qr", "jacobian"), ("cholesky", "jacobian"),
                                          ("cholesky", "structured"), ("svd", "jacobian"),
                                          ("eigh", "jacobian")])
def test_float32_params_on_float64_data_build_jacobian_and_gram_in_float32(method, gram):
    from outmetric._solve import linearize

    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8, depth=1)
    assert problem.inputs.dtype == problem.targets.dtype == jnp.float64
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    lin = linearize(problem, params32, method=method, gram=gram)
    assert lin.outputs.dtype == jnp.float32
    for matrix in (lin.jacobian, lin.gram):
        assert matrix is None or matrix.dtype == jnp.float32
    # Nothing but the conversion of the data computes in float64.
    def matrices(p):
        lin = linearize(problem, p, method=method, gram=gram)
        return tuple(m for m in (lin.outputs, lin.jacobian, lin.gram) if m is not None)

    jaxpr = str(jax.make_jaxpr(matrices)(params32))
    assert jaxpr.count("f64[") <= 1, jaxpr.count("f64[")


def test_auto_plans_from_the_device_memory_not_what_is_free_now():
    """The budget (and so the solver "auto" picks) does not move when memory is taken, so a
    resumed run compiles the same plan."""
    before = om.memory_budget()
    ballast = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    ballast[::512] = 2.0
    assert om.memory_budget() == before
    del ballast


# ---------------------------------------------------------------- one validation, one API


def test_the_public_api_is_declared_once():
    import ast
    import os

    source = open(os.path.join(os.path.dirname(om.__file__), "__init__.py")).read()
    exported = [alias.asname for node in ast.parse(source).body
                if isinstance(node, ast.ImportFrom) and node.level == 1
                for alias in node.names]
    assert sorted(om.__all__) == sorted(exported + ["__version__"])
    assert len(set(om.__all__)) == len(om.__all__)
    assert {n for n in dir(om) if not n.startswith("_")} <= set(om.__all__)


def test_argument_checks_live_in_one_module():
    """No module but `_validation` defines the Problem check or an rtol check of its own."""
    import os
    import re

    folder = os.path.dirname(om.__file__)
    for name in os.listdir(folder):
        if not name.endswith(".py") or name == "_validation.py":
            continue
        source = open(os.path.join(folder, name)).read()
        assert "isinstance(problem, Problem)" not in source, name
        assert not re.search(r"def _check_rtol\b", source), name


# ------------------------------------------- item 2: a folder that cannot take the checkpoint

_FILE_SIZE_LIMIT = """
import resource, sys, time
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_enable_x64", True)
import optax
import outmetric as om
from helpers import make_problem
problem, params = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
calls = []
start = time.time()
try:
    om.fit(problem, params, optax.sgd(1e-3), max_steps=50, progress=False,
           checkpoint_dir={folder!r}, callback=lambda *a: calls.append(1))
except om.CheckpointError as err:
    print("REFUSED", len(calls), err)
else:
    print("RAN", len(calls))
"""


def test_a_checkpoint_folder_that_cannot_take_the_checkpoint_is_refused_before_training(
        tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    script = _FILE_SIZE_LIMIT.format(tests=os.path.dirname(__file__), folder=str(folder))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.startswith("REFUSED 0 "), out.stdout + out.stderr
    assert "cannot hold the checkpoint" in out.stdout and "nothing was run" in out.stdout
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_a_final_checkpoint_that_cannot_be_written_still_hands_back_the_run(tmp_path,
                                                                              monkeypatch):
    import errno

    from outmetric import _fit

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_fit, "save_checkpoint", disk_full)
    problem, params = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
    with pytest.raises(om.CheckpointError, match=r"final checkpoint could not be written .*No "
                                                 r"space left.*error.result") as info:
        om.fit(problem, params, optax.sgd(1e-3), max_steps=5, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=1000)
    result = info.value.result
    assert result.num_steps == 5 and result.status == om.RESULTS.max_steps_reached
