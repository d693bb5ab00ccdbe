"""Reliability, second part: named errors for more bad input, integrate's tolerances at any
parameter scale and its diffrax options, output precision, jit of a Problem's methods, and
checkpoints that two runs, a foreign file, another model or a killed writer cannot spoil."""

import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
import tomllib

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import outmetric as om
from helpers import make_problem, tanh_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

P, S = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
APPLY = tanh_mlp(jax.random.PRNGKey(0), 5, 2, width=4, depth=1).apply
X, Y = P.inputs, P.targets
LABELS = jax.nn.softmax(Y, axis=1)  # valid cross-entropy label vectors
#: One optimizer object for every checkpoint test, so its loop compiles once (and fast).
SGD = optax.sgd(0.05)


def fit(*args, **kwargs):
    return om.fit(*args, progress=False, **kwargs)


def batch_model(params, inputs):
    """A model written for a batch (n, d): it flattens each row, so one sample (d,) breaks it."""
    return APPLY(params, inputs.reshape(inputs.shape[0], -1))


def foreign_file(tmp):
    path = os.path.join(tmp, "checkpoint.npz")
    np.savez(path, weights=np.arange(3.0))
    return path


#: (description, call(tmp), exception type, regex that names the offending argument)
BAD_INPUTS = [
    ("Problem: targets with Q = 0 outputs", lambda t: om.Problem(APPLY, X, Y[:, :0]), ValueError,
     r"targets has shape \(4, 0\): Q = 0"),
    ("fit: params with K = 0 entries", lambda t: fit(P, {"w": jnp.zeros((0, 2))}), ValueError,
     r"params has no entries \(K = 0"),
    ("Problem: apply_fn returns a tuple",
     lambda t: om.Problem(lambda p, u: (APPLY(p, u),), X, Y).cost(S), TypeError,
     r"apply_fn returned a tuple; it must return one array"),
    ("Problem: apply_fn returns a dict",
     lambda t: om.Problem(lambda p, u: {"x": APPLY(p, u)}, X, Y).cost(S), TypeError,
     r"apply_fn returned a dict"),
    ("Problem: fractional num_classes",
     lambda t: om.Problem(APPLY, X, jnp.array([0, 1, 0, 1]), loss="cross_entropy",
                          num_classes=2.5), ValueError, r"num_classes must be a positive integer"),
    ("Problem: boolean targets", lambda t: om.Problem(APPLY, X, Y > 0), TypeError,
     r"targets has dtype bool"),
    ("Problem: float16 targets", lambda t: om.Problem(APPLY, X, Y.astype(jnp.float16)), TypeError,
     r"targets has dtype float16"),
    ("Problem: boolean inputs", lambda t: om.Problem(APPLY, X > 0, Y), TypeError,
     r"inputs has dtype bool"),
    ("Problem: float16 inputs", lambda t: om.Problem(APPLY, X.astype(jnp.float16), Y), TypeError,
     r"inputs has dtype float16"),
    ("Problem: cross-entropy labels that do not sum to 1",
     lambda t: om.Problem(APPLY, X, 2.0 * LABELS, loss="cross_entropy"), ValueError,
     r"cross-entropy targets must be label vectors summing to 1 .* row 0 sums to 2"),
    ("Problem: all-zero cross-entropy labels",
     lambda t: om.Problem(APPLY, X, LABELS.at[2].set(0.0), loss="cross_entropy"), ValueError,
     r"row 2 is all zero"),
    ("Problem: a batch model with batched=False",
     lambda t: om.Problem(batch_model, X, Y).cost(S), TypeError,
     r"one sample u of shape \(5,\).*dot_general.*pass batched=True"),
    ("Problem: jax.jit of a bound method", lambda t: jax.jit(P.cost)(S), TypeError,
     r"cannot be hashed.*eqx\.filter_jit\(problem\.cost\)"),
    ("integrate: finite outputs whose cost overflows",
     lambda t: om.integrate(om.Problem(lambda p, u: 1e200 * APPLY(p, u), X, Y), S, t1=1.0),
     ValueError, r"model's outputs are finite .* the l2 cost overflows float64"),
    ("integrate: Euler without dt0", lambda t: om.integrate(P, S, t1=1.0, solver=diffrax.Euler()),
     ValueError, r"solver=Euler\(\) takes fixed steps .* pass dt0"),
    ("integrate: Euler with an adaptive controller",
     lambda t: om.integrate(P, S, t1=1.0, solver=diffrax.Euler(), dt0=0.1,
                            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8)),
     TypeError, r"stepsize_controller=PIDController adapts the step .* solver=Euler\(\)"),
    ("integrate: a stepsize_controller that is not one",
     lambda t: om.integrate(P, S, t1=1.0, stepsize_controller="pid"), TypeError,
     r"stepsize_controller must be a diffrax step-size controller"),
    ("integrate: rtol together with a stepsize_controller",
     lambda t: om.integrate(P, S, t1=1.0, rtol=1e-8,
                            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8)),
     ValueError, r"with stepsize_controller= set them on that controller"),
    ("integrate: negative dt0", lambda t: om.integrate(P, S, t1=1.0, dt0=-0.1), ValueError,
     r"dt0 must be a positive finite step"),
    ("integrate: dt0 too small for max_steps",
     lambda t: om.integrate(P, S, t1=1.0, solver=diffrax.Euler(), dt0=1e-3, max_steps=10),
     ValueError, r"dt0=0.001 needs 1000 fixed steps .* max_steps=10"),
    ("integrate: saveat that is not a SaveAt", lambda t: om.integrate(P, S, t1=1.0, saveat="t1"),
     TypeError, r"saveat must be a diffrax.SaveAt"),
    ("integrate: both ts and saveat",
     lambda t: om.integrate(P, S, t1=1.0, ts=jnp.array([0.5]), saveat=diffrax.SaveAt(t1=True)),
     ValueError, r"pass either ts or saveat"),
    ("integrate: saveat with its own fn",
     lambda t: om.integrate(P, S, t1=1.0, saveat=diffrax.SaveAt(t1=True, fn=lambda t, y, a: 0.0)),
     ValueError, r"saveat.fn must be the default"),
    ("integrate: saveat times outside [0, t1]",
     lambda t: om.integrate(P, S, t1=1.0, saveat=diffrax.SaveAt(ts=jnp.array([0.5, 2.0]))),
     ValueError, r"saveat.ts must be sorted times inside \[0, 1.0\]"),
    ("Problem: apply_fn returns a list",
     lambda t: om.Problem(lambda p, u: [APPLY(p, u)], X, Y).cost(S), TypeError,
     r"apply_fn returned a list; it must return one array"),
    ("output_metric_descent: array-valued learning_rate",
     lambda t: om.output_metric_descent(jnp.array([0.5, 0.5])), TypeError,
     r"learning_rate must be a scalar .* shape \(2,\)"),
    ("output_metric_descent: array-valued damping",
     lambda t: om.output_metric_descent(damping=jnp.array([0.5, 0.5])), TypeError,
     r"damping must be a scalar .* shape \(2,\)"),
    ("scale_by_output_metric: array-valued damping",
     lambda t: om.scale_by_output_metric(damping=np.ones(3)), TypeError,
     r"damping must be a scalar .* shape \(3,\)"),
    ("adapted_flow: array-valued damping",
     lambda t: om.adapted_flow(P, damping=jnp.ones(2)), TypeError,
     r"damping must be a scalar .* shape \(2,\)"),
    ("fit: a learning_rate schedule returning a string",
     lambda t: fit(P, S, om.output_metric_descent(lambda count: "fast"), max_steps=2), TypeError,
     r"learning_rate schedule returned 'fast'; it must return a number in \(0, 1\]"),
    ("fit: a learning_rate schedule returning 0",
     lambda t: fit(P, S, om.output_metric_descent(lambda count: 0.0), max_steps=2), ValueError,
     r"learning_rate schedule returned 0.0; it must return a number in \(0, 1\]"),
    ("fit: an empty batches iterator",
     lambda t: fit(P, S, batches=iter([]), max_steps=2), ValueError,
     r"batches is empty: it yielded no \(inputs, targets\) pair"),
    ("fit: finite outputs whose cost overflows",
     lambda t: fit(om.Problem(lambda p, u: 1e200 * APPLY(p, u), X, Y), S, max_steps=2),
     ValueError, r"fit: params give a non-finite initial cost, but the model's outputs are "
                 r"finite .* the l2 cost overflows float64"),
    ("fit: resume=False over a foreign checkpoint.npz",
     lambda t: (foreign_file(t), fit(P, S, SGD, max_steps=1, checkpoint_dir=t, resume=False)),
     om.CheckpointError, r"checkpoint.npz' exists and is not an outmetric checkpoint"),
    ("save_checkpoint: over a foreign file",
     lambda t: om.save_checkpoint(foreign_file(t), S, (), 0), om.CheckpointError,
     r"is not an outmetric checkpoint: refusing to overwrite"),
]


@pytest.mark.parametrize("call, error, pattern", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_a_named_error(call, error, pattern, tmp_path):
    with pytest.raises(error, match=pattern):
        call(str(tmp_path))


# ------------------------------------------------------------- integrate at any parameter scale


def scaled_linear(params, u):
    """x_j = s·W e_j, with the gain s carried in the data (so every s shares one compilation)."""
    scale, e = u
    return scale * (params @ e)


def scaled_problem(scale, small_params):
    """N = 4 samples e_j, Q = 2, K = 8: W(0) random, or random/s so the outputs start O(1)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    weights = jax.random.normal(k1, (2, 4))
    targets = jax.random.normal(k2, (4, 2))
    inputs = (jnp.full(4, scale), jnp.eye(4))
    return om.Problem(scaled_linear, inputs, targets), weights / scale if small_params else weights


@pytest.mark.parametrize("scale, small_params", [(1.0, False), (1e12, True), (1e20, True),
                                                 (1e12, False)],
                         ids=["s=1", "s=1e12, W=O(1/s)", "s=1e20, W=O(1/s)", "s=1e12, W=O(1)"])
def test_integrate_follows_the_closed_form_at_any_parameter_scale(scale, small_params):
    """The adapted flow of x = sWe_j is C(0)e^{-2t/N} for every s; a fixed atol on θ broke this
    once θ was of its order (1e-14): s = 1e12 ended at C = 2e-6, s = 1e20 above C(0)."""
    problem, params = scaled_problem(scale, small_params)
    eps = 1e-10
    traj = om.integrate(problem, params, eps=eps)
    predicted = traj.costs[0] * jnp.exp(-2.0 * traj.ts / problem.num_samples)
    assert traj.result == "successful"
    np.testing.assert_array_less(jnp.abs(traj.costs - predicted), 1e-6 * predicted)
    assert abs(float(traj.costs[-1]) / eps - 1) <= 1e-6
    assert traj.reached_eps is True  # C(T(ε)) = ε up to the solver's error, not exactly


def test_euler_with_a_fixed_step_and_a_custom_saveat():
    """Euler through integrate: first-order in dt against C(0)e^{-2t/N}, every step saved."""
    t1, num_samples = 4.0, P.num_samples
    errors = []
    for dt in (0.04, 0.02):
        traj = om.integrate(P, S, t1=t1, solver=diffrax.Euler(), dt0=dt, max_steps=256,
                            saveat=diffrax.SaveAt(t0=True, steps=True))
        num = round(t1 / dt)
        assert traj.result == "successful" and traj.num_steps == num
        np.testing.assert_allclose(traj.ts, dt * np.arange(num + 1), rtol=1e-12, atol=1e-12)
        predicted = traj.costs[0] * np.exp(-2.0 * np.asarray(traj.ts) / num_samples)
        relative = np.abs(np.asarray(traj.costs) / predicted - 1)
        # Euler's global error is first order: O(t·dt) (here ≤ 1.4 %, a bound 3-4× above it).
        assert np.all(relative <= 4 * (np.asarray(traj.ts) + dt) * dt / num_samples**2)
        errors.append(relative[-1])
    assert 1.7 <= errors[0] / errors[1] <= 2.3  # halving dt halves the error: first order


# ------------------------------------------------------------------------ output precision


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.float16])
def test_low_precision_outputs_are_scored_against_the_true_targets(out_dtype):
    """An apply_fn that returns float32 (or float16) on float64 params: its outputs are cast up,
    so an output that equals the targets rounded to float32 has the cost of that rounding, not 0
    (which made fit report converged=True at a true cost of 1e-8)."""
    targets = jax.random.normal(jax.random.PRNGKey(2), (4, 1))
    problem = om.Problem(lambda w, u: (u @ w).astype(out_dtype), jnp.eye(4), targets)
    params = targets  # outputs: the targets rounded to out_dtype
    rounded = targets.astype(out_dtype).astype(jnp.float64)
    true_cost = 0.5 * float(jnp.sum((rounded - targets) ** 2)) / 4
    assert true_cost > 0
    cost = problem.cost(params)
    assert cost.dtype == jnp.float64 and float(cost) == pytest.approx(true_cost, rel=1e-12)
    assert problem.outputs(params).dtype == jnp.float64


# ------------------------------------------------------------------------------ jit of methods


def test_problem_methods_jit_the_equinox_way():
    """Bound methods of an equinox Module are pytrees: eqx.filter_jit takes them, with the data
    traced (new data of the same shape does not recompile); jax.jit takes the unbound method."""
    compiled = eqx.filter_jit(P.cost)
    np.testing.assert_allclose(compiled(S), P.cost(S), rtol=1e-14)
    np.testing.assert_allclose(jax.jit(om.Problem.cost)(P, S), P.cost(S), rtol=1e-14)
    other = P.with_data(P.inputs + 1.0, P.targets)
    count = []
    traced = eqx.filter_jit(lambda problem, params: (count.append(1), problem.cost(params))[1])
    np.testing.assert_allclose(traced(P, S), P.cost(S), rtol=1e-14)
    np.testing.assert_allclose(traced(other, S), other.cost(S), rtol=1e-14)
    assert len(count) == 1
    with pytest.raises(TypeError, match=r"jax\.jit\(Problem\.cost\)\(problem, params\)"):
        jax.jit(P.jacobian)(S)


# ------------------------------------------------------------------------------- dependencies


def test_every_imported_package_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = {re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower()
                    for dep in tomllib.load(f)["project"]["dependencies"]}
    imported = set()
    folder = os.path.join(ROOT, "outmetric")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            guarded = set()  # imports inside `try: ... except ImportError` are optional
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                        isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                                       "ModuleNotFoundError")
                        for h in node.handlers):
                    guarded |= {id(n) for part in node.body for n in ast.walk(part)}
            for node in ast.walk(tree):
                names = set()
                if isinstance(node, ast.Import):
                    names = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = {node.module.split(".")[0]}
                if id(node) not in guarded:
                    imported |= names
    assert "jaxtyping" in imported
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party - declared == set()


# ------------------------------------------------------------------------------- checkpoints


def test_a_second_run_on_a_checkpoint_in_use_is_refused_and_overwrites_nothing(tmp_path):
    path = tmp_path / "checkpoint.npz"
    refused = []

    def callback(step, params, state, cost):
        if step == 2:
            before = path.read_bytes()
            with pytest.raises(om.CheckpointError, match=r"is in use by another fit in this "
                                                         r"process"):
                fit(P, S, SGD, max_steps=5, checkpoint_dir=tmp_path, resume=False)
            assert path.read_bytes() == before
            refused.append(step)

    first = fit(P, S, SGD, max_steps=4, chunk_size=1, checkpoint_every=1, checkpoint_dir=tmp_path,
                callback=callback)
    assert refused == [2] and first.num_steps == 4
    assert om.load_checkpoint(tmp_path).step == 4
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]  # the lock went with the run
    assert fit(P, S, SGD, max_steps=6, checkpoint_dir=tmp_path).resumed_from == 4


def test_a_checkpoint_of_another_model_or_mode_is_refused(tmp_path):
    fit(P, S, SGD, max_steps=2, checkpoint_dir=tmp_path)

    def sine_apply(params, u):  # the same parameter shapes, another function
        return jnp.sin(APPLY(params, u))

    with pytest.raises(om.CheckpointError, match=r"written for another model \(apply_fn"):
        fit(om.Problem(sine_apply, X, Y), S, SGD, max_steps=4, checkpoint_dir=tmp_path)
    with pytest.raises(om.CheckpointError, match=r"written for a full-batch run; this run is "
                                                 r"mini-batch"):
        fit(P, S, SGD, max_steps=4, checkpoint_dir=tmp_path, batches=[(X, Y)] * 4)
    # The same model built again (another function object, the same computation) resumes.
    again = om.Problem(tanh_mlp(jax.random.PRNGKey(0), 5, 2, width=4, depth=1).apply, X, Y)
    assert fit(again, S, SGD, max_steps=3, checkpoint_dir=tmp_path).resumed_from == 2


def test_a_killed_runs_lock_and_temporary_file_are_cleared_but_a_live_ones_kept(tmp_path):
    """A process writes a checkpoint's temporary file (and is stopped before the rename), then
    takes the run lock on another folder. While it lives, its lock refuses a fit and its
    temporary file survives saves and loads; once it is killed outright, the next save or load
    removes the file and the next fit takes the lock over."""
    locked, written = tmp_path / "locked", tmp_path / "written"
    locked.mkdir()
    written.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        import jax.numpy as jnp
        import outmetric as om
        real_replace, os.replace = os.replace, lambda src, dst: None  # stopped before renaming
        om.save_checkpoint({str(written)!r}, {{"w": jnp.ones(3)}}, (), 1)
        os.replace = real_replace
        print("written", flush=True)
        om.CheckpointLock({str(locked)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    def temporaries():
        return [name for name in os.listdir(written) if name.endswith(".tmp")]

    try:
        assert proc.stdout.readline().strip() == "written"
        assert len(temporaries()) == 1
        om.save_checkpoint(written, {"w": jnp.zeros(3)}, (), 2)  # a live writer's file stays
        assert len(temporaries()) == 1
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(om.CheckpointError, match=rf"in use by process {proc.pid} on host"):
            fit(P, S, SGD, max_steps=2, checkpoint_dir=locked)
        assert os.listdir(locked) == ["checkpoint.npz.lock"]  # nothing written
    finally:
        proc.send_signal(signal.SIGKILL)  # killed outright: its lock and file stay behind
        proc.wait()
    assert om.load_checkpoint(written).step == 2 and temporaries() == []
    assert fit(P, S, SGD, max_steps=2, checkpoint_dir=locked).num_steps == 2
    assert os.listdir(locked) == ["checkpoint.npz"]
