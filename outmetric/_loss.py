"""Output-space losses and their output gradients.

Every loss is a cost C(x) = (1/N) Σ_j ℓ(x_j, y_j) over outputs ``x`` of shape ``(N, Q)`` and
targets ``y`` of the same shape, together with its output gradient ∇ₓC, also ``(N, Q)``. The
adapted flow and the optimizer only ever see ∇ₓC, so adding a loss means adding one entry here.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class Loss(NamedTuple):
    """A named output-space loss: ``cost(x, y) -> scalar`` and ``output_gradient(x, y) -> (N, Q)``."""

    name: str
    cost: Callable[[Float[Array, "N Q"], Float[Array, "N Q"]], Float[Array, ""]]
    output_gradient: Callable[[Float[Array, "N Q"], Float[Array, "N Q"]], Float[Array, "N Q"]]


def l2_cost(x: Float[Array, "N Q"], y: Float[Array, "N Q"]) -> Float[Array, ""]:
    r"""The L² cost $C = \frac{1}{2N}\sum_j \|x_j - y_j\|^2$."""
    return 0.5 * jnp.sum((x - y) ** 2) / x.shape[0]


def l2_output_gradient(x: Float[Array, "N Q"], y: Float[Array, "N Q"]) -> Float[Array, "N Q"]:
    r"""$\nabla_x C = (x - y)/N$ for the L² cost."""
    return (x - y) / x.shape[0]


def cross_entropy_cost(x: Float[Array, "N Q"], y: Float[Array, "N Q"]) -> Float[Array, ""]:
    r"""Cross-entropy $C = -\frac{1}{N}\sum_j \langle y_j, \log\mathrm{softmax}(x_j)\rangle$.

    ``y`` holds label vectors (non-negative entries summing to one per sample; the fibre
    minimiser of DESIGN §2 exists when every entry is positive).
    """
    return -jnp.sum(y * jax.nn.log_softmax(x, axis=-1)) / x.shape[0]


def cross_entropy_output_gradient(
    x: Float[Array, "N Q"], y: Float[Array, "N Q"]
) -> Float[Array, "N Q"]:
    r"""$\nabla_{x_j} C = (\mathrm{softmax}(x_j)\,\langle 1, y_j\rangle - y_j)/N$.

    For label vectors summing to one this is $(\mathrm{softmax}(x_j) - y_j)/N$, whose entries sum
    to zero: the flow conserves each sample's logit sum $s_j = \langle 1, x_j\rangle$.
    """
    total = jnp.sum(y, axis=-1, keepdims=True)
    return (jax.nn.softmax(x, axis=-1) * total - y) / x.shape[0]


LOSSES: dict[str, Loss] = {
    "l2": Loss("l2", l2_cost, l2_output_gradient),
    "cross_entropy": Loss("cross_entropy", cross_entropy_cost, cross_entropy_output_gradient),
}


def get_loss(name: str) -> Loss:
    """Look a loss up by name; an unknown name is a ``ValueError`` naming ``loss``."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"loss={name!r} is not a known loss; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def one_hot_labels(
    classes: Array, num_classes: int, label_smoothing: float
) -> Float[Array, "N Q"]:
    r"""Class indices to smoothed label vectors $y_j = (1 - s)\,e_{c_j} + s/Q$.

    Smoothing ``s > 0`` makes every entry positive, which the cross-entropy fibre minimiser
    $x_j^* = \log y_j - \mathrm{mean}(\log y_j) + s_j(0)/Q$ needs (DESIGN §2).
    """
    eye = jax.nn.one_hot(classes, num_classes)
    return (1.0 - label_smoothing) * eye + label_smoothing / num_classes
