"""Several devices: steps on 8 simulated CPU devices equal the single-device dense step.

The 8 devices exist only if XLA_FLAGS is set before jax is imported, so the check runs in a
subprocess (the script below) that prints one JSON line. Inputs and targets are sharded along
the sample axis with `outmetric.shard_samples`; each mode's step is compared with the dense
float64 reference Dᵀ(DDᵀ + λI)⁻¹(x − y) (or D⁺(x − y)) from one device, and the Jacobian rows
and Gram rows are checked to be computed where the data lives (sharded by rows).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import outmetric as om
from helpers import MODELS, make_problem

assert jax.device_count() == 8, jax.devices()
problem, params = make_problem("tanh_mlp", n=16, q=2)  # QN = 32 rows, K = 402
mesh = jax.make_mesh((8,), ("data",))
sharded = om.shard_samples(problem, mesh)
lam = 1e-3

jac = np.asarray(problem.jacobian(params))
residual = np.asarray(problem.outputs(params) - problem.targets).reshape(-1)
damped = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(jac.shape[0]), residual)
undamped = np.linalg.pinv(jac) @ residual

MODES = [
    ("cholesky structured", lam, dict(solver="cholesky", gram="structured")),
    ("cholesky dense", lam, dict(solver="cholesky", gram="jacobian")),
    ("cholesky chunked", lam, dict(solver="cholesky", gram="jacobian", chunk_size=8)),
    ("qr", 0.0, dict(solver="qr")),
    ("cg", lam, dict(solver="cg", cg_tol=1e-13)),
    ("cg nystrom", lam, dict(solver="cg", preconditioner="nystrom", preconditioner_rank=8,
                             cg_tol=1e-13)),
    ("lsmr", 0.0, dict(solver="lsmr", cg_tol=1e-13)),
]

@jax.jit
def steps(params, problem):
    out = []
    for _, damping, options in MODES:
        opt = om.scale_by_output_metric(damping=damping, **options)
        direction, _ = opt.update(None, opt.init(params), params, problem=problem)
        out.append(ravel_pytree(direction)[0])
    return out

def mode_errors(problem, params, prefix=""):
    sharded = om.shard_samples(problem, mesh)
    jac = np.asarray(problem.jacobian(params))
    residual = np.asarray(problem.outputs(params) - problem.targets).reshape(-1)
    damped = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(jac.shape[0]), residual)
    undamped = np.linalg.pinv(jac) @ residual
    out = {}
    for (name, damping, _), step in zip(MODES, steps(params, sharded)):
        reference = damped if damping else undamped
        out[prefix + name] = float(np.linalg.norm(np.asarray(step) - reference)
                                   / np.linalg.norm(reference))
    return out

errors = mode_errors(problem, params)
# One more of the shared registry, whose structure detection falls back where it must (the
# convolution; every model's single-device steps are checked in test_scale.py).
for model in ("conv_net",):
    errors.update(mode_errors(*make_problem(model, n=16, q=2), prefix=model + ": "))

# The default optimizer (adaptive Levenberg–Marquardt), sharded against one device.
opt = om.output_metric_descent()
update = jax.jit(opt.update)
one, _ = update(None, opt.init(params), params, problem=problem)
eight, state = update(None, opt.init(params), params, problem=sharded)
one, eight = ravel_pytree(one)[0], ravel_pytree(eight)[0]
errors["output_metric_descent"] = float(jnp.linalg.norm(eight - one) / jnp.linalg.norm(one))

rows = jax.jit(lambda p, prob: prob.jacobian(p))(params, sharded)
gram = jax.jit(lambda p, prob: om.structured_gram(prob, p)[1])(params, sharded)
print(json.dumps({
    "errors": errors,
    "jacobian_shard_shape": list(rows.addressable_shards[0].data.shape),
    "jacobian_devices": len({s.device for s in rows.addressable_shards}),
    "gram_shard_shape": list(gram.addressable_shards[0].data.shape),
    "input_shard_shape": list(sharded.inputs.addressable_shards[0].data.shape),
}))
"""


def test_sharded_steps_match_the_single_device_dense_step():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The suite's XLA flags (conftest.py) are kept; a device count already set is not.
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + SCRIPT],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, error in report["errors"].items():
        assert error <= 1e-8, (name, error)
    assert report["input_shard_shape"] == [2, 5]  # 16 samples over 8 devices
    assert report["jacobian_shard_shape"] == [4, 402] and report["jacobian_devices"] == 8
    assert report["gram_shard_shape"][0] == 4  # each device holds the Gram rows of its samples
