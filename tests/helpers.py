"""Shared registry of models and problems, with where each comes from.

Every model is a pure function `apply(params, u) -> (Q,)` of a params pytree and one input.
`MODELS` maps a name to a factory `make(key, d_in, q) -> (apply, params)`; the problems built
from them are small enough for float64 dense references.
"""

from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp


class Model(NamedTuple):
    apply: Callable
    params: object


def _dense(key, d_in, d_out, scale=1.0):
    kw, kb = jax.random.split(key)
    return {
        "kernel": scale * jax.random.normal(kw, (d_in, d_out)) / jnp.sqrt(d_in),
        "bias": 0.1 * jax.random.normal(kb, (d_out,)),
    }


def tanh_mlp(key, d_in, q, width=16, depth=2) -> Model:
    """Flax-style nested dict {'params': {'Dense_i': {'kernel', 'bias'}}}, tanh activations."""
    keys = jax.random.split(key, depth + 1)
    sizes = [d_in] + [width] * depth + [q]
    layers = {f"Dense_{i}": _dense(keys[i], sizes[i], sizes[i + 1]) for i in range(depth + 1)}

    def apply(params, u):
        h = u
        p = params["params"]
        for i in range(depth):
            h = jnp.tanh(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
        return h @ p[f"Dense_{depth}"]["kernel"] + p[f"Dense_{depth}"]["bias"]

    return Model(apply, {"params": layers})


def gelu_softplus_mlp(key, d_in, q, width=16) -> Model:
    """Two hidden layers, GELU then softplus, params as a list of (W, b) tuples."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = [
        tuple(_dense(k1, d_in, width).values()),
        tuple(_dense(k2, width, width).values()),
        tuple(_dense(k3, width, q).values()),
    ]

    def apply(params, u):
        (w1, b1), (w2, b2), (w3, b3) = params
        h = jax.nn.gelu(u @ w1 + b1)
        h = jax.nn.softplus(h @ w2 + b2)
        return h @ w3 + b3

    return Model(apply, params)


def residual_net(key, d_in, q, width=12, blocks=2) -> Model:
    """An input projection, `blocks` residual tanh blocks h + tanh(W h + b), a linear read-out."""
    keys = jax.random.split(key, blocks + 2)
    params = {
        "embed": _dense(keys[0], d_in, width),
        "blocks": [_dense(k, width, width, scale=0.5) for k in keys[1:-1]],
        "head": _dense(keys[-1], width, q),
    }

    def apply(params, u):
        h = u @ params["embed"]["kernel"] + params["embed"]["bias"]
        for blk in params["blocks"]:
            h = h + jnp.tanh(h @ blk["kernel"] + blk["bias"])
        return h @ params["head"]["kernel"] + params["head"]["bias"]

    return Model(apply, params)


def conv_net(key, d_in, q, channels=4, kernel=3) -> Model:
    """A 1-D convolution over the input vector (tanh), then a dense read-out."""
    k1, k2 = jax.random.split(key)
    params = {
        "conv": jax.random.normal(k1, (channels, kernel)) / jnp.sqrt(kernel),
        "conv_bias": jnp.zeros(channels) + 0.1,
        "head": _dense(k2, channels * (d_in - kernel + 1), q),
    }

    def apply(params, u):
        feats = jax.vmap(lambda w: jnp.convolve(u, w, mode="valid"))(params["conv"])
        feats = jnp.tanh(feats + params["conv_bias"][:, None])
        return feats.reshape(-1) @ params["head"]["kernel"] + params["head"]["bias"]

    return Model(apply, params)


def equinox_mlp(key, d_in, q, width=16) -> Model:
    """An `eqx.nn.MLP` split into trainable arrays and static rest with `eqx.partition`."""
    model = eqx.nn.MLP(d_in, q, width, 2, activation=jnp.tanh, key=key)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(params, u):
        return eqx.combine(params, static)(u)

    return Model(apply, params)


#: Overparametrised architectures (K >= Q*N for the data sizes used in the tests).
MODELS: dict[str, Callable[..., Model]] = {
    "tanh_mlp": tanh_mlp,
    "gelu_softplus_mlp": gelu_softplus_mlp,
    "residual_net": residual_net,
    "conv_net": conv_net,
    "equinox_mlp": equinox_mlp,
}


def regression_data(key, n=8, d_in=5, q=2):
    """Random inputs and targets; distinct inputs keep D of full row rank generically."""
    ku, ky = jax.random.split(key)
    return jax.random.normal(ku, (n, d_in)), jax.random.normal(ky, (n, q))


def make_problem(name, seed=0, n=8, d_in=5, q=2, **kwargs):
    """(problem, params) for registry model `name` on random regression data."""
    import outmetric as om

    kd, km = jax.random.split(jax.random.PRNGKey(seed))
    inputs, targets = regression_data(kd, n, d_in, q)
    model = MODELS[name](km, d_in, q, **kwargs)
    return om.Problem(model.apply, inputs, targets), model.params


def linear_model_problem(seed=0, n=20, d_in=4, q=1):
    """A model linear in θ: x_j = Φ(u_j) θ with fixed features; underparametrised (K < QN)."""
    import outmetric as om

    ku, ky = jax.random.split(jax.random.PRNGKey(seed))
    inputs = jax.random.normal(ku, (n, d_in))
    targets = jax.random.normal(ky, (n, q))

    def features(u):
        return jnp.concatenate([u, jnp.sin(u), jnp.ones(1)])

    def apply(params, u):
        return features(u) @ params["w"]

    params = {"w": jnp.zeros((2 * d_in + 1, q))}
    return om.Problem(apply, inputs, targets), params, jax.vmap(features)(inputs)


def one_hidden_tanh(p, u):
    """x = tanh(u W1 + b1) W2 + b2: params {'w1': (d, m), 'b1': (m,), 'w2': (m, 1), 'b2': (1,)}."""
    return jnp.tanh(u @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def teacher_problem(noise, seed=4, n=24, d_in=2, width=3):
    """(problem, teacher) for `one_hidden_tanh` fitting its own teacher's outputs plus noise.

    Underparametrised (K = width·(d_in + 2) + 1 = 13 < N = 24 by default). Seed 4 is chosen for a
    well-conditioned Jacobian at the teacher (σ_min/σ_max ≈ 8e-3), so that Hessian nullities
    are unambiguous in float64.
    """
    import outmetric as om

    k0, k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 5)
    inputs = jax.random.normal(k0, (n, d_in))
    teacher = {"w1": jax.random.normal(k1, (d_in, width)),
               "b1": 0.5 * jax.random.normal(k2, (width,)),
               "w2": jax.random.normal(k3, (width, 1)), "b2": jnp.zeros(1)}
    clean = jax.vmap(one_hidden_tanh, (None, 0))(teacher, inputs)
    targets = clean + noise * jax.random.normal(k4, (n, 1))
    return om.Problem(one_hidden_tanh, inputs, targets), teacher


def split_units(params, units, ratios):
    """Embed a `one_hidden_tanh` network into a wider one by splitting hidden units.

    Each unit i in `units` gets a copy with the same incoming weights and bias; its outgoing
    weight a_i is shared as λ·a_i (original) and (1 − λ)·a_i (copy), λ from `ratios`. The
    function computed is unchanged, so a critical point of the narrow network maps to a
    critical point of the wide one (Fukumizu & Amari 2000).
    """
    units = jnp.asarray(units)
    ratios = jnp.asarray(ratios)
    a = params["w2"][:, 0]
    return {
        "w1": jnp.concatenate([params["w1"], params["w1"][:, units]], axis=1),
        "b1": jnp.concatenate([params["b1"], params["b1"][units]]),
        "w2": jnp.concatenate([a.at[units].multiply(ratios), (1 - ratios) * a[units]])[:, None],
        "b2": params["b2"],
    }


def levenberg_marquardt(problem, params, steps=100, newton_steps=3):
    """A dense float64 minimiser for small test problems: Levenberg–Marquardt on the L² cost,
    then (underparametrised only) a few Newton steps on ∇C = 0 to reach a critical point to
    round-off."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)

    def cost(f):
        return problem.cost(unravel(f))

    @jax.jit
    def lm_step(f, mu):
        x, jac = problem.linearize(unravel(f))
        residual = (x - problem.targets).reshape(-1)
        if jac.shape[0] <= jac.shape[1]:
            step = jac.T @ jnp.linalg.solve(jac @ jac.T + mu * jnp.eye(jac.shape[0]), residual)
        else:
            step = jnp.linalg.solve(jac.T @ jac + mu * jnp.eye(jac.shape[1]), jac.T @ residual)
        better = cost(f - step) < cost(f)
        return jnp.where(better, f - step, f), jnp.where(better, mu / 3, mu * 3), cost(f - step)

    @jax.jit
    def newton_step(f):
        return f - jnp.linalg.solve(jax.hessian(cost)(f), jax.grad(cost)(f))

    mu = jnp.asarray(1e-3)
    for _ in range(steps):
        flat, mu, value = lm_step(flat, mu)
        if value < 1e-28:
            break
    num_rows = problem.num_samples * problem.output_dim
    if num_rows > flat.shape[0]:  # Newton only where the Hessian can be non-singular
        for _ in range(newton_steps):
            flat = newton_step(flat)
    return unravel(flat)
