r"""Residual problems: least squares on residuals instead of outputs against targets.

`ResidualProblem` is the natural form of a physics-informed network (PINN) and of any fit whose
loss is a sum over point sets: named sets s of collocation points $p_{s,1..N_s}$, each with a
residual function $r_s(\theta, p) \in \mathbb{R}^{q_s}$ and a weight $w_s \ge 0$. Its cost is

$$C(\theta) = \sum_s \frac{w_s}{2N_s}\sum_{j=1}^{N_s}\|r_s(\theta, p_{s,j})\|^2,$$

(the published ENGD/KFAC loss when every $w_s = 1$). In outmetric's normalisation
$C = \frac{1}{2M}\sum_i x_i^2$ (targets zero, Q = 1) the outputs are the scaled residual entries
$x = \sqrt{w_s M / N_s}\,r_s(\theta, p_{s,j})$, $M = \sum_s N_s q_s$ rows in all, set by set
in the order given, point-major within a set.

The Jacobian rows are computed **per point**: a vmap over the points of the per-point Jacobian
of $r_s$ ($q_s$ reverse passes, or K forward ones when $K < q_s$), never the Jacobian of the
stacked residual vector, which costs M times more (DESIGN §4).

The points (and the weights) are pytree leaves: `with_points` gives a problem of the same
structure, so a jitted step that takes the problem as an argument does not recompile for newly
drawn points of the same shapes, and `fit(problem, params, batches=...)` feeds fresh point sets
(an iterable of ``{name: points}`` dicts, or a sampler ``key -> {name: points}``).

`StackedResidualProblem` is the kind `Problem.from_residual(fn)` returns: one function of the
parameters giving the whole residual vector, its Jacobian taken of that vector.
"""

from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._problem import (
    AbstractProblem,
    _check_data_dtype,
    _check_finite,
    _describe,
    _is_numeric,
    check_chunk_size,
    check_params,
    map_sample_chunks,
    params_dtype,
    static_real,
)

__all__ = ["PointSet", "ResidualProblem", "StackedResidualProblem"]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_points(points, what: str = "points") -> int:
    """Validate a pytree of point arrays with a common leading axis; return that length."""
    leaves = jax.tree_util.tree_leaves(points)
    if not leaves:
        raise ValueError(f"{what} is empty: a point set needs at least one point")
    sizes = []
    for leaf in leaves:
        if not _is_numeric(leaf):
            raise TypeError(f"{what} must hold numeric arrays, got {_describe(leaf)}")
        _check_data_dtype(what, leaf)
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"{what} must have a leading axis indexing the points, got a scalar")
        sizes.append(shape[0])
    if len(set(sizes)) > 1:
        raise ValueError(f"{what} leaves have different numbers of points (leading axes "
                         f"{sizes}); every leaf's leading axis indexes the same points")
    if sizes[0] == 0:
        raise ValueError(f"{what} is empty (0 points): a point set needs at least one point")
    _check_finite(what, points)
    return int(sizes[0])


def _as_float_array(a):
    a = jnp.asarray(a)
    return a if jnp.issubdtype(a.dtype, jnp.inexact) else a.astype(jnp.result_type(float))


class PointSet(eqx.Module):
    r"""One term of a `ResidualProblem`: a residual function, its points and its weight.

    **Arguments:**

    - `residual_fn`: `residual_fn(params, point) -> ()` or `(q,)`: the residual at one point
      (the PDE operator applied to the network minus the source, the network minus the
      boundary value, ...). It sees one point, without the leading axis.
    - `points`: an array (or pytree of arrays) whose leading axis indexes the $N_s$ points.
    - `weight`: $w_s \ge 0$ (default 1); the term contributes
      $\frac{w_s}{2N_s}\sum_j\|r_s(\theta, p_j)\|^2$ to C. A pytree leaf, so changing it (for
      adaptive weighting) does not recompile a jitted step.
    - `num_outputs`: $q_s$, the length of a vector residual (default 1: a scalar residual).
    """

    points: PyTree[Array]
    weight: Float[Array, ""]
    residual_fn: Callable = eqx.field(static=True)
    num_outputs: int = eqx.field(static=True)

    def __init__(self, residual_fn: Callable, points: PyTree[Array], weight=1.0, *,
                 num_outputs: int = 1):
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable (params, point) -> residual, got "
                            f"{type(residual_fn).__name__}")
        _check_points(points)
        if isinstance(weight, (bool, np.bool_)) or not _is_numeric(weight) or np.ndim(weight):
            raise TypeError(f"weight must be a real number >= 0, got {weight!r}")
        value = static_real(weight)
        if value is not None and not (value >= 0 and np.isfinite(value)):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        self.residual_fn = residual_fn
        self.points = jax.tree_util.tree_map(_as_float_array, points)
        self.weight = _as_float_array(weight)
        self.num_outputs = _check_positive_int("num_outputs", num_outputs)

    @property
    def num_points(self) -> int:
        """$N_s$, the number of points."""
        return int(jnp.shape(jax.tree_util.tree_leaves(self.points)[0])[0])

    def with_points(self, points: PyTree[Array]) -> "PointSet":
        """The same residual and weight on other points (same trailing shapes and structure)."""
        _check_points(points)
        old, new = (jax.tree_util.tree_structure(self.points),
                    jax.tree_util.tree_structure(points))
        if old != new:
            raise ValueError(f"points have structure {new}; this set's points have {old}")
        for a, b in zip(jax.tree_util.tree_leaves(self.points), jax.tree_util.tree_leaves(points)):
            if jnp.shape(a)[1:] != jnp.shape(b)[1:]:
                raise ValueError(f"points of shape {jnp.shape(b)} do not match this set's points "
                                 f"of shape {jnp.shape(a)} (one point: {jnp.shape(a)[1:]})")
        points = jax.tree_util.tree_map(_as_float_array, points)
        return eqx.tree_at(lambda s: s.points, self, points)

    def residual(self, params: PyTree, point: PyTree) -> Float[Array, " q"]:
        """$r_s(\\theta, p)$ for one point, as a vector of length `num_outputs`."""
        r = self.residual_fn(params, point)
        if not hasattr(r, "shape") or not hasattr(r, "dtype"):
            raise TypeError(f"residual_fn returned a {type(r).__name__}; it must return one "
                            f"array of shape () or ({self.num_outputs},) per point")
        q = self.num_outputs
        if r.shape not in ((q,), ()) or (r.shape == () and q != 1):
            hint = (f" (pass num_outputs={r.shape[0]} for a vector residual)"
                    if r.ndim == 1 else "; it sees one point, without the leading axis")
            raise ValueError(f"residual_fn returned shape {r.shape} for one point; expected "
                             f"({q},){' or ()' if q == 1 else ''}{hint}")
        if not jnp.issubdtype(r.dtype, jnp.floating):
            raise TypeError(f"residual_fn returned dtype {r.dtype}; residuals must be floating "
                            "point")
        return r.reshape(q)


def _as_point_set(name: str, value) -> PointSet:
    if isinstance(value, PointSet):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        try:
            return PointSet(*value)
        except (TypeError, ValueError) as err:
            raise type(err)(f"point set {name!r}: {err}") from None
    raise TypeError(f"point set {name!r} must be a PointSet(residual_fn, points, weight) or a "
                    f"tuple (residual_fn, points[, weight]), got {type(value).__name__}")


class ResidualProblem(AbstractProblem):
    r"""Least squares over named sets of collocation points (PINNs); module docstring for C.

    $$C(\theta) = \sum_s \frac{w_s}{2N_s}\sum_{j=1}^{N_s}\|r_s(\theta, p_{s,j})\|^2$$

    **Arguments:**

    - `sets`: a mapping ``{name: PointSet(residual_fn, points, weight)}`` (a tuple
      ``(residual_fn, points[, weight])`` is read as a `PointSet`), or one `PointSet` (named
      ``"points"``). The order of the mapping is the order of the rows.

    Example (2-D Poisson, −Δu = f on the unit square, u = 0 on its boundary):

        def interior(params, p):
            u = lambda q: net(params, q)
            return -jnp.trace(jax.hessian(u)(p)) - f(p)

        problem = om.ResidualProblem({
            "interior": om.PointSet(interior, x_interior),                 # (900, 2)
            "boundary": om.PointSet(lambda params, p: net(params, p), x_boundary, weight=1.0),
        })
        result = om.fit(problem, params)

    The outputs are the M scaled residual entries $\sqrt{w_s M/N_s}\,r_s$ with Q = 1 and
    targets zero; `term_costs` gives each set's share of C. Points and weights are data (pytree
    leaves): `with_points({"interior": new})` replaces a set's points without recompiling a
    jitted step of the same shapes, and `fit(problem, params, batches=sampler)` redraws them
    every step.
    """

    sets: tuple[PointSet, ...]
    names: tuple[str, ...] = eqx.field(static=True)
    loss: ClassVar[str] = "l2"

    def __init__(self, sets: Mapping[str, Any] | PointSet):
        if isinstance(sets, PointSet):
            sets = {"points": sets}
        if not isinstance(sets, Mapping):
            raise TypeError(f"sets must be a mapping {{name: PointSet}} or one PointSet, got "
                            f"{type(sets).__name__}")
        if not sets:
            raise ValueError("sets is empty: a ResidualProblem needs at least one point set")
        for name in sets:
            if not isinstance(name, str):
                raise TypeError(f"point set names must be strings, got {name!r}")
        self.names = tuple(sets)
        self.sets = tuple(_as_point_set(name, value) for name, value in sets.items())

    # ------------------------------------------------------------------ sizes and data

    @property
    def num_samples(self) -> int:
        """M = Σ_s N_s q_s, the number of residual entries (rows of D)."""
        return sum(s.num_points * s.num_outputs for s in self.sets)

    @property
    def output_dim(self) -> int:
        """Q = 1: every residual entry is one output."""
        return 1

    @property
    def targets(self) -> Float[Array, "M 1"]:
        """Zeros, shape ``(M, 1)``."""
        return jnp.zeros((self.num_samples, 1))

    @property
    def points(self) -> dict[str, PyTree[Array]]:
        """``{name: points}`` of every set."""
        return {name: s.points for name, s in zip(self.names, self.sets)}

    @property
    def weights(self) -> dict[str, Array]:
        """``{name: weight}`` of every set."""
        return {name: s.weight for name, s in zip(self.names, self.sets)}

    def with_points(self, points: Mapping[str, PyTree[Array]]) -> "ResidualProblem":
        """The same residuals and weights on other points: ``{name: points}`` for some or all
        sets (the others keep theirs). Each set's points keep their trailing shapes; the
        same numbers of points give a problem a jitted step does not recompile for."""
        if not isinstance(points, Mapping):
            raise TypeError(f"points must be a mapping {{name: points}}, got "
                            f"{type(points).__name__}")
        unknown = [name for name in points if name not in self.names]
        if unknown:
            raise ValueError(f"points names unknown point set(s) {unknown}; this problem's sets "
                             f"are {list(self.names)}")
        sets = []
        for name, s in zip(self.names, self.sets):
            if name in points:
                try:
                    s = s.with_points(points[name])
                except (TypeError, ValueError) as err:
                    raise type(err)(f"point set {name!r}: {err}") from None
            sets.append(s)
        return eqx.tree_at(lambda p: p.sets, self, tuple(sets))

    def with_data(self, points: Mapping[str, PyTree[Array]]) -> "ResidualProblem":
        """`with_points`: a residual problem's data are its points."""
        return self.with_points(points)

    def with_batch(self, batch) -> "ResidualProblem":
        """`with_points(batch)` for a batch ``{name: points}`` from `fit(batches=...)`."""
        if not isinstance(batch, Mapping):
            raise TypeError("batches for a ResidualProblem must yield {name: points} dicts (or "
                            f"be a sampler key -> dict), got {type(batch).__name__}")
        return self.with_points(batch)

    def model_jaxpr(self, params_spec: PyTree):
        """The jaxpr of every set's residual at one point."""

        def spec(a):
            return jax.ShapeDtypeStruct(tuple(jnp.shape(a)[1:]), jnp.result_type(a))

        points = tuple(jax.tree_util.tree_map(spec, s.points) for s in self.sets)
        return jax.make_jaxpr(lambda params, points: tuple(
            s.residual_fn(params, p) for s, p in zip(self.sets, points)))(params_spec, points)

    def fingerprint_parts(self) -> tuple[str, PyTree]:
        layout = ",".join(f"{n}:{s.num_outputs}" for n, s in zip(self.names, self.sets))
        return f"l2|residual|{layout}", tuple((s.points, s.weight) for s in self.sets)

    # ------------------------------------------------------------------ outputs and cost

    def _scales(self, dtype) -> list[Array]:
        """√(w_s M / N_s) for each set, in `dtype`."""
        m = self.num_samples
        return [jnp.sqrt(s.weight.astype(dtype) * (m / s.num_points)) for s in self.sets]

    def outputs(self, params: PyTree) -> Float[Array, "M 1"]:
        """The scaled residual entries $\\sqrt{w_s M/N_s}\\,r_s(\\theta, p_{s,j})$, shape
        ``(M, 1)``, set by set, point-major."""
        check_params(params)
        dtype = params_dtype(params)
        blocks = []
        for s, scale in zip(self.sets, self._scales(dtype)):
            r = jax.vmap(lambda p, s=s: s.residual(params, p).astype(dtype))(s.points)
            blocks.append((scale * r).reshape(-1))
        return jnp.concatenate(blocks)[:, None]

    def residuals(self, params: PyTree) -> dict[str, Float[Array, "N_s q_s"]]:
        """``{name: r_s(θ, p_j) for every point}``, unscaled, shape ``(N_s, q_s)`` each."""
        check_params(params)
        return {name: jax.vmap(lambda p, s=s: s.residual(params, p))(s.points)
                for name, s in zip(self.names, self.sets)}

    def term_costs(self, params: PyTree) -> dict[str, Float[Array, ""]]:
        """``{name: w_s/(2N_s) Σ_j ‖r_s(θ, p_j)‖²}``: each set's share of C (they sum to C)."""
        return {name: s.weight * jnp.sum(r**2) / (2 * s.num_points)
                for (name, r), s in zip(self.residuals(params).items(), self.sets)}

    # ------------------------------------------------------------------ derivatives

    def linearize(self, params: PyTree, *, chunk_size: int | None = None
                  ) -> tuple[Float[Array, "M 1"], Float[Array, "M K"]]:
        """Outputs x(θ) and D(θ) (``(M, K)``), the rows computed per point.

        For each set, a vmap over its points of the Jacobian of one point's scaled residual
        ($q_s$ reverse passes, or K forward passes when $K < q_s$). `chunk_size` computes them
        `chunk_size` points at a time (`map_sample_chunks`), so only one chunk's autodiff
        intermediates are alive; D is returned whole.
        """
        check_chunk_size(chunk_size)
        check_params(params)
        flat, unravel = ravel_pytree(params)
        num_params = flat.shape[0]
        dtype = flat.dtype
        xs, jacs = [], []
        for s, scale in zip(self.sets, self._scales(dtype)):

            def point(f, p, s=s, scale=scale):
                x = scale * s.residual(unravel(f), p).astype(dtype)
                return x, x

            jac_fn = jax.jacfwd if num_params < s.num_outputs else jax.jacrev

            def rows(points, point=point, jac_fn=jac_fn):
                return jax.vmap(lambda p: jac_fn(point, has_aux=True)(flat, p))(points)

            jac, x = map_sample_chunks(rows, s.points, s.num_points, chunk_size)
            jacs.append(jac.reshape(-1, num_params))
            xs.append(x.reshape(-1))
        return jnp.concatenate(xs)[:, None], jnp.concatenate(jacs, axis=0)


class _Size:
    """A mutable cell for the residual count m of a `StackedResidualProblem` sized on first use
    (a static field: compared by identity, so copies of one problem share it)."""

    def __init__(self, value: int | None = None):
        self.value = value


class StackedResidualProblem(AbstractProblem):
    r"""$C(\theta) = \frac{1}{2m}\|r(\theta)\|^2$ for `residual_fn(params) -> (m,)`: the kind
    `Problem.from_residual` returns (see it). N = m residual entries, Q = 1, targets zero; the
    Jacobian is that of the stacked vector (`jax.jacrev`, or `jax.jacfwd` when K < m).
    m is read from the first evaluation unless given."""

    residual_fn: Callable = eqx.field(static=True)
    size: _Size = eqx.field(static=True)
    loss: ClassVar[str] = "l2"

    def __init__(self, residual_fn: Callable, num_residuals: int | None = None,
                 example_params: PyTree | None = None):
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
        if num_residuals is None and example_params is not None:
            shape = jax.eval_shape(residual_fn, example_params).shape
            if len(shape) != 1:
                raise ValueError(f"residual_fn must return shape (m,), got {shape}")
            num_residuals = shape[0]
        if num_residuals is not None:
            num_residuals = _check_positive_int("num_residuals", num_residuals)
        self.residual_fn = residual_fn
        self.size = _Size(num_residuals)

    def size_from(self, params: PyTree) -> None:
        """Read m from the shape of `residual_fn(params)` (traced, not evaluated)."""
        if self.size.value is None:
            jax.eval_shape(self.outputs, params)

    @property
    def num_samples(self) -> int:
        """N = m, the number of residuals."""
        if self.size.value is None:
            raise ValueError(
                "this Problem.from_residual(fn) problem has not been evaluated yet, so its "
                "number of residuals m is unknown: evaluate it once (problem.cost(params) or "
                "problem.size_from(params)), or pass num_residuals=m or example_params=params "
                "to from_residual")
        return self.size.value

    @property
    def output_dim(self) -> int:
        return 1

    @property
    def targets(self) -> Float[Array, "m 1"]:
        """Zeros, shape ``(m, 1)``."""
        return jnp.zeros((self.num_samples, 1))

    def with_batch(self, batch):
        raise TypeError("a Problem.from_residual problem has no data to replace, so it cannot "
                        "take batches; write the residuals per point with om.ResidualProblem")

    def with_data(self, *args, **kwargs):
        raise ValueError("a residual problem from Problem.from_residual has no data to replace; "
                         "write the residuals per point with om.ResidualProblem for new points")

    def model_jaxpr(self, params_spec: PyTree):
        return jax.make_jaxpr(self.residual_fn)(params_spec)

    def fingerprint_parts(self) -> tuple[str, PyTree]:
        return "l2|stacked", ()

    def outputs(self, params: PyTree) -> Float[Array, "m 1"]:
        """The residual vector r(θ) as outputs, shape ``(m, 1)``."""
        check_params(params)
        r = self.residual_fn(params)
        if not hasattr(r, "shape"):
            raise TypeError(f"residual_fn returned a {type(r).__name__}; it must return one "
                            "array of shape (m,)")
        if len(r.shape) != 1 or r.shape[0] == 0:
            raise ValueError(f"residual_fn returned shape {r.shape}; expected (m,) with m >= 1")
        if self.size.value is None:
            self.size.value = int(r.shape[0])
        elif r.shape != (self.size.value,):
            raise ValueError(f"residual_fn returned shape {r.shape}; expected "
                             f"({self.size.value},)")
        dtype = params_dtype(params)
        return (r if r.dtype == dtype else r.astype(dtype))[:, None]

    def linearize(self, params: PyTree, *, chunk_size: int | None = None
                  ) -> tuple[Float[Array, "m 1"], Float[Array, "m K"]]:
        """Outputs and the Jacobian of the stacked residual vector; `chunk_size` is ignored
        (there are no samples to chunk)."""
        check_chunk_size(chunk_size)
        check_params(params)
        flat, unravel = ravel_pytree(params)
        num_params = flat.shape[0]
        self.size_from(params)

        def stacked(f):
            x = self.outputs(unravel(f))
            return x, x

        jac_fn = jax.jacfwd if num_params < self.num_samples else jax.jacrev
        jac, x = jac_fn(stacked, has_aux=True)(flat)
        return x, jac.reshape(self.num_samples, num_params)

