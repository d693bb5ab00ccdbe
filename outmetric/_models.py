"""Small reference models as pure functions of parameter pytrees (for the demo, benchmarks, notebooks)."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
}


def mlp(key: jax.Array, sizes: Sequence[int], activation: str = "tanh",
        dtype=None) -> tuple[Callable, PyTree]:
    r"""A fully connected network $x = W_L\,\sigma(\cdots\sigma(W_1 u + b_1)\cdots) + b_L$.

    Returns `(apply, params)`: `apply(params, u)` maps one input of shape `(sizes[0],)` to an
    output of shape `(sizes[-1],)`; `params` is a list of `{"w", "b"}` dicts with LeCun-normal
    weights and zero biases. `activation` is one of `ACTIVATIONS`.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not known; choose one of {sorted(ACTIVATIONS)}")
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least an input and an output size >= 1, got {sizes}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    act = ACTIVATIONS[activation]
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": (jax.random.normal(k, (m, n)) / jnp.sqrt(m)).astype(dtype), "b": jnp.zeros(n, dtype)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]

    def apply(params, u):
        h = u
        for layer in params[:-1]:
            h = act(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    return apply, params
