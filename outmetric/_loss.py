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


def output_hessian_roots(loss: Loss, x: Float[Array, "N Q"], y: Float[Array, "N Q"]
                         ) -> tuple[Float[Array, "N Q Q"], Float[Array, "N Q Q"]]:
    r"""Per sample, the symmetric square root $R_j$ of the loss's output Hessian
    $\hat H_j = N\nabla^2_{x_j}C = \nabla^2\ell(x_j, y_j)$ and its pseudo-inverse $R_j^+$.

    From the eigendecomposition $\hat H_j = V\,\mathrm{diag}(\mu)V^\top$: $R_j =
    V\mathrm{diag}(\sqrt\mu)V^\top$ and $R_j^+ = V\mathrm{diag}(1/\sqrt\mu)V^\top$ over
    $\mu > Q\epsilon\max\mu$ (the rest, e.g. cross-entropy's direction $\mathbf 1$ along which
    the cost is constant, is dropped from both). For cross-entropy $\hat H_j = \langle 1,
    y_j\rangle(\mathrm{diag}\,p_j - p_jp_j^\top)$, $p_j = \mathrm{softmax}(x_j)$; for L² it is I.
    """
    def sample_cost(xj, yj):
        return loss.cost(xj[None], yj[None])

    hessians = jax.vmap(jax.hessian(sample_cost))(x, y)
    mu, vecs = jnp.linalg.eigh(0.5 * (hessians + jnp.swapaxes(hessians, -1, -2)))
    cut = x.shape[-1] * float(jnp.finfo(x.dtype).eps) * jnp.max(mu, axis=-1, keepdims=True)
    keep = mu > cut
    root_mu = jnp.sqrt(jnp.where(keep, mu, 0.0))
    inverse_mu = jnp.where(keep, 1.0 / jnp.where(keep, root_mu, 1.0), 0.0)
    root = jnp.einsum("nqk,nk,npk->nqp", vecs, root_mu, vecs)
    pinv_root = jnp.einsum("nqk,nk,npk->nqp", vecs, inverse_mu, vecs)
    return root, pinv_root


def apply_sample_blocks(blocks: Float[Array, "N Q Q"], vector: Float[Array, " M"]
                        ) -> Float[Array, " M"]:
    """The block-diagonal matrix with one Q×Q block per sample times a flattened (N·Q) vector."""
    num_n, num_q = blocks.shape[:2]
    return jnp.einsum("nqp,np->nq", blocks, vector.reshape(num_n, num_q)).reshape(-1)


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
