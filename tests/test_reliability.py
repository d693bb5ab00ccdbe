"""Reliability: named errors for bad input on every entry point, rank loss and ill-conditioning in
float32 and float64, non-finite values during training, checkpoints, resume and interrupts."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import outmetric as om
from helpers import make_problem, tanh_mlp
from outmetric._cli import main as cli_main

# ------------------------------------------------------------------------ the bad-input table

PROBLEM, PARAMS = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
APPLY = tanh_mlp(jax.random.PRNGKey(0), 5, 2, width=4, depth=1).apply
X, Y = PROBLEM.inputs, PROBLEM.targets


class CLIError(Exception):
    """The CLI exited with an error; the message is what it printed to stderr."""


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    if code:
        raise CLIError(err.getvalue())


def nan_like(tree):
    return jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), tree)


def wrong_shape_apply(params, u):
    return jnp.concatenate([APPLY(params, u), jnp.zeros(1)])  # Q + 1 outputs


def inf_apply(params, u):
    return APPLY(params, u) + jnp.inf


def fit(*args, **kwargs):
    return om.fit(*args, progress=False, **kwargs)


def write_file(tmp, name, data=b"not a checkpoint"):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def saved_other_tree(tmp):
    path = om.save_checkpoint(os.path.join(tmp, "c.npz"), {"v": jnp.ones(3)}, (), 0)
    return om.load_checkpoint(path, PARAMS, ())


opt = om.output_metric_descent()
P, S = PROBLEM, PARAMS

#: (description, call(tmp), exception type, regex that names the offending argument)
BAD_INPUTS = [
    ("Problem: mismatched sample counts", lambda t: om.Problem(APPLY, X[:3], Y), ValueError,
     r"inputs and targets have different numbers of samples"),
    ("Problem: empty data", lambda t: om.Problem(APPLY, X[:0], Y[:0]), ValueError,
     r"targets is empty"),
    ("Problem: empty inputs", lambda t: om.Problem(APPLY, {}, Y), ValueError, r"inputs is empty"),
    ("Problem: NaN in inputs", lambda t: om.Problem(APPLY, X.at[0, 0].set(jnp.nan), Y),
     ValueError, r"inputs contains NaN or inf"),
    ("Problem: inf in targets", lambda t: om.Problem(APPLY, X, Y.at[1, 1].set(jnp.inf)),
     ValueError, r"targets contains NaN or inf"),
    ("Problem: unknown loss", lambda t: om.Problem(APPLY, X, Y, loss="hinge"), ValueError,
     r"loss='hinge' is not a known loss"),
    ("Problem: complex targets", lambda t: om.Problem(APPLY, X, Y * 1j), TypeError,
     r"targets must be real"),
    ("Problem: string targets", lambda t: om.Problem(APPLY, X, np.array(["a"] * 4)), TypeError,
     r"targets must be a numeric array"),
    ("Problem: targets of rank 3", lambda t: om.Problem(APPLY, X, Y[:, :, None]), ValueError,
     r"targets must have shape \(N, Q\)"),
    ("Problem: apply_fn not callable", lambda t: om.Problem("mlp", X, Y), TypeError,
     r"apply_fn must be callable"),
    ("Problem: label smoothing 0", lambda t: om.Problem(APPLY, X, jnp.array([0, 1, 0, 1]),
                                                       loss="cross_entropy", label_smoothing=0.0),
     ValueError, r"label_smoothing must lie in \(0, 1\)"),
    ("fit: apply_fn returns the wrong output shape",
     lambda t: fit(om.Problem(wrong_shape_apply, X, Y), S), ValueError,
     r"apply_fn returned shape \(3,\) per sample; expected \(2,\)"),
    ("fit: integer params", lambda t: fit(P, {"w": jnp.ones((2, 2), jnp.int32)}), TypeError,
     r"params leaf \['w'\] has dtype int32"),
    ("fit: complex params", lambda t: fit(P, {"w": jnp.ones(2, jnp.complex64)}), TypeError,
     r"params leaf \['w'\] is complex"),
    ("fit: NaN in initial params", lambda t: fit(P, nan_like(S)), ValueError,
     r"params contains NaN or inf"),
    ("fit: initial params give a non-finite cost", lambda t: fit(om.Problem(inf_apply, X, Y), S),
     ValueError, r"params give a non-finite initial cost"),
    ("fit: non-positive eps", lambda t: fit(P, S, eps=0.0), ValueError, r"eps must be a positive"),
    ("fit: zero max_steps", lambda t: fit(P, S, max_steps=0), ValueError,
     r"max_steps must be a positive integer"),
    ("fit: boolean chunk_size", lambda t: fit(P, S, chunk_size=True), ValueError,
     r"chunk_size must be a positive integer"),
    ("fit: optimizer factory instead of optimizer", lambda t: fit(P, S, optax.adam), TypeError,
     r"optimizer must be an optax GradientTransformation"),
    ("fit: batches that are not pairs", lambda t: fit(P, S, batches=[X]), TypeError,
     r"batches must yield \(inputs, targets\) pairs"),
    ("fit: a batch with NaN inputs", lambda t: fit(P, S, batches=[(X.at[0, 0].set(jnp.nan), Y)]),
     ValueError, r"inputs contains NaN or inf"),
    ("fit: a batch with mismatched sample counts", lambda t: fit(P, S, batches=[(X[:2], Y)]),
     ValueError, r"inputs and targets have different numbers of samples"),
    ("fit: checkpoint_every without checkpoint_dir", lambda t: fit(P, S, checkpoint_every=5),
     ValueError, r"checkpoint_every needs checkpoint_dir"),
    ("fit: zero checkpoint_every", lambda t: fit(P, S, checkpoint_dir=t, checkpoint_every=0),
     ValueError, r"checkpoint_every must be a positive integer"),
    ("fit: checkpoint_dir is a file", lambda t: fit(P, S, checkpoint_dir=write_file(t, "f")),
     ValueError, r"checkpoint_dir .* is not a folder"),
    ("fit: resume not a bool", lambda t: fit(P, S, checkpoint_dir=t, resume="yes"), TypeError,
     r"resume must be True or False"),
    ("fit: learning-rate schedule leaves (0, 1] (traced)",
     lambda t: fit(P, S, om.output_metric_descent(lambda count: 1.5 + 0.0 * count),
                   max_steps=1),
     RuntimeError, r"learning_rate \(schedule\) gave a value outside \(0, 1\]"),
    ("fit: learning-rate schedule leaves (0, 1] (static)",
     lambda t: fit(P, S, om.output_metric_descent(optax.constant_schedule(1.5)), max_steps=1),
     ValueError, r"learning_rate schedule returned 1.5; it must return a number in \(0, 1\]"),
    ("integrate: neither eps nor t1", lambda t: om.integrate(P, S), ValueError,
     r"integrate needs eps .* or t1"),
    ("integrate: non-positive eps", lambda t: om.integrate(P, S, eps=-1e-3), ValueError,
     r"eps must be a positive finite number"),
    ("integrate: boolean eps", lambda t: om.integrate(P, S, eps=True), ValueError,
     r"eps must be a positive finite number"),
    ("integrate: NaN t1", lambda t: om.integrate(P, S, t1=float("nan")), ValueError,
     r"t1 must be a positive finite time"),
    ("integrate: zero num_saves", lambda t: om.integrate(P, S, t1=1.0, num_saves=0), ValueError,
     r"num_saves must be a positive integer"),
    ("integrate: negative rtol", lambda t: om.integrate(P, S, t1=1.0, rtol=-1e-6), ValueError,
     r"rtol must be a positive finite tolerance"),
    ("integrate: NaN in initial params", lambda t: om.integrate(P, nan_like(S), t1=1.0),
     ValueError, r"params contains NaN or inf"),
    ("integrate: unsorted ts", lambda t: om.integrate(P, S, t1=1.0, ts=jnp.array([0.5, 0.1])),
     ValueError, r"ts must be sorted times"),
    ("integrate: flow built for another problem",
     lambda t: om.integrate(P, S, t1=1.0, flow=om.adapted_flow(om.Problem(APPLY, X[:2], Y[:2]))),
     ValueError, r"flow was built for a problem with N=2"),
    ("stopping_time: eps not a number", lambda t: om.stopping_time(1.0, "small", 4), ValueError,
     r"eps must be a real number"),
    ("adapted_flow: unknown solver", lambda t: om.adapted_flow(P, solver="lu"), ValueError,
     r"solver='lu' is not a known solver"),
    ("adapted_flow: negative damping", lambda t: om.adapted_flow(P, damping=-1.0), ValueError,
     r"damping must be >= 0"),
    ("adapted_flow: infinite damping", lambda t: om.adapted_flow(P, damping=float("inf")),
     ValueError, r"damping must be >= 0 and finite"),
    ("adapted_flow: rtol outside (0, 1)", lambda t: om.adapted_flow(P, rtol=2.0), ValueError,
     r"rtol must be a number in \(0, 1\)"),
    ("standard_flow: not a Problem", lambda t: om.standard_flow("problem"), TypeError,
     r"problem must be an outmetric.Problem"),
    ("output_metric_descent: learning rate 0", lambda t: om.output_metric_descent(0.0),
     ValueError, r"learning_rate must lie in \(0, 1\]"),
    ("output_metric_descent: learning rate 1.5", lambda t: om.output_metric_descent(1.5),
     ValueError, r"learning_rate must lie in \(0, 1\]"),
    ("output_metric_descent: unknown solver", lambda t: om.output_metric_descent(solver="lu"),
     ValueError, r"solver='lu' is not a known solver"),
    ("output_metric_descent: unknown damping", lambda t: om.output_metric_descent(damping="lm"),
     ValueError, r"damping must be 'adaptive' or a number"),
    ("output_metric_descent: NaN damping", lambda t: om.output_metric_descent(damping=float("nan")),
     ValueError, r"damping must be >= 0 and finite"),
    ("output_metric_descent: unknown linesearch",
     lambda t: om.output_metric_descent(linesearch="wolfe"), ValueError,
     r"linesearch must be 'backtracking' or None"),
    ("output_metric_descent: zero max_linesearch_steps",
     lambda t: om.output_metric_descent(max_linesearch_steps=0), ValueError,
     r"max_linesearch_steps must be a positive integer"),
    ("scale_by_output_metric: negative damping", lambda t: om.scale_by_output_metric(damping=-1.0),
     ValueError, r"damping must be >= 0"),
    ("scale_by_output_metric: zero cg_tol", lambda t: om.scale_by_output_metric(cg_tol=0.0),
     ValueError, r"cg_tol must be a number"),
    ("optimizer init: integer params", lambda t: opt.init({"w": jnp.ones(3, jnp.int32)}),
     TypeError, r"params leaf \['w'\] has dtype int32"),
    ("optimizer update: no problem extra arg", lambda t: opt.update(None, opt.init(S), S),
     ValueError, r"problem=problem"),
    ("optimizer update: problem of the wrong type",
     lambda t: opt.update(None, opt.init(S), S, problem=(X, Y)), TypeError,
     r"problem must be an outmetric.Problem"),
    ("output_metric_gradient: negative damping",
     lambda t: om.output_metric_gradient(P, S, damping=-1.0), ValueError, r"damping must be >= 0"),
    ("load_checkpoint: a file that is not a checkpoint",
     lambda t: om.load_checkpoint(write_file(t, "x.npz")), om.CheckpointError,
     r"checkpoint .* is not a readable"),
    ("load_checkpoint: another model's checkpoint", saved_other_tree, om.CheckpointError,
     r"holds a different params tree"),
    ("CLI: negative --eps", lambda t: cli("demo", "--eps", "-1"), CLIError, r"--eps"),
    ("CLI: infinite --eps", lambda t: cli("demo", "--eps", "inf"), CLIError, r"--eps"),
    ("CLI: zero --width", lambda t: cli("demo", "--width", "0"), CLIError, r"--width"),
    ("CLI: missing --data file", lambda t: cli("demo", "--data", os.path.join(t, "no.csv"),
                                               "--out", t), CLIError,
     r"data file .*no\.csv.* does not exist"),
    ("CLI: unknown command", lambda t: cli("train"), CLIError, r"invalid choice: 'train'"),
    ("CLI: --out is an existing file", lambda t: cli("demo", "--out", write_file(t, "o")),
     CLIError, r"outmetric demo: error: .*o"),
    ("fit: float16 params", lambda t: fit(P, {"w": jnp.ones(2, jnp.float16)}), TypeError,
     r"params leaf \['w'\] has dtype float16"),
    ("output_metric_descent: NumPy negative damping",
     lambda t: om.output_metric_descent(damping=np.float32(-1)), ValueError,
     r"damping must be >= 0"),
    ("output_metric_descent: 0-d array learning rate 2",
     lambda t: om.output_metric_descent(jnp.asarray(2.0)), ValueError,
     r"learning_rate must lie in \(0, 1\]"),
    ("output_metric_descent: string max_linesearch_steps",
     lambda t: om.output_metric_descent(max_linesearch_steps="3"), ValueError,
     r"max_linesearch_steps must be a positive integer"),
    ("scale_by_output_metric: array negative damping",
     lambda t: om.scale_by_output_metric(damping=jnp.asarray(-1.0)), ValueError,
     r"damping must be >= 0"),
    ("adapted_flow: AdaptedFlow built directly with negative damping",
     lambda t: om.AdaptedFlow(P, -1.0), ValueError, r"damping must be >= 0"),
    ("integrate: a solver that is not a diffrax solver",
     lambda t: om.integrate(P, S, t1=1.0, solver="tsit5"), TypeError,
     r"solver must be a diffrax solver"),
    ("integrate: NaN in ts", lambda t: om.integrate(P, S, t1=1.0, ts=jnp.array([0.0, jnp.nan])),
     ValueError, r"ts must be finite times"),
    ("Problem: from_residual with a negative num_residuals",
     lambda t: om.Problem.from_residual(lambda p: p, num_residuals=-1), ValueError,
     r"num_residuals must be a positive integer"),
    ("Problem: from_residual with a fractional num_residuals",
     lambda t: om.Problem.from_residual(lambda p: p, num_residuals=2.5), ValueError,
     r"num_residuals must be a positive integer"),
]


@pytest.mark.parametrize("call, error, pattern", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_a_named_error(call, error, pattern, tmp_path):
    with pytest.raises(error, match=pattern):
        call(str(tmp_path))


def test_the_table_covers_every_entry_point():
    covered = {case[0].split(":")[0] for case in BAD_INPUTS}
    entry_points = {"Problem", "fit", "integrate", "adapted_flow", "standard_flow",
                    "output_metric_descent", "scale_by_output_metric", "optimizer init",
                    "optimizer update", "CLI", "load_checkpoint"}
    assert entry_points <= covered
    assert len(BAD_INPUTS) >= 15


def test_concrete_array_scalars_are_accepted_where_numbers_are():
    eps = jnp.asarray(1e-3)
    assert fit(P, S, eps=eps, max_steps=3).num_steps <= 3
    assert om.integrate(P, S, eps=eps).costs[-1] <= 1e-3 * (1 + 1e-6)


def test_float32_params_on_float64_data_keep_their_dtype():
    """flax-style float32 params with x64 switched on: the state and the result stay float32."""
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), S)
    for optimizer in (om.output_metric_descent(), om.output_metric_descent(damping=1e-6),
                      om.output_metric_descent(solver="cg")):
        result = fit(P, params, optimizer, max_steps=5)
        assert result.costs[-1] < 1e-2 * result.costs[0]
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.params)} == {
            np.dtype(np.float32)}
    traj = om.integrate(P, params, t1=1.0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(traj.params))


def test_a_failing_callback_leaves_a_checkpoint_of_the_progress_made(tmp_path):
    def callback(step, params, state, cost):
        if step == 6:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        fit(P, S, max_steps=20, chunk_size=2, callback=callback, checkpoint_dir=tmp_path,
            checkpoint_every=100)
    saved = om.load_checkpoint(os.path.join(tmp_path, "checkpoint.npz"), S,
                               om.output_metric_descent().init(S))
    assert saved.step == 6 and len(saved.costs) == 6


# --------------------------------------------------- rank loss and ill-conditioning, both dtypes


# Both hard problems have the same shapes (N = 8, a 2-12-1 network), so they share compilations.


def rank_deficient_problem():
    """A repeated input with two different targets and duplicated hidden units: rank D < N."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    inputs = jax.random.normal(k1, (8, 2))
    inputs = inputs.at[1].set(inputs[0])
    targets = jax.random.normal(k2, (8, 1))
    targets = targets.at[1].set(targets[0] + 1.5)
    w1 = jax.random.normal(k3, (2, 6))
    w1 = jnp.concatenate([w1, w1], axis=1)
    params = {"w1": w1, "b1": jnp.zeros(12), "w2": jnp.full((12, 1), 0.3), "b2": jnp.zeros(1)}
    return inputs, targets, params


def ill_conditioned_problem():
    """Two inputs 1e-12 apart with smooth targets: κ(D) ≈ 2e13 in float64, rank loss in float32."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    inputs = jax.random.normal(k1, (8, 2))
    inputs = inputs.at[1].set(inputs[0] + 1e-12 * jnp.array([1.0, -1.0]))
    targets = jnp.sin(inputs @ jnp.array([[1.0], [0.5]]))
    kw = jax.random.split(k2, 3)
    params = {"w1": jax.random.normal(kw[0], (2, 12)), "b1": 0.1 * jax.random.normal(kw[1], (12,)),
              "w2": jax.random.normal(kw[2], (12, 1)) / jnp.sqrt(12.0), "b2": jnp.zeros(1)}
    return inputs, targets, params


def two_layer(p, u):
    return jnp.tanh(u @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def test_the_hard_problems_are_hard():
    inputs, targets, params = rank_deficient_problem()
    jac = np.asarray(om.Problem(two_layer, inputs, targets).jacobian(params))
    assert np.linalg.matrix_rank(jac) < jac.shape[0]
    inputs, targets, params = ill_conditioned_problem()
    singular = np.linalg.svd(np.asarray(om.Problem(two_layer, inputs, targets).jacobian(params)),
                             compute_uv=False)
    assert singular[0] / singular[-1] >= 1e12


#: Made once, so that the compiled loops are shared by the runs below.
UNDAMPED = {None: om.output_metric_descent(damping=0.0),
            1e-10: om.output_metric_descent(damping=0.0, rtol=1e-10)}
TRACKED = om.output_metric_descent(track_min_singular_value=True)


@pytest.mark.parametrize("make", [rank_deficient_problem, ill_conditioned_problem],
                         ids=["rank_deficient", "ill_conditioned"])
@pytest.mark.parametrize("double", [False, True], ids=["float32", "float64"])
def test_hard_problems_run_to_completion_with_a_reported_fallback(make, double):
    dtype = jnp.float64 if double else jnp.float32
    with jax.enable_x64(double):
        inputs, targets, params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), make())
        problem = om.Problem(two_layer, inputs, targets)
        num_rows = problem.num_samples
        # float32 cannot resolve κ(D) ≈ 2e13 at all: D is rank deficient there. float64 can (the
        # undamped step even converges), but an adaptive ODE solver cannot follow a field that
        # noisy, so directions with σ < 1e-10·σ_max are declared lost (`rtol`).
        rtol = 1e-10 if double else None
        # The undamped step -D⁺(x - y): the Gram is (numerically) singular, the solve falls back.
        with pytest.warns(RuntimeWarning, match="fell back to the SVD pseudo-inverse"):
            undamped = om.fit(problem, params, UNDAMPED[rtol], max_steps=20, progress=False)
        # The default: Levenberg–Marquardt damping.
        damped = om.fit(problem, params, max_steps=20, progress=False)
        # The default damping props the lost directions up, so its Cholesky pivots cannot see
        # the rank loss; tracking σ_min (Gram eigenvalues) does.
        tracked = om.fit(problem, params, TRACKED, max_steps=20, progress=False)
        flow = om.adapted_flow(problem, rtol=rtol)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            traj = om.integrate(problem, params, flow=flow, t1=10.0 * num_rows)
    for result in (undamped, damped, tracked):
        assert all_finite(result.params) and np.all(np.isfinite(result.costs))
        assert all(leaf.dtype == dtype for leaf in jax.tree_util.tree_leaves(result.params))
        assert result.costs[-1] < result.costs[0]
    assert undamped.fallback_steps > 0 and 0 <= undamped.min_rank < num_rows
    assert 0 <= tracked.min_rank < num_rows
    sigmas = tracked.min_singular_values
    assert sigmas.shape == (tracked.num_steps,) and np.all(sigmas >= 0)
    assert sigmas.min() <= 1e-3 * float(om.jacobian_spectrum(problem, params)[0])
    assert traj.result == "successful" and all_finite(traj.params)
    assert traj.costs.dtype == dtype and traj.costs[-1] < traj.costs[0]
    assert bool(jnp.all(traj.fallback)) and int(traj.rank[-1]) < num_rows


def test_float32_reaches_float32_accuracy():
    with jax.enable_x64(False):
        problem, params = make_problem("tanh_mlp", n=8, q=2, width=16)
        assert problem.targets.dtype == jnp.float32
        result = om.fit(problem, params, eps=1e-12, max_steps=40, progress=False)
        state_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.state)}
    assert result.converged and result.costs[-1] <= 1e-12  # C(0) ≈ 1: 12 orders down
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(result.params))
    assert jnp.float64 not in state_dtypes
    assert result.fallback_steps == 0 and result.min_rank == 16


# --------------------------------------------------------------- non-finite values in training


def overflowing_problem():
    """A model that returns inf once its weight passes 0.5, while the targets pull it to 2."""
    inputs = jnp.linspace(0.1, 1.0, 4)[:, None]

    def apply(p, u):
        return jnp.where(p["w"][0] > 0.5, jnp.inf, p["w"] * u)

    return om.Problem(apply, inputs, 2.0 * inputs), {"w": jnp.zeros(1)}


def test_fit_stops_with_the_last_finite_state_when_the_model_overflows(tmp_path):
    problem, params = overflowing_problem()
    with pytest.raises(om.NonFiniteError, match=r"cost became non-finite") as info:
        om.fit(problem, params, optax.sgd(1.0), max_steps=20, progress=False,
               checkpoint_dir=tmp_path)
    result = info.value.result
    assert isinstance(info.value, FloatingPointError)
    assert all_finite(result.params) and np.all(np.isfinite(result.costs))
    assert float(problem.cost(result.params)) == result.costs[-1]
    assert len(result.costs) == result.num_steps + 1
    saved = om.load_checkpoint(tmp_path, params, optax.sgd(1.0).init(params))
    assert saved.step == result.num_steps
    # The same when the step to undo was taken in the previous compiled chunk.
    with pytest.raises(om.NonFiniteError) as info:
        om.fit(problem, params, optax.sgd(1.0), max_steps=20, progress=False, chunk_size=1)
    assert trees_equal(info.value.result.params, result.params)
    np.testing.assert_array_equal(info.value.result.costs, result.costs)
    # The safeguarded default never steps into the overflow: it stops short of w = 0.5.
    safe = om.fit(problem, params, max_steps=30, progress=False)
    assert all_finite(safe.params) and float(safe.params["w"][0]) <= 0.5


def poisoned_batches():
    """Batches of a model whose update is NaN on batch 2 (d/dw √|w·0| = 0·∞), finite elsewhere."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    inputs = jax.random.normal(k1, (12, 2))
    inputs = inputs.at[4:6, 0].set(5.0)
    targets = jax.random.normal(k2, (12, 1))

    def apply(p, u):
        return u @ p["w"] + jnp.sqrt(jnp.abs(p["w"][0] * (u[0] - 5.0)))

    batches = [(inputs[i:i + 2], targets[i:i + 2]) for i in range(0, 12, 2)]
    return om.Problem(apply, inputs, targets), {"w": jnp.full((2, 1), 0.1)}, batches


def test_nan_update_raises_or_is_skipped_with_apply_if_finite():
    problem, params, batches = poisoned_batches()
    with pytest.raises(om.NonFiniteError, match=r"non-finite parameters at batch 2") as info:
        om.fit(problem, params, optax.sgd(0.1), batches=batches, progress=False)
    assert info.value.result.num_steps == 2 and all_finite(info.value.result.params)
    guarded = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2)
    result = om.fit(problem, params, guarded, batches=batches, progress=False)
    assert result.num_steps == 6 and all_finite(result.params)
    assert int(result.state.total_notfinite) == 1


def test_a_non_finite_jacobian_gives_a_zero_step_not_nan():
    problem, params, _ = poisoned_batches()
    # Fixed damping with backtracking: no α makes the NaN step decrease C, so the step is 0.
    opt = om.output_metric_descent(damping=1e-3)
    updates, state = opt.update(None, opt.init(params), params, problem=problem)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
    assert float(state.step_size) == 0.0 and not bool(state.finite)


@pytest.mark.parametrize("optimizer", [
    om.output_metric_descent(),
    om.output_metric_descent(damping=1e-3),
    om.output_metric_descent(solver="cg"),
    optax.chain(om.scale_by_output_metric(solver="lsmr"), optax.scale(-0.5)),
], ids=["default", "backtracking", "cg", "chain-lsmr"])
def test_a_non_finite_jacobian_stops_fit_instead_of_stalling(optimizer):
    """Every solve path masks a non-finite solution to a zero step; `fit` must not take that for
    a stalled run: it stops at once with the last finite state."""
    problem, params, _ = poisoned_batches()
    with pytest.raises(om.NonFiniteError, match=r"solve met NaN or inf") as info:
        om.fit(problem, params, optimizer, max_steps=50, progress=False)
    result = info.value.result
    assert result.num_steps == 0 and all_finite(result.params)


@pytest.mark.parametrize("solver", ["qr", "cg", "lsmr"])
def test_integrate_does_not_stand_still_on_a_non_finite_jacobian(solver):
    problem, params, _ = poisoned_batches()
    with pytest.raises(om.NonFiniteError, match=r"velocity was NaN or inf"):
        om.integrate(problem, params, flow=om.adapted_flow(problem, solver=solver), t1=5.0,
                     max_steps=50)


def test_integrate_raises_when_the_flow_runs_into_non_finite_values():
    problem, params = overflowing_problem()
    with pytest.raises(om.NonFiniteError, match=r"velocity was NaN or inf") as info:
        om.integrate(problem, params, t1=20.0, max_steps=300)
    traj = info.value.result
    assert isinstance(traj, om.Trajectory) and all_finite(traj.params)
    assert np.all(np.isfinite(np.asarray(traj.costs))) and float(traj.ts[-1]) < 20.0


# ----------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_round_trip_keeps_dtypes_and_checks_the_tree(tmp_path):
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2), jnp.float32),
              "c": jnp.ones(2, jnp.bfloat16)}
    state = (jnp.asarray(3, jnp.int32), jnp.asarray(True), jnp.asarray(0.25))  # last: weak
    path = om.save_checkpoint(tmp_path / "checkpoint.npz", params, state, 7, [3.0, 2.0, 1.0],
                              extra={"note": 5})
    loaded = om.load_checkpoint(path, params, state)
    assert loaded.step == 7 and list(loaded.costs) == [3.0, 2.0, 1.0]
    assert int(loaded.extra["note"]) == 5
    for got, want in zip(jax.tree_util.tree_leaves((loaded.params, loaded.opt_state)),
                         jax.tree_util.tree_leaves((params, state))):
        assert got.dtype == want.dtype and got.weak_type == want.weak_type
        np.testing.assert_array_equal(np.asarray(got, float), np.asarray(want, float))
    raw = om.load_checkpoint(tmp_path)  # a folder means folder/checkpoint.npz
    assert raw is not None and len(raw.params) == 3
    with pytest.raises(om.CheckpointError, match=r"params\['b'\] has shape"):
        om.load_checkpoint(path, {**params, "b": jnp.ones(4, jnp.float32)}, state)
    with pytest.raises(om.CheckpointError, match=r"opt_state\[1\] has dtype bool"):
        om.load_checkpoint(path, params, (state[0], jnp.asarray(1.0), state[2]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        om.load_checkpoint(tmp_path / "missing.npz")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    om.save_checkpoint(path, {"w": jnp.ones(3)}, (), 1, [1.0])

    def crash(src, dst):
        raise KeyboardInterrupt  # as if interrupted between writing and renaming

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        om.save_checkpoint(path, {"w": jnp.zeros(3)}, (), 2, [1.0, 0.5])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left behind
    old = om.load_checkpoint(path, {"w": jnp.ones(3)}, ())
    assert old.step == 1 and bool(jnp.all(old.params["w"] == 1))


def trees_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


class Interrupt:
    """A callback that raises KeyboardInterrupt once the run reaches `at` steps."""

    def __init__(self, at):
        self.at = at

    def __call__(self, step, params, state, cost):
        if step >= self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", [om.output_metric_descent(damping=1e-3, linesearch=None),
                                       optax.adam(1e-2)], ids=["outmetric", "adam"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(optimizer, tmp_path):
    # (The default optimizer stops by itself within these 24 steps; the plain step runs on.)
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8)
    kwargs = dict(max_steps=24, progress=False)
    full = om.fit(problem, params, optimizer, chunk_size=5, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        om.fit(problem, params, optimizer, chunk_size=5, checkpoint_dir=tmp_path,
               checkpoint_every=7, callback=Interrupt(12), **kwargs)
    template = (optimizer or om.output_metric_descent()).init(params)
    saved = om.load_checkpoint(tmp_path, params, template)
    assert saved.step == 12 and len(saved.costs) == 12  # saved on interrupt, between checkpoints
    np.testing.assert_array_equal(saved.costs, full.costs[:12])
    # Resume with another chunk size: chunk boundaries do not change the arithmetic.
    resumed = om.fit(problem, params, optimizer, chunk_size=3, checkpoint_dir=tmp_path,
                     checkpoint_every=7, **kwargs)
    assert resumed.resumed_from == 12 and resumed.num_steps == full.num_steps == 24
    np.testing.assert_array_equal(resumed.costs, full.costs)
    assert trees_equal(resumed.params, full.params) and trees_equal(resumed.state, full.state)
    assert resumed.fallback_steps == full.fallback_steps and resumed.min_rank == full.min_rank
    # The finished run's checkpoint is final: resuming it again takes no step.
    again = om.fit(problem, params, optimizer, chunk_size=5, checkpoint_dir=tmp_path, **kwargs)
    assert again.resumed_from == 24 and trees_equal(again.params, full.params)
    np.testing.assert_array_equal(again.costs, full.costs)
    # resume=False starts afresh.
    fresh = om.fit(problem, params, optimizer, chunk_size=5, checkpoint_dir=tmp_path,
                   resume=False, max_steps=3, progress=False)
    assert fresh.resumed_from == 0 and om.load_checkpoint(tmp_path).step == 3


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8)
    om.fit(problem, params, optax.sgd(1e-2), max_steps=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(om.CheckpointError, match="different opt_state tree"):
        om.fit(problem, params, optax.adam(1e-2), max_steps=4, checkpoint_dir=tmp_path,
               progress=False)


def test_checkpoint_of_other_data_is_refused(tmp_path):
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8)
    fit(problem, params, max_steps=2, checkpoint_dir=tmp_path)
    shifted = problem.with_data(problem.inputs, problem.targets + 1.0)
    with pytest.raises(om.CheckpointError, match="written for other data"):
        fit(shifted, params, max_steps=4, checkpoint_dir=tmp_path)
    assert fit(shifted, params, max_steps=4, checkpoint_dir=tmp_path, resume=False).num_steps == 4
    assert fit(shifted, params, max_steps=6, checkpoint_dir=tmp_path).resumed_from == 4


def test_mini_batch_run_resumes_on_the_same_batches(tmp_path):
    problem, params = make_problem("tanh_mlp", n=16, q=1, width=16)

    def batches():
        for start in [0, 4, 8, 12] * 3:
            yield problem.inputs[start:start + 4], problem.targets[start:start + 4]

    full = om.fit(problem, params, batches=batches(), max_steps=10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        om.fit(problem, params, batches=batches(), max_steps=10, checkpoint_dir=tmp_path,
               checkpoint_every=3, callback=Interrupt(4), progress=False)
    assert om.load_checkpoint(tmp_path).step == 4
    resumed = om.fit(problem, params, batches=batches(), max_steps=10, checkpoint_dir=tmp_path,
                     progress=False)
    assert resumed.resumed_from == 4 and resumed.num_steps == 10
    np.testing.assert_array_equal(resumed.costs, full.costs)
    assert trees_equal(resumed.params, full.params)


SCRIPT = textwrap.dedent("""
    import faulthandler, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's report if it hangs
    # Ctrl-C raises KeyboardInterrupt, as at a terminal, even when the suite was started in the
    # background by a shell without job control: that shell ignores SIGINT in its children, and
    # Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import jax
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, {tests!r})
    import outmetric as om
    from helpers import make_problem

    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8)

    def started(step, params, state, cost):
        print("step", step, flush=True)

    om.fit(problem, params, om.output_metric_descent(damping=1e-3, linesearch=None),
           max_steps=10**7, chunk_size=1, checkpoint_dir={folder!r}, checkpoint_every={every},
           callback=started, progress=False)
""")


def run_and_signal(folder, every, sig):
    """Start a long `fit` in a subprocess, send `sig` once it has taken steps; its exit code."""
    script = SCRIPT.format(tests=os.path.dirname(__file__), folder=str(folder), every=every)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(150, proc.kill)  # never hang the test suite
    watchdog.start()
    last = ""
    try:
        for line in proc.stdout:
            last = line
            if line.startswith("step") and int(line.split()[1]) >= 5:
                break
        time.sleep(0.05)
        # Like a user at the keyboard, signal again if the first one is lost (a KeyboardInterrupt
        # raised inside a finalizer is printed and dropped by Python).
        for _ in range(10):
            proc.send_signal(sig)
            try:
                stdout, stderr = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.send_signal(signal.SIGUSR1)  # the child's Python stacks, to say where it hangs
            time.sleep(2)
            proc.kill()
            stdout, stderr = proc.communicate()
            tail = (stdout.splitlines() or [last.strip()])[-1]
            raise AssertionError(f"the run did not stop after 10 signals {sig!r}; last output "
                                 f"{tail!r}; its stacks:\n{stderr[-6000:]}")
    finally:
        watchdog.cancel()
        proc.kill()
    return proc.returncode, stderr


SUBPROCESS_OPTIMIZER = om.output_metric_descent(damping=1e-3, linesearch=None)


def continues_like_an_uninterrupted_run(folder, extra=3):
    """Resume the checkpoint in `folder` for `extra` steps and compare with a run from scratch."""
    problem, params = make_problem("tanh_mlp", n=8, q=2, width=8)
    opt = SUBPROCESS_OPTIMIZER
    saved = om.load_checkpoint(folder, params, opt.init(params))
    total = saved.step + extra
    resumed = om.fit(problem, params, opt, max_steps=total, checkpoint_dir=folder, progress=False)
    full = om.fit(problem, params, opt, max_steps=total, progress=False)
    np.testing.assert_array_equal(resumed.costs, full.costs)
    assert trees_equal(resumed.params, full.params)
    return saved.step


def test_sigkill_mid_run_leaves_a_readable_checkpoint(tmp_path):
    code, stderr = run_and_signal(tmp_path, every=1, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr
    assert continues_like_an_uninterrupted_run(tmp_path) >= 5


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path):
    # Checkpoints only every 10⁶ steps: the one found afterwards was written on the interrupt.
    code, stderr = run_and_signal(tmp_path, every=10**6, sig=signal.SIGINT)
    assert code != 0 and "KeyboardInterrupt" in stderr, stderr
    assert continues_like_an_uninterrupted_run(tmp_path) >= 5
