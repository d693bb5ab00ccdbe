"""Problems: the bottom layer. `AbstractProblem` is the interface every kind of problem offers;
`Problem` is the per-sample kind (a model, its training data and an output-space loss).

Every kind turns parameters θ (any pytree of float arrays) into the quantities of DESIGN §1:
outputs x(θ) of shape ``(N, Q)``, the cost C(θ), its output gradient ∇ₓC, and the output
Jacobian D(θ) of shape ``(N*Q, K)`` (rows sample-major, columns in `ravel_pytree` order), plus
the Jacobian-vector and vector-Jacobian products the matrix-free solvers use. Nothing here
solves anything: that is `outmetric._solve`. The residual kinds (`outmetric.ResidualProblem`,
per collocation point, and the stacked residual vector of `Problem.from_residual`) live in
`outmetric._residual`.
"""

import abc

import numbers
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._loss import get_loss, one_hot_labels


def _is_concrete(x) -> bool:
    """True for a value the host can inspect: not a tracer, and (for a `jax.Array` sharded over
    several processes, as after `jax.distributed.initialize`) fully addressable from this one."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def static_real(value) -> float | None:
    """`value` as a float when the host can read it now: a real Python or NumPy number or a
    concrete 0-d real array (not bool); None for a tracer or anything else. Argument checks
    use it so ``np.float32(-1)`` or ``jnp.asarray(2.0)`` is checked like ``-1.0`` or ``2.0``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if (dtype is not None and np.ndim(value) == 0 and _is_concrete(value)
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))):
        return float(value)
    return None


def _check_finite(name: str, tree) -> None:
    """Raise a ``ValueError`` naming ``name`` if a concrete float leaf holds NaN or inf."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if _is_concrete(leaf) and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
            if not bool(np.all(np.isfinite(np.asarray(leaf)))):
                raise ValueError(f"{name} contains NaN or inf values")


def _is_numeric(x) -> bool:
    """Whether `x` converts to a JAX array of booleans or numbers (not strings or objects)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    return np.dtype(dtype).kind in "biufc" or jnp.issubdtype(dtype, jnp.floating)


def _describe(x) -> str:
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} of dtype {dtype}" if dtype is not None else type(x).__name__


_TRAINABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_params(params: PyTree, *, values: bool = True) -> None:
    """Static checks on a parameter pytree: non-empty, real floating leaves, finite values
    (the last read from the arrays, only with `values=True`).

    Raises ``TypeError`` for integer, boolean, complex or half-precision leaves and
    ``ValueError`` for an empty tree or non-finite values; each message names ``params``.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params is an empty pytree: there is nothing to train")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not hasattr(leaf, "dtype"):
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an "
                "array; for an equinox module pass eqx.partition(model, eqx.is_inexact_array)[0]"
            )
        dtype = leaf.dtype
        if dtype in _TRAINABLE_DTYPES:  # (the common case, without jnp's dtype lattice)
            continue
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} is complex ({dtype}); "
                "outmetric trains real parameters only"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {dtype}; "
                "params must be floating point arrays (cast with .astype(float))"
            )
        if jnp.finfo(dtype).bits < 32:
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {dtype}; the output-metric "
                "solves (Cholesky, QR, eigh) need float32 or float64 params (cast with "
                ".astype(jnp.float32))"
            )
    if not any(np.size(leaf) for leaf in leaves):
        raise ValueError("params has no entries (K = 0 parameters): there is nothing to train")
    if values:
        _check_finite("params", params)


def params_dtype(params: PyTree):
    """The floating dtype the parameters compute in (the widest of their leaves)."""
    dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
    if len(dtypes) == 1:  # (canonical: float64 leaves compute in float32 without x64)
        return jax.dtypes.canonicalize_dtype(dtypes.pop())
    return jnp.result_type(*dtypes)


def inputs_in(dtype, inputs: PyTree) -> PyTree:
    """Floating input leaves wider than the parameters' `dtype`, cast down to it (float64 data
    on float32 params: the model, its Jacobian and the Gram all compute in float32); integer
    and narrower leaves as they are."""
    def cast(leaf):
        leaf_dtype = getattr(leaf, "dtype", None)
        if (leaf_dtype is not None and jnp.issubdtype(leaf_dtype, jnp.floating)
                and jnp.finfo(leaf_dtype).bits > jnp.finfo(dtype).bits):
            return leaf.astype(dtype)
        return leaf
    return jax.tree_util.tree_map(cast, inputs)


def _check_data_dtype(name: str, leaf) -> None:
    """Boolean and half-precision data are refused with a `TypeError` naming `name`."""
    dtype = getattr(leaf, "dtype", None)
    dtype = np.dtype(np.asarray(leaf).dtype if dtype is None else dtype)
    if dtype == np.bool_:
        raise TypeError(f"{name} has dtype bool; pass numbers ({name}.astype(float)"
                        + (", or integer class indices for cross-entropy)" if name == "targets"
                           else ")"))
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        raise TypeError(f"{name} has dtype {dtype}: half precision rounds {name} to ~3 digits, "
                        f"which the fit would then match; cast with {name}.astype(jnp.float32)")


class AbstractProblem(eqx.Module):
    r"""The interface the solve, the flows, the optimizers, `fit` and the geometry use.

    A problem maps parameters θ to outputs x(θ) of shape ``(N, Q)`` with targets y and a loss,
    so that $C(\theta)$, $\nabla_x C$ and the output Jacobian D(θ) (``(N*Q, K)``, rows
    sample-major) are defined (DESIGN §1). The kinds:

    - `Problem`: a model applied per sample, $x_j = f(\theta, u_j)$, with data (inputs, targets).
    - `ResidualProblem`: named sets of collocation points, each with a residual function of
      (params, point) and a weight (PINNs); rows are the weighted residuals, targets zero.
    - the stacked residual vector of `Problem.from_residual` (curve fits, test functions).

    A kind implements `num_samples`, `outputs`, `linearize`, `with_batch`, `model_jaxpr` and
    `fingerprint_parts`; cost, output gradient, Jacobian, JVP and VJP follow from them here.
    `per_sample` says whether the outputs come from one per-sample model on inputs with a
    leading sample axis (`inputs`, `_sample_output`, `_sample_jacobian`): only then do the
    structured and sample-chunked Gram matrices and `shard_samples` apply.

    For backward compatibility every kind is also an instance of `Problem`
    (``isinstance(Problem.from_residual(f), om.Problem)`` stays true).
    """

    targets: eqx.AbstractVar[Float[Array, "N Q"]]
    loss: eqx.AbstractVar[str]
    per_sample: ClassVar[bool] = False

    def __hash__(self):
        raise TypeError(
            f"an outmetric.{type(self).__name__} holds arrays and cannot be hashed, so "
            "jax.jit(problem.cost) cannot treat problem.cost as a static function: use "
            "eqx.filter_jit(problem.cost) (bound methods of equinox modules are pytrees), "
            f"jax.jit({type(self).__name__}.cost)(problem, params), or "
            "jax.jit(lambda p: problem.cost(p))")

    # ------------------------------------------------------------------ what a kind defines

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """N, the number of samples (rows of x)."""

    @property
    def output_dim(self) -> int:
        """Q, the output dimension of one sample."""
        return self.targets.shape[1]

    @abc.abstractmethod
    def outputs(self, params: PyTree) -> Float[Array, "N Q"]:
        """All outputs x(θ), shape ``(N, Q)``."""

    @abc.abstractmethod
    def linearize(self, params: PyTree, *, chunk_size: int | None = None
                  ) -> tuple[Float[Array, "N Q"], Float[Array, "NQ K"]]:
        """Outputs x(θ) and the output Jacobian D(θ) (``(N*Q, K)``) together."""

    @abc.abstractmethod
    def with_batch(self, batch: Any) -> "AbstractProblem":
        """The same problem on the next batch `fit(batches=...)` yields (new data, same model)."""

    @abc.abstractmethod
    def model_jaxpr(self, params_spec: PyTree):
        """The ClosedJaxpr of the model at parameter shapes `params_spec` (what a checkpoint's
        model fingerprint hashes)."""

    @abc.abstractmethod
    def fingerprint_parts(self) -> tuple[str, PyTree]:
        """(a description of the loss and layout, the data arrays): what a checkpoint's data
        fingerprint hashes."""

    def size_from(self, params: PyTree) -> None:
        """Fix sizes that are read from an evaluation (the stacked residual kind's m), by
        tracing `outputs` at `params`' shapes; a no-op for kinds sized by their data. Entry
        points that take params call it first."""

    # ------------------------------------------------------------------ common to every kind

    def cost(self, params: PyTree) -> Float[Array, ""]:
        """C(θ); for L², (1/2N) Σ_j ‖x_j − y_j‖²."""
        return self.cost_from_outputs(self.outputs(params))

    def cost_from_outputs(self, x: Float[Array, "N Q"]) -> Float[Array, ""]:
        """C as a function of the outputs x."""
        return get_loss(self.loss).cost(x, self.targets.astype(x.dtype))

    def output_gradient(self, x: Float[Array, "N Q"]) -> Float[Array, "N Q"]:
        """∇ₓC at outputs x; for L², (x − y)/N."""
        return get_loss(self.loss).output_gradient(x, self.targets.astype(x.dtype))

    def jacobian(self, params: PyTree) -> Float[Array, "NQ K"]:
        """The output Jacobian D(θ), shape ``(N*Q, K)``; see `linearize`."""
        return self.linearize(params)[1]

    def jvp(self, params: PyTree, tangent: PyTree) -> Float[Array, "N Q"]:
        """D(θ)·v for a tangent pytree v shaped like params; one forward-mode pass."""
        return jax.jvp(self.outputs, (params,), (tangent,))[1]

    def vjp(self, params: PyTree, cotangent: Float[Array, "N Q"]) -> PyTree:
        """D(θ)ᵀ·w for output cotangents w of shape ``(N, Q)``; one reverse pass."""
        _, pullback = jax.vjp(self.outputs, params)
        return pullback(cotangent)[0]


class Problem(AbstractProblem):
    r"""A least-squares (or cross-entropy) training problem in output space.

    **Arguments:**

    - `apply_fn`: `apply_fn(params, u) -> (Q,)` for one input `u` (or, with `batched=True`,
      `apply_fn(params, inputs) -> (n, Q)` for a batch, as flax's `model.apply`). A scalar output
      is accepted when Q = 1.
    - `inputs`: an array (or pytree of arrays) whose leading axis indexes the N samples.
    - `targets`: `(N, Q)` or `(N,)` (read as Q = 1). For `loss="cross_entropy"`, either label
      vectors `(N, Q)` with non-negative entries summing to one, or integer class indices `(N,)`,
      which become label vectors $y_j = (1 - s)e_{c_j} + s/Q$ with $s$ = `label_smoothing`.
    - `loss`: `"l2"` (default), $C = \frac{1}{2N}\sum_j\|x_j - y_j\|^2$, or `"cross_entropy"`.
    - `batched`: whether `apply_fn` takes a batch.
    - `num_classes`, `label_smoothing`: for integer cross-entropy labels only; `num_classes`
      defaults to `max(targets) + 1`, smoothing to 0.01.

    **Precision:** outputs are computed in the parameters' precision. An `apply_fn` that returns
    a narrower float than the params (float16 or float32 outputs on float64 params) has its
    outputs cast up before the residual (as JAX's own promotion would), so the cost is the true
    cost of those outputs against the targets, never one against targets rounded to the outputs'
    dtype. Inputs and targets are used in the parameters' dtype (float32 params on float64
    data: float32), so the model, the Jacobian D and the Gram are computed in float32 too.
    Boolean and half-precision inputs or targets are refused.

    **jit:** the data are pytree leaves, so a `Problem` can be passed through `jax.jit` and into
    optax extra args; a new batch of the same shape does not recompile. Its bound methods are
    pytrees too (equinox), so jit them with `eqx.filter_jit(problem.cost)`, or pass the problem
    as an argument: `jax.jit(Problem.cost)(problem, params)`. `jax.jit(problem.cost)` cannot
    work (jit hashes the function, and a Problem holds arrays); it raises a `TypeError` saying so.
    """

    inputs: PyTree[Array] | None
    targets: Float[Array, "N Q"]
    apply_fn: Callable = eqx.field(static=True)
    loss: str = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    label_smoothing: float = eqx.field(static=True)
    per_sample: ClassVar[bool] = True

    def __init__(
        self,
        apply_fn: Callable,
        inputs: PyTree[Array] | None,
        targets: Array,
        *,
        loss: str = "l2",
        batched: bool = False,
        num_classes: int | None = None,
        label_smoothing: float = 0.01,
    ):
        get_loss(loss)
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be True or False, got {batched!r}")
        if targets is None or not _is_numeric(targets):
            raise TypeError(f"targets must be a numeric array, got {_describe(targets)}")
        _check_data_dtype("targets", targets)
        targets = jnp.asarray(targets)
        if targets.ndim == 0:
            raise ValueError("targets must have a leading sample axis, got a scalar")
        num_samples = targets.shape[0]
        if num_samples == 0:
            raise ValueError("targets is empty: a problem needs at least one sample")
        leaves = jax.tree_util.tree_leaves(inputs)
        if not leaves:
            raise ValueError("inputs is empty: a problem needs at least one sample")
        for leaf in leaves:
            if not _is_numeric(leaf):
                raise TypeError(f"inputs must hold numeric arrays, got {_describe(leaf)}")
            _check_data_dtype("inputs", leaf)
            shape = jnp.shape(leaf)
            if len(shape) == 0 or shape[0] != num_samples:
                raise ValueError(
                    f"inputs and targets have different numbers of samples: inputs has "
                    f"leading shape {shape[:1]}, targets has {num_samples}"
                )
        _check_finite("inputs", inputs)
        if num_classes is not None and (isinstance(num_classes, (bool, np.bool_)) or not isinstance(
                num_classes, (int, np.integer)) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if loss == "cross_entropy" and jnp.issubdtype(targets.dtype, jnp.integer):
            if targets.ndim != 1:
                raise ValueError(
                    f"integer targets (class indices) must have shape (N,), got {targets.shape}"
                )
            if not 0.0 < label_smoothing < 1.0:
                raise ValueError(
                    f"label_smoothing must lie in (0, 1) so every label entry is positive, "
                    f"got {label_smoothing}"
                )
            if num_classes is None:
                num_classes = int(jnp.max(targets)) + 1
            if _is_concrete(targets) and (
                int(jnp.min(targets)) < 0 or int(jnp.max(targets)) >= num_classes
            ):
                raise ValueError(f"targets holds class indices outside [0, {num_classes})")
            targets = one_hot_labels(targets, num_classes, label_smoothing)
        if not jnp.issubdtype(targets.dtype, jnp.inexact):
            targets = targets.astype(jnp.result_type(float))
        if jnp.issubdtype(targets.dtype, jnp.complexfloating):
            raise TypeError("targets must be real, got a complex array")
        if targets.ndim == 1:
            targets = targets[:, None]
        if targets.ndim != 2:
            raise ValueError(f"targets must have shape (N, Q) or (N,), got {targets.shape}")
        if targets.shape[1] == 0:
            raise ValueError(f"targets has shape {targets.shape}: Q = 0 outputs per sample; a "
                             "problem needs at least one output (targets (N,) means Q = 1)")
        if loss == "cross_entropy" and targets.shape[1] < 2:
            raise ValueError(
                "cross-entropy targets must be label vectors (N, Q) with Q >= 2 classes or integer "
                f"class indices (N,); got float targets of shape {targets.shape}"
            )
        _check_finite("targets", targets)
        if loss == "cross_entropy" and _is_concrete(targets):
            if bool(jnp.any(targets < 0)):
                raise ValueError("cross-entropy targets must be non-negative label vectors")
            sums = np.asarray(jnp.sum(targets, axis=1), np.float64)
            wrong = np.flatnonzero(np.abs(sums - 1.0) > 1e-5)
            if wrong.size:
                j = int(wrong[0])
                what = "is all zero" if sums[j] == 0 else f"sums to {sums[j]:.6g}"
                raise ValueError(
                    f"cross-entropy targets must be label vectors summing to 1 per sample; row "
                    f"{j} {what} ({wrong.size} of {sums.size} rows do not sum to 1): normalise "
                    "them, or pass integer class indices (N,)")
        self.inputs = inputs
        self.targets = targets
        self.apply_fn = apply_fn
        self.loss = loss
        self.batched = batched
        self.label_smoothing = label_smoothing

    @classmethod
    def __subclasshook__(cls, subclass):
        # Every kind answers isinstance(..., Problem), as every problem did before the kinds
        # were split: code written against om.Problem (and checks for it) takes them all.
        # (equinox forbids ABCMeta.register; this is the other standard hook.)
        if cls is Problem and AbstractProblem in getattr(subclass, "__mro__", ()):
            return True
        return NotImplemented

    @classmethod
    def from_residual(cls, residual_fn: Callable[[PyTree], Array], num_residuals: int | None = None,
                      example_params: PyTree | None = None) -> "AbstractProblem":
        r"""A general least-squares problem $C(\theta) = \frac{1}{2m}\|r(\theta)\|^2$.

        `residual_fn(params) -> (m,)`; each residual entry is one output with target 0, so
        N = m and Q = 1. Serves curve fitting and classic test problems. The Jacobian is that
        of the stacked vector r (m reverse passes, or K forward ones); for residuals written per
        collocation point use `outmetric.ResidualProblem`, whose Jacobian rows cost one point
        each.

        m is read from the first evaluation (`outputs`, `cost`, `linearize`, ...; `fit`,
        `integrate` and the Gram functions do it first, through `size_from(params)`, which
        traces without computing), so ``Problem.from_residual(fn)`` needs nothing else.
        `num_residuals`, or `example_params` from which m is read by `jax.eval_shape`, size it
        at once; give one of them (or call `problem.size_from(params)`) when the problem goes
        straight into ``output_metric_descent().update`` or `output_metric_gradient`, which
        read N before they evaluate anything.
        """
        from ._residual import StackedResidualProblem  # the residual kinds build on this module

        return StackedResidualProblem(residual_fn, num_residuals, example_params)

    # ------------------------------------------------------------------ sizes and data

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return self.targets.shape[0]

    def with_data(self, inputs: PyTree[Array], targets: Array) -> "Problem":
        """The same model and loss on other data (a mini-batch, say), validated like `__init__`."""
        return Problem(
            self.apply_fn,
            inputs,
            targets,
            loss=self.loss,
            batched=self.batched,
            num_classes=self.output_dim,
            label_smoothing=self.label_smoothing,
        )

    def with_batch(self, batch) -> "Problem":
        """`with_data(inputs, targets)` for a batch ``(inputs, targets)``."""
        try:
            inputs, targets = batch
        except (TypeError, ValueError):
            raise TypeError("batches must yield (inputs, targets) pairs") from None
        return self.with_data(inputs, targets)

    def model_jaxpr(self, params_spec: PyTree):
        """The jaxpr of `apply_fn` on one sample (a batch of one with `batched=True`)."""

        def spec(a):
            lead = (1,) if self.batched else ()
            dtype = getattr(a, "dtype", None)
            return jax.ShapeDtypeStruct(lead + tuple(np.shape(a)[1:]),
                                        np.asarray(a).dtype if dtype is None else dtype)

        sample = jax.tree_util.tree_map(spec, self.inputs)
        return jax.make_jaxpr(self.apply_fn)(params_spec, sample)

    def fingerprint_parts(self) -> tuple[str, PyTree]:
        return f"{self.loss}|{self.batched}", (self.inputs, self.targets)

    # ------------------------------------------------------------------ outputs and cost

    def _check_sample_output(self, out: Array, expect_batch: int | None, dtype=None) -> Array:
        q = self.output_dim
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            raise TypeError(
                f"apply_fn returned a {type(out).__name__}; it must return one array, of shape "
                f"({q},) per sample (or ({q},) rows of a batch with batched=True): return the "
                "model's output array, not a tuple, list or dict")
        shape = out.shape
        if expect_batch is None:
            ok = shape == (q,) or (q == 1 and shape == ())
            want = f"({q},)"
        else:
            ok = shape == (expect_batch, q) or (q == 1 and shape == (expect_batch,))
            want = f"({expect_batch}, {q})"
        if not ok:
            hint = ""
            if expect_batch is None and len(shape) == 2 and shape[1:] == (q,):
                hint = ": apply_fn seems to return a batch; if it takes one, pass batched=True"
            raise ValueError(
                f"apply_fn returned shape {shape}{' per sample' if expect_batch is None else ''}; "
                f"expected {want} to match targets of shape {self.targets.shape}{hint}"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"apply_fn returned dtype {out.dtype}; outputs must be floating point")
        if dtype is not None and out.dtype != dtype:
            out = out.astype(dtype)  # the parameters' precision (see the class docstring)
        return out.reshape(shape[:1] + (q,) if expect_batch is not None else (q,))

    def _call_apply(self, params: PyTree, u: PyTree) -> Array:
        """`apply_fn(params, u)`; an error tracing a per-sample call says that `batched=False`
        gave it one sample without the batch axis."""
        if self.batched:
            return self.apply_fn(params, u)
        try:
            return self.apply_fn(params, u)
        except (TypeError, ValueError, IndexError) as err:
            if type(err) not in (TypeError, ValueError, IndexError):
                raise  # jax's own errors (a tracer misuse in the model) or the user's
            shapes = jax.tree_util.tree_map(jnp.shape, u)
            raise type(err)(
                f"apply_fn(params, u) failed on one sample u of shape {shapes}: "
                f"{str(err).rstrip('.')}. With "
                "batched=False (the default) apply_fn gets one sample at a time, without the "
                "batch axis; if it is written for a batch (n, ...), as flax's model.apply is, "
                "pass batched=True") from err

    def _sample_output(self, params: PyTree, u: PyTree) -> Float[Array, " Q"]:
        """x_j = f(θ, u_j) for one sample, shape (Q,)."""
        dtype = params_dtype(params)
        u = inputs_in(dtype, u)
        if self.batched:
            batch = jax.tree_util.tree_map(lambda a: a[None], u)
            out = self._check_sample_output(self.apply_fn(params, batch), 1, dtype)
            return out[0]
        return self._check_sample_output(self._call_apply(params, u), None, dtype)

    def outputs(self, params: PyTree) -> Float[Array, "N Q"]:
        """All outputs x(θ), shape ``(N, Q)``."""
        check_params(params)
        if self.batched:
            dtype = params_dtype(params)
            return self._check_sample_output(self.apply_fn(params, inputs_in(dtype, self.inputs)),
                                             self.num_samples, dtype)
        return jax.vmap(self._sample_output, in_axes=(None, 0))(params, self.inputs)

    # ------------------------------------------------------------------ derivatives

    def linearize(self, params: PyTree, *, chunk_size: int | None = None
                  ) -> tuple[Float[Array, "N Q"], Float[Array, "NQ K"]]:
        """Outputs x(θ) and the output Jacobian D(θ) together, in one pass.

        D has shape ``(N*Q, K)``: row ``j*Q + q`` is ∂x_{j,q}/∂θ, columns in `ravel_pytree`
        order. It is computed **per sample** (vmap of a per-sample Jacobian: Q reverse passes,
        or K forward passes when K < Q, for each sample), never by differentiating the stacked
        batch function, which costs N times more (DESIGN §4).

        `chunk_size` (a positive int) computes the per-sample Jacobians `chunk_size` samples at a
        time (`map_sample_chunks`), so the autodiff intermediates of only one chunk are alive;
        D itself is still returned whole.
        """
        check_chunk_size(chunk_size)
        check_params(params)
        flat, unravel = ravel_pytree(params)
        num_params = flat.shape[0]

        def rows(u):
            return jax.vmap(lambda v: self._sample_jacobian(flat, unravel, v))(u)

        jac, x = map_sample_chunks(rows, self.inputs, self.num_samples, chunk_size)
        return x, jac.reshape(self.num_samples * self.output_dim, num_params)

    def _sample_jacobian(self, flat: Array, unravel: Callable, u: PyTree
                         ) -> tuple[Float[Array, "Q K"], Float[Array, " Q"]]:
        """(∂x_j/∂θ of shape (Q, K), x_j) for one sample u = u_j, at flat parameters `flat`."""

        def sample(f):
            x = self._sample_output(unravel(f), u)
            return x, x

        jac_fn = jax.jacfwd if flat.shape[0] < self.output_dim else jax.jacrev
        return jac_fn(sample, has_aux=True)(flat)


def nonfinite_cost_message(problem: AbstractProblem, params: PyTree) -> str:
    """Why C(params) is not finite, for the error of an entry point: NaN or inf outputs of the
    model, or finite outputs whose cost overflows the dtype (then the model is not to blame)."""
    x = np.asarray(problem.outputs(params))
    if not np.all(np.isfinite(x)):
        return ("params give a non-finite initial cost: the model returns NaN or inf at the "
                "initial params")
    residual = np.abs(x - np.asarray(problem.targets, x.dtype))
    return (f"params give a non-finite initial cost, but the model's outputs are finite "
            f"(largest |output| {np.max(np.abs(x)):.3g}, largest |output - target| "
            f"{np.max(residual):.3g}): the {problem.loss} cost overflows {x.dtype}. Rescale the "
            "targets and the model's outputs"
            + (" (or compute in float64)" if x.dtype != np.float64 else ""))


def check_chunk_size(chunk_size) -> None:
    """``chunk_size`` must be None or a positive int; otherwise a ``ValueError`` naming it."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def sample_chunks(inputs: PyTree[Array], num_samples: int, chunk_size: int
                  ) -> tuple[PyTree[Array], int, int]:
    r"""Lay the samples out as `num_chunks` strided chunks of `size` samples each.

    Returns ``(chunked, num_chunks, size)`` where every leaf of `chunked` has shape
    ``(size, num_chunks, ...)`` and holds sample $s = t\cdot\mathrm{num\_chunks} + k$ at
    ``[t, k]``: chunk k is ``chunked[:, k]``. The samples are padded (with copies of sample 0)
    to ``size * num_chunks >= N``, with ``num_chunks = ceil(N / chunk_size)`` and ``size =
    ceil(N / num_chunks) <= chunk_size``. Strided rather than contiguous chunks keep each chunk
    spread evenly over the devices when the sample axis is sharded.
    """
    num_chunks = -(-num_samples // chunk_size)
    size = -(-num_samples // num_chunks)
    pad = size * num_chunks - num_samples

    def layout(a):
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)], axis=0)
        return a.reshape((size, num_chunks) + a.shape[1:])

    return jax.tree_util.tree_map(layout, inputs), num_chunks, size


def map_sample_chunks(fn: Callable[[PyTree], PyTree], inputs: PyTree[Array], num_samples: int,
                      chunk_size: int | None) -> PyTree[Array]:
    """``fn(inputs)`` for a per-sample-vectorised `fn`, evaluated `chunk_size` samples at a time.

    `fn` maps a batch of n samples to a pytree of arrays with leading axis n. With `chunk_size`
    None (or ≥ N) this is one call; otherwise a `lax.fori_loop` over the strided chunks of
    `sample_chunks` writes each chunk's result into place, so the intermediates of one chunk at a
    time are alive, and the result is in sample order as if `fn` had seen all samples at once.
    """
    check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= num_samples:
        return fn(inputs)
    chunked, num_chunks, size = sample_chunks(inputs, num_samples, chunk_size)

    def chunk(k):
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False), chunked)

    shapes = jax.eval_shape(lambda: fn(chunk(0)))
    init = jax.tree_util.tree_map(
        lambda s: jnp.zeros((size, num_chunks) + s.shape[1:], s.dtype), shapes)

    def body(k, acc):
        out = fn(chunk(k))
        return jax.tree_util.tree_map(
            lambda a, o: jax.lax.dynamic_update_index_in_dim(a, o, k, axis=1), acc, out)

    acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return jax.tree_util.tree_map(
        lambda a: a.reshape((size * num_chunks,) + a.shape[2:])[:num_samples], acc)


def num_parameters(params: PyTree) -> int:
    """K, the number of scalar parameters (all leaves of the pytree)."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))

