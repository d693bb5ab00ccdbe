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
    weights and zero biases. `activation` is one of `ACTIVATIONS`. Every call with the same
    `activation` returns the same `apply`, so jitted code compiled for one initialisation is
    reused by the next of the same shapes.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not known; choose one of {sorted(ACTIVATIONS)}")
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least an input and an output size >= 1, got {sizes}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": (jax.random.normal(k, (m, n)) / jnp.sqrt(m)).astype(dtype), "b": jnp.zeros(n, dtype)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]
    return _MLP_APPLY[activation], params


def _mlp_apply(activation: Callable) -> Callable:
    def apply(params, u):
        h = u
        for layer in params[:-1]:
            h = activation(h @ layer["w"] + layer["b"])
        return h @ params[-1]["w"] + params[-1]["b"]

    return apply


#: One `apply` per activation, shared by every `mlp` of that activation: the depth and widths
#: come from `params`, and jitted code keyed on the function (`Problem`, the flows, `fit`) then
#: compiles once for all seeds and restarts of an architecture instead of once per `mlp` call.
_MLP_APPLY: dict[str, Callable] = {name: _mlp_apply(act) for name, act in ACTIVATIONS.items()}
