r"""Several devices: the training samples split over a `jax.sharding.Mesh`.

Every quantity of the output-metric step is either a per-sample map — the rows of D, the
outputs, the activations and signals of the structured Gram, JVPs — or a sum over samples — a
Gram tile $D_aD_b^\top$, a VJP $D^\top w = \sum_j D_j^\top w_j$, $D^\top D = \sum_j D_j^\top D_j$. With
the inputs and targets sharded along the sample axis and the parameters replicated, a jitted
step is partitioned by GSPMD: each device computes the rows of D, the Gram rows and the JVP
entries of its own samples, and the sums become all-reduces of K-vectors (or of Gram blocks).
The small dense factorisations (Cholesky, QR or eigh of an n×n matrix, n = min(QN, K)) run
replicated. The result is the single-device result up to the order of floating-point
summation.

Multi-host: call ``jax.distributed.initialize()`` first in every process, build the mesh over
``jax.devices()`` (all processes' devices), and create global input arrays, e.g. with
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_batch)``; a
`Problem` built from such arrays skips the host-side finiteness checks it cannot perform.
"""

import math

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._problem import Problem
from ._validation import check_problem


def shard_samples(problem: Problem, mesh: Mesh, axis: str | tuple[str, ...] | None = None
                  ) -> Problem:
    r"""`problem` with its inputs and targets placed on `mesh`, split along the sample axis.

    Sample j of every input leaf and of the targets goes to the device that owns block
    ⌊j / (N/d)⌋ of the mesh axes `axis` (d devices along them); other axes of the mesh hold
    replicas. The placement uses the mesh with Auto axis types (compiler-partitioned, GSPMD),
    also when `mesh` was made with Explicit ones. Jit the step as usual (with the parameters replicated, e.g.
    ``jax.device_put(params, NamedSharding(mesh, P()))``): the Jacobian rows, Gram blocks and
    Gram-vector products are then computed where the data lives.

    **Arguments:**

    - `problem`: a per-sample `outmetric.Problem` (not a `ResidualProblem` or one from
      `Problem.from_residual`).
    - `mesh`: a `jax.sharding.Mesh`, e.g. ``jax.make_mesh((jax.device_count(),), ("data",))``.
    - `axis`: the mesh axis name (or tuple of names) that splits the samples; default all of
      the mesh's axes.

    N must be divisible by the number of devices along `axis` (a ``ValueError`` otherwise):
    pad or trim the batch, or use a mesh that divides it.

    Several hosts: call ``jax.distributed.initialize()`` first in every process, build `mesh`
    over ``jax.devices()``, and build `problem` from global arrays
    (``jax.make_array_from_process_local_data``); see the module docstring.
    """
    check_problem(problem)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not problem.per_sample:
        raise ValueError(f"problem is a {type(problem).__name__}, not a per-sample Problem: it "
                         "has no sample axis to shard")
    axes = tuple(mesh.axis_names) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    for name in axes:
        if name not in mesh.axis_names:
            raise ValueError(f"axis={name!r} is not an axis of mesh; its axes are {mesh.axis_names}")
    devices = math.prod(mesh.shape[name] for name in axes)
    if problem.num_samples % devices:
        raise ValueError(
            f"the {problem.num_samples} samples do not split evenly over the {devices} devices "
            f"of mesh axes {axes}; use a batch size divisible by {devices}"
        )
    spec = axes[0] if len(axes) == 1 else axes
    mesh = _auto_axes(mesh)

    def place(a):
        rest = (None,) * (a.ndim - 1)
        return jax.device_put(a, NamedSharding(mesh, PartitionSpec(spec, *rest)))

    inputs = jax.tree_util.tree_map(place, problem.inputs)
    targets = place(problem.targets)
    return eqx.tree_at(lambda p: (p.inputs, p.targets), problem, (inputs, targets))


def _auto_axes(mesh: Mesh) -> Mesh:
    """The same mesh with every axis of type Auto, so GSPMD propagates the sample sharding.

    (``jax.make_mesh`` makes Explicit axes by default in recent JAX; the computations here are
    partitioned by the compiler, not by sharding-in-types.)
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None or all(t == axis_type.Auto for t in getattr(mesh, "axis_types", ())):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))
