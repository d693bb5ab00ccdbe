"""Vector fields in parameter space with the diffrax signature ``vf(t, params, args) -> velocity``.

Each flow is an `equinox.Module` holding its `Problem`, so the training data are pytree leaves
(traced, not baked in as constants) when diffrax compiles the integration. The velocity is a
pytree shaped like `params`. All linear algebra is delegated to `outmetric._solve`.
"""

import equinox as eqx
import jax
from jaxtyping import PyTree

from ._problem import Problem
from ._solve import SOLVERS, output_metric_gradient


class AbstractFlow(eqx.Module):
    """A vector field on parameters; call it as `flow(t, params, args)`."""

    problem: eqx.AbstractVar[Problem]

    def __call__(self, t, params: PyTree, args=None) -> PyTree:
        raise NotImplementedError


class StandardFlow(AbstractFlow):
    r"""The gradient flow in the Euclidean metric of parameter space.

    $$\theta' = -\nabla_\theta C = -D^\top \nabla_x C,$$

    which moves the outputs by $x' = -DD^\top\nabla_x C$ (DDᵀ the empirical NTK Gram matrix).
    """

    problem: Problem

    def __call__(self, t, params, args=None):
        grad = jax.grad(self.problem.cost)(params)
        return jax.tree_util.tree_map(lambda g: -g, grad)


class AdaptedFlow(AbstractFlow):
    r"""The gradient flow in the Euclidean metric of output space (the adapted flow).

    $$\theta' = -D^+\nabla_x C \quad(\text{damped: } -D^\top(DD^\top + \lambda I)^{-1}\nabla_x C).$$

    - Overparametrised ($K \ge QN$, rank D = QN): $D^+ = D^\top(DD^\top)^{-1}$, the outputs move
      by $x' = -\nabla_x C$ and $C(s) = e^{-2s/N}C(0)$ from every start.
    - Underparametrised ($K \le QN$, rank D = K): $D^+ = (D^\top D)^{-1}D^\top$ and
      $x' = -P\nabla_x C$ with P the orthogonal projector onto range D; C never increases.
    - Rank lost: the Moore–Penrose pseudo-inverse; the solve detects the rank loss and uses a
      rank-revealing SVD, so the field stays finite and $x' = -P_{\mathrm{range}\,D}\nabla_xC$.

    `solver` picks the linear algebra (`outmetric._solve.SOLVERS`); the default `"auto"` uses
    QR of the Jacobian for the undamped field.
    """

    problem: Problem
    damping: float = 0.0
    solver: str = eqx.field(static=True, default="auto")

    def __check_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not a known solver; choose one of {list(SOLVERS)}")

    def __call__(self, t, params, args=None):
        direction, _, _ = output_metric_gradient(
            self.problem, params, damping=self.damping, solver=self.solver
        )
        return jax.tree_util.tree_map(lambda d: -d, direction)


def standard_flow(problem: Problem) -> StandardFlow:
    r"""The standard gradient flow $\theta' = -\nabla_\theta C$ of `problem`; see `StandardFlow`."""
    _check_problem(problem)
    return StandardFlow(problem)


def adapted_flow(problem: Problem, *, damping: float = 0.0, solver: str = "auto") -> AdaptedFlow:
    r"""The adapted flow $\theta' = -D^+\nabla_x C$ of `problem`; see `AdaptedFlow`.

    `damping` λ ≥ 0 gives $-D^\top(DD^\top + \lambda I)^{-1}\nabla_x C$.
    """
    _check_problem(problem)
    if isinstance(damping, (int, float)) and not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return AdaptedFlow(problem, damping, solver)


def _check_problem(problem) -> None:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an outmetric.Problem, got {type(problem).__name__}")
