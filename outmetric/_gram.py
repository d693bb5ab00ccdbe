r"""The Gram matrix of the output Jacobian, without holding D: chunked and structured.

The Cholesky solve of `outmetric._solve` needs the Gram matrix of the smaller side of
$D \in \mathbb{R}^{M\times K}$ ($M = QN$): $DD^\top$ (the empirical NTK, $M\times M$) when
$M \le K$, else $D^\top D$. Multiplying out a materialised D costs $M^2K$ flops and holds $MK$
numbers. This module computes the Gram two other ways.

**Chunked** (`jacobian_gram` with `chunk_size`): the per-sample Jacobian is formed for
`chunk_size` samples at a time. $DD^\top$ is assembled tile by tile,
$(DD^\top)_{ab} = D_a D_b^\top$ for chunks a ≤ b, recomputing the Jacobian of chunk b for each a
(about N/(2·chunk_size) Jacobian evaluations of the whole set instead of one); $D^\top D =
\sum_a D_a^\top D_a$ needs one pass. Peak memory: the Gram plus two chunks of rows.

**Structured** (`structured_gram`): for a parameter matrix W that enters the model once, in an
affine map $z = aW$ (or $Wa$) of a per-sample vector a, the rows of D for W are outer products,
$\partial x_{iq}/\partial W = a_i \otimes \delta_i^q$ with $\delta_i^q = \partial x_{iq}/\partial z_i$,
so its block of $DD^\top$ is

$$\big(D_WD_W^\top\big)_{(i,q),(j,p)} = \langle a_i, a_j\rangle\,\langle\delta_i^q, \delta_j^p\rangle,$$

and a bias b added to z alone adds $\langle\delta_i^q, \delta_j^p\rangle$. Hence, summing over such
dense layers l and adding the remaining parameters' Jacobian $D_r$ in full,

$$DD^\top = \sum_l \big(A_lA_l^\top + \beta_l\big)\circ\big(\Delta_l\Delta_l^\top\big) + D_rD_r^\top,$$

with $\circ$ the product of the $N\times N$ factor, repeated over Q×Q output blocks, and
$\beta_l = 1$ when layer l has a bias (as neural-tangents' structured derivatives do). The
activations $a_l$ come from one forward pass and the signals $\delta_l$ from Q backward passes
per sample that never form a weight gradient; the cost is $M^2\sum_l n_l + N^2\sum_l m_l$
flops for layers $m_l\to n_l$, instead of $M^2K$ — about 70× fewer for a 64-128-10 MLP.

Dense layers are found by reading the jaxpr of the per-sample model $f(\theta, u_j)$: a
parameter leaf qualifies as a weight when it is two-dimensional, used exactly once in the
whole program, and that use is a top-level ``dot_general`` without batch dimensions that
contracts one of its axes with the only non-unit axis of the other operand (so $\partial z/\partial W$ is
rank one). A leaf qualifies as that layer's bias when it is used exactly once, in the ``add`` that
is the only use of z (directly, or after a ``broadcast_in_dim``/``reshape`` of the same size).
Everything else — convolutions, shared weights, layers inside a ``jit``/``scan``, stacked
inputs such as sequences — is a generic leaf whose Jacobian enters $D_rD_r^\top$ in full, so
the result is $DD^\top$ for every model; only the speed depends on the match. `gram_structure`
says what was matched. The model is re-run by a small jaxpr interpreter that adds a zero
"tap" to each matched z, whose gradient is δ, and records each a.
"""

import contextlib
from collections import Counter
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._problem import (
    AbstractProblem,
    check_chunk_size,
    check_params,
    map_sample_chunks,
    sample_chunks,
)
from ._validation import check_problem

GRAM_METHODS = ("auto", "structured", "jacobian")


class GramStructure(NamedTuple):
    """What `gram_structure` found in a model.

    - `layers`: one line per matched dense layer, ``"weight_path (m×n) + bias_path"``.
    - `num_structured`: how many of the K parameters the matched layers hold (their Gram
      blocks come from activations and backpropagated signals).
    - `num_params`: K. The remaining ``num_params - num_structured`` parameters enter the Gram
      through their Jacobian.
    """

    layers: tuple[str, ...]
    num_structured: int
    num_params: int


class _Layer(NamedTuple):
    eqn: int  # index of the dot_general in the jaxpr
    weight: int  # index of the weight leaf
    operand: int  # position (0 or 1) of the activation operand a in the dot_general
    bias: int | None  # index of the bias leaf, if any


class _Analysis(NamedTuple):
    closed: object  # ClosedJaxpr of (leaves, u) -> x_j
    layers: tuple[_Layer, ...]
    generic: tuple[int, ...]  # leaf indices handled by their Jacobian
    tap_shapes: tuple[tuple[int, ...], ...]


def _check_problem_params(problem, params):
    check_problem(problem)
    check_params(params)
    problem.size_from(params)


def _trace_sample(problem: AbstractProblem, leaves, treedef):
    """The jaxpr of one sample's outputs as a function of (param leaves, input leaves)."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))  # noqa: E731
    leaf_specs = [spec(leaf) for leaf in leaves]
    u_spec = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), problem.inputs)

    def sample(leaf_values, u):
        return problem._sample_output(jax.tree_util.tree_unflatten(treedef, leaf_values), u)

    return jax.make_jaxpr(sample)(leaf_specs, u_spec)


def _analyse(problem: AbstractProblem, params: PyTree) -> _Analysis | None:
    """Match dense layers in the per-sample jaxpr (module docstring); None for kinds without a
    per-sample model (`problem.per_sample` False: the residual kinds)."""
    if not problem.per_sample:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = _trace_sample(problem, leaves, treedef)
    jaxpr = closed.jaxpr
    leaf_of = {v: i for i, v in enumerate(jaxpr.invars[: len(leaves)])}
    uses: Counter = Counter()
    consumers: dict = {}
    producer: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for pos, v in enumerate(eqn.invars):
            if not isinstance(v, Literal):
                uses[v] += 1
                consumers.setdefault(v, []).append((i, pos))
        for v in eqn.outvars:
            producer[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses[v] += 1

    def single_leaf(v):
        """The leaf index of v if v is a parameter leaf used exactly once, else None."""
        if isinstance(v, Literal) or v not in leaf_of or uses[v] != 1:
            return None
        return leaf_of[v]

    layers, taken = [], set()
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "dot_general":
            continue
        (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
        if batch_l or batch_r or len(contract_l) != 1:
            continue
        for pos in (1, 0):
            weight = single_leaf(eqn.invars[pos])
            other = eqn.invars[1 - pos]
            if weight is None or weight in taken or len(eqn.invars[pos].aval.shape) != 2:
                continue
            a_axis = (contract_l, contract_r)[1 - pos][0]
            a_shape = other.aval.shape
            if any(d != 1 for k, d in enumerate(a_shape) if k != a_axis):
                continue
            taken.add(weight)
            layers.append(_Layer(i, weight, 1 - pos, _find_bias(
                jaxpr, eqn.outvars[0], uses, consumers, producer, single_leaf, taken)))
            if layers[-1].bias is not None:
                taken.add(layers[-1].bias)
            break
    generic = tuple(i for i in range(len(leaves)) if i not in taken)
    tap_shapes = tuple(tuple(jaxpr.eqns[layer.eqn].outvars[0].aval.shape) for layer in layers)
    return _Analysis(closed, tuple(layers), generic, tap_shapes)


def _find_bias(jaxpr, z, uses, consumers, producer, single_leaf, taken):
    """The leaf b with z + b the only use of z and b used only there (module docstring)."""
    if uses[z] != 1 or z not in consumers:
        return None
    i, pos = consumers[z][0]
    eqn = jaxpr.eqns[i]
    if eqn.primitive.name != "add" or len(eqn.invars) != 2:
        return None
    other = eqn.invars[1 - pos]
    size = int(np.prod(z.aval.shape))
    bias = single_leaf(other)
    if bias is not None:
        return bias if other.aval.shape == z.aval.shape and bias not in taken else None
    if isinstance(other, Literal) or uses[other] != 1 or other not in producer:
        return None
    prev = jaxpr.eqns[producer[other]]
    if prev.primitive.name not in ("broadcast_in_dim", "reshape"):
        return None
    if prev.primitive.name == "broadcast_in_dim":
        dims = tuple(prev.params["broadcast_dimensions"])
        if list(dims) != sorted(set(dims)):
            return None
    bias = single_leaf(prev.invars[0])
    if bias is None or bias in taken or int(np.prod(prev.invars[0].aval.shape)) != size:
        return None
    return bias if int(np.prod(other.aval.shape)) == size else None


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with ctx:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _evaluate_tapped(analysis: _Analysis, args, taps):
    """Run the jaxpr on `args`, adding ``taps[k]`` to matched layer k's z; record each a."""
    closed = analysis.closed
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    at = {layer.eqn: (k, layer.operand) for k, layer in enumerate(analysis.layers)}
    acts = [None] * len(analysis.layers)

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        out = _bind(eqn, invals)
        if i in at:
            k, operand = at[i]
            acts[k] = jnp.reshape(invals[operand], -1)
            out = [out[0] + taps[k].astype(out[0].dtype)]
        env.update(zip(eqn.outvars, out))
    return read(jaxpr.outvars[0]), acts


def _features(problem: AbstractProblem, params: PyTree, analysis: _Analysis, chunk_size):
    """Per-sample activations A_l (N, m_l), signals Δ_l (N, Q, n_l), generic rows (N, Q, K_r)."""
    leaves = jax.tree_util.tree_leaves(params)
    generic_values = [leaves[i] for i in analysis.generic]
    num_q = problem.output_dim
    dtype = ravel_pytree(params)[0].dtype
    taps0 = [jnp.zeros(shape, dtype) for shape in analysis.tap_shapes]
    tap_size = sum(int(np.prod(s)) for s in analysis.tap_shapes)
    generic_size = sum(int(np.size(v)) for v in generic_values)
    jac_fn = jax.jacfwd if tap_size + generic_size < num_q else jax.jacrev

    def per_sample(u):
        u_leaves = jax.tree_util.tree_leaves(u)

        def tapped(taps, gen):
            values = list(leaves)
            for idx, value in zip(analysis.generic, gen):
                values[idx] = value
            x, acts = _evaluate_tapped(analysis, values + u_leaves, taps)
            return x, (x, acts)

        (d_taps, d_gen), (x, acts) = jac_fn(tapped, argnums=(0, 1), has_aux=True)(
            taps0, generic_values)
        deltas = [d.reshape(num_q, -1) for d in d_taps]
        rows = [d.reshape(num_q, -1) for d in d_gen]
        generic_rows = jnp.concatenate(rows, axis=1) if rows else jnp.zeros((num_q, 0), dtype)
        return x, acts, deltas, generic_rows

    return map_sample_chunks(jax.vmap(per_sample), problem.inputs, problem.num_samples,
                             chunk_size)


def gram_structure(problem: AbstractProblem, params: PyTree) -> GramStructure:
    """Which parameters of `problem`'s model `structured_gram` treats as dense layers.

    Reads the jaxpr of one sample's forward pass (see the module docstring for the rules).
    Kinds without a per-sample model (`ResidualProblem`, `Problem.from_residual`): nothing is
    matched.
    """
    _check_problem_params(problem, params)
    num_params = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
    analysis = _analyse(problem, params)
    if analysis is None:
        return GramStructure((), 0, num_params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves = jax.tree_util.tree_leaves(params)
    lines, covered = [], 0
    for layer in analysis.layers:
        shape = "×".join(str(d) for d in np.shape(leaves[layer.weight]))
        line = f"{paths[layer.weight]} ({shape})"
        covered += int(np.size(leaves[layer.weight]))
        if layer.bias is not None:
            line += f" + {paths[layer.bias]}"
            covered += int(np.size(leaves[layer.bias]))
        lines.append(line)
    return GramStructure(tuple(lines), covered, num_params)


def structured_gram(problem: AbstractProblem, params: PyTree, *, chunk_size: int | None = None
                    ) -> tuple[Float[Array, "N Q"], Float[Array, "M M"]]:
    r"""Outputs x and the Gram matrix $DD^\top$ ($M\times M$, $M = QN$) from the layer structure.

    $$DD^\top = \sum_l \big(A_lA_l^\top + \beta_l\big)\circ\big(\Delta_l\Delta_l^\top\big) + D_rD_r^\top,$$

    with $A_l$ the inputs of dense layer l over the samples, $\Delta_l$ the backpropagated
    signals $\partial x_{iq}/\partial z_{l,i}$ at its output, $\beta_l = 1$ with a bias and 0 without,
    and $D_r$ the Jacobian of the parameters in no matched layer (module docstring). Equal to
    $DD^\top$ from a materialised D up to round-off, for every model; fast when
    `gram_structure` covers most parameters. D is never formed (only $D_r$).

    **Arguments:**

    - `problem`, `params`: the problem and the point θ.
    - `chunk_size`: compute the per-sample activations and signals this many samples at a time.

    **Returns:** ``(x, gram)`` with x the outputs, shape ``(N, Q)``.
    """
    _check_problem_params(problem, params)
    check_chunk_size(chunk_size)
    analysis = _analyse(problem, params)
    if analysis is None:  # no per-sample model: the Gram from D
        x, jac = problem.linearize(params, chunk_size=chunk_size)
        return x, jac @ jac.T
    x, acts, deltas, generic_rows = _features(problem, params, analysis, chunk_size)
    num_n, num_q = problem.num_samples, problem.output_dim
    num_rows = num_n * num_q
    gram = jnp.zeros((num_n, num_q, num_n, num_q), x.dtype)
    for layer, a, d in zip(analysis.layers, acts, deltas):
        outer = a @ a.T + (1.0 if layer.bias is not None else 0.0)
        d = d.reshape(num_rows, -1)
        gram = gram + (d @ d.T).reshape(num_n, num_q, num_n, num_q) * outer[:, None, :, None]
    gram = gram.reshape(num_rows, num_rows)
    if generic_rows.shape[-1]:
        rows = generic_rows.reshape(num_rows, -1)
        gram = gram + rows @ rows.T
    return x, gram


def jacobian_gram(problem: AbstractProblem, params: PyTree, *, wide: bool = True,
                  chunk_size: int | None = None) -> Float[Array, "n n"]:
    r"""The Gram matrix $DD^\top$ (`wide=True`, $M\times M$) or $D^\top D$ (`wide=False`, $K\times K$).

    Without `chunk_size`, D is formed once and multiplied out. With it, D is never held whole:
    $DD^\top$ is assembled from tiles $D_aD_b^\top$ of strided sample chunks a ≤ b (recomputing
    chunk b's Jacobian for every a), and $D^\top D = \sum_a D_a^\top D_a$ in one pass (module
    docstring). Kinds without a per-sample model (`problem.per_sample` False) form D whole,
    their own `linearize` using `chunk_size` for its autodiff intermediates.
    """
    _check_problem_params(problem, params)
    check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= problem.num_samples or not problem.per_sample:
        _, jac = problem.linearize(params, chunk_size=chunk_size)
        return jac @ jac.T if wide else jac.T @ jac
    flat, unravel = ravel_pytree(params)
    num_k, num_q, num_n = flat.shape[0], problem.output_dim, problem.num_samples
    chunked, num_chunks, size = sample_chunks(problem.inputs, num_n, chunk_size)
    rows = size * num_q

    def jac_chunk(k):
        u = jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False), chunked)
        jac, _ = jax.vmap(lambda v: problem._sample_jacobian(flat, unravel, v))(u)
        return jac.reshape(rows, num_k)

    if not wide:
        sample = jnp.arange(size)[:, None] * num_chunks  # chunk k holds samples t*num_chunks + k

        def accumulate(k, gram):
            valid = jnp.repeat((sample + k < num_n).reshape(-1), num_q)
            jac = jnp.where(valid[:, None], jac_chunk(k), 0.0)
            return gram + jac.T @ jac

        return jax.lax.fori_loop(0, num_chunks, accumulate, jnp.zeros((num_k, num_k), flat.dtype))

    def put(gram, tile, a, b):
        tile = tile.reshape(size, 1, num_q, size, 1, num_q)
        return jax.lax.dynamic_update_slice(gram, tile, (0, a, 0, 0, b, 0))

    def row(a, gram):
        jac_a = jac_chunk(a)
        gram = put(gram, jac_a @ jac_a.T, a, a)

        def column(b, gram):
            tile = jac_a @ jac_chunk(b).T
            return put(put(gram, tile, a, b), tile.T, b, a)

        return jax.lax.fori_loop(a + 1, num_chunks, column, gram)

    shape = (size, num_chunks, num_q, size, num_chunks, num_q)
    gram = jax.lax.fori_loop(0, num_chunks, row, jnp.zeros(shape, flat.dtype))
    padded = size * num_chunks * num_q
    gram = gram.reshape(padded, padded)
    return gram[: num_n * num_q, : num_n * num_q] if padded > num_n * num_q else gram


def gram_diagonal(problem: AbstractProblem, params: PyTree, *, wide: bool = True,
                  chunk_size: int | None = None, row_root: Array | None = None
                  ) -> Float[Array, " n"]:
    r"""The diagonal of $DD^\top$ (`wide`: squared row norms, length M) or of $D^\top D$
    (squared column norms, length K), from per-sample Jacobians `chunk_size` samples at a time.
    With `row_root` (N×Q×Q, one block $R_j$ per sample), the same for $\hat D = RD$: each
    sample's Jacobian rows are mixed by its block first (`outmetric._solve.weight_rows`).

    The Jacobi preconditioner of the matrix-free solve; costs one Jacobian evaluation and
    holds one chunk of rows.
    """
    _check_problem_params(problem, params)
    check_chunk_size(chunk_size)
    flat, unravel = ravel_pytree(params)
    if not problem.per_sample:
        _, jac = problem.linearize(params, chunk_size=chunk_size)
        if row_root is not None:
            num_n, num_q = row_root.shape[:2]
            jac = jnp.einsum("nqp,npk->nqk", row_root,
                             jac.reshape(num_n, num_q, -1)).reshape(num_n * num_q, -1)
        return jnp.sum(jac**2, axis=1 if wide else 0)

    def sq(chunk):
        u, root = chunk
        jac, _ = jax.vmap(lambda v: problem._sample_jacobian(flat, unravel, v))(u)
        if root is not None:
            jac = jnp.einsum("nqp,npk->nqk", root, jac)
        return jnp.sum(jac**2, axis=-1) if wide else jnp.sum(jac**2, axis=1)  # (n, Q) / (n, K)

    num_samples = problem.num_samples
    if wide or chunk_size is None or chunk_size >= num_samples:
        out = map_sample_chunks(sq, (problem.inputs, row_root), num_samples, chunk_size)
        return out.reshape(-1) if wide else jnp.sum(out, axis=0)
    # Tall side in chunks: sum each chunk's squares into one K-vector, so that one chunk of
    # rows is alive, not an N×K array of per-sample column norms (padding samples count 0).
    chunked, num_chunks, size = sample_chunks((problem.inputs, row_root), num_samples,
                                              chunk_size)

    def body(k, total):
        u = jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, k, axis=1, keepdims=False), chunked)
        real = (jnp.arange(size) * num_chunks + k) < num_samples
        return total + jnp.sum(jnp.where(real[:, None], sq(u), 0.0), axis=0)

    return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros_like(flat))


def gram_matrix(problem: AbstractProblem, params: PyTree, *, method: str = "auto",
                chunk_size: int | None = None) -> Float[Array, "M M"]:
    r"""The empirical NTK Gram matrix $DD^\top \in \mathbb{R}^{M\times M}$, $M = QN$.

    - `method="structured"`: `structured_gram` (activations and backpropagated signals of the
      dense layers, the rest by its Jacobian).
    - `method="jacobian"`: `jacobian_gram` (D multiplied out; in tiles with `chunk_size`).
    - `method="auto"` (default): structured when `gram_structure` matches at least one dense
      layer, else jacobian.
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"method={method!r} is not a Gram method; choose one of {list(GRAM_METHODS)}")
    _check_problem_params(problem, params)
    check_chunk_size(chunk_size)
    if method == "auto":
        method = "structured" if has_dense_layers(problem, params) else "jacobian"
    if method == "structured":
        return structured_gram(problem, params, chunk_size=chunk_size)[1]
    return jacobian_gram(problem, params, wide=True, chunk_size=chunk_size)


def has_dense_layers(problem: AbstractProblem, params: PyTree) -> bool:
    """Whether `gram_structure` matches at least one dense layer (cheap: one trace, no compute)."""
    analysis = _analyse(problem, params)
    return analysis is not None and len(analysis.layers) > 0


def structured_flops(problem: AbstractProblem, params: PyTree) -> int | None:
    r"""Multiply-adds of `structured_gram`'s products, $M^2\sum_l n_l + N^2\sum_l m_l + M^2K_r$,
    against $M^2K$ for $DD^\top$ from D; None when no dense layer is matched."""
    analysis = _analyse(problem, params)
    if analysis is None or not analysis.layers:
        return None
    leaves = jax.tree_util.tree_leaves(params)
    num_n = problem.num_samples
    num_rows = num_n * problem.output_dim
    flops = 0
    for layer, shape in zip(analysis.layers, analysis.tap_shapes):
        n_out = int(np.prod(shape))
        flops += num_rows**2 * n_out + num_n**2 * (int(np.size(leaves[layer.weight])) // n_out)
    rest = sum(int(np.size(leaves[i])) for i in analysis.generic)
    return flops + num_rows**2 * rest
