"""Vector fields in parameter space with the diffrax signature ``vf(t, params, args) -> velocity``.

Each flow is an `equinox.Module` holding its `Problem`, so the training data are pytree leaves
(traced, not baked in as constants) when diffrax compiles the integration. The velocity is a
pytree shaped like `params`. All linear algebra is delegated to `outmetric._solve`.
"""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ._problem import AbstractProblem, Problem, _check_finite, check_params, static_real
from ._solve import (
    check_solver_name,
    linearize,
    output_metric_gradient,
    resolve_solver,
    solve,
)
from ._validation import check_nonnegative, check_problem, check_rtol


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
    QR of the Jacobian for the undamped field. `rtol` is the solve's relative singular-value
    cut-off (default max(M, K)·ε): directions of D with σ ≤ `rtol`·σ_max count as lost rank, so
    a near-singular D (κ(D) ≥ 1/`rtol`) takes the SVD fallback and the field stays smooth enough
    for an adaptive ODE solver.
    """

    problem: Problem
    damping: float = 0.0
    solver: str = eqx.field(static=True, default="auto")
    rtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_solver_name(self.solver)
        damping = static_real(self.damping)
        if damping is not None and not 0 <= damping < float("inf"):
            raise ValueError(f"damping must be >= 0 and finite, got {self.damping}")

    def __call__(self, t, params, args=None):
        direction, result, _ = output_metric_gradient(
            self.problem, params, damping=self.damping, solver=self.solver, rtol=self.rtol
        )
        return _flag_nonfinite(jax.tree_util.tree_map(lambda d: -d, direction), result)


class HomotopyFlow(AbstractFlow):
    r"""The homotopy between the standard and the adapted flow (2408.01517).

    $$V_\alpha = -\big[(1-\alpha)I + \alpha(D^\top D)^+\big]D^\top\nabla_x C
      = -(1-\alpha)\,D^\top\nabla_x C - \alpha\,D^+\nabla_x C, \qquad \alpha\in[0,1],$$

    using $(D^\top D)^+D^\top = D^+$. α = 0 is `StandardFlow`, α = 1 is `AdaptedFlow`. For
    every α the bracket is positive definite on range $D^\top$, and $D^+\nabla_x C = 0$ exactly when
    $D^\top\nabla_x C = 0$, so all $V_\alpha$ vanish at the same points, the critical points of C.

    `alpha` is a pytree leaf (it may be traced, e.g. vmapped over); `solver` and `rtol` pick
    the linear algebra of the $D^+$ part, as in `AdaptedFlow`.
    """

    problem: Problem
    alpha: float | Float[Array, ""]
    solver: str = eqx.field(static=True, default="auto")
    rtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_solver_name(self.solver)

    def __call__(self, t, params, args=None):
        direction, result, lin = output_metric_gradient(self.problem, params, solver=self.solver,
                                                        rtol=self.rtol)
        grad_x = self.problem.output_gradient(lin.outputs).reshape(-1)
        gradient = lin.unravel(lin.rmatvec(grad_x))  # D^T ∇ₓC = ∇_θ C from the same linearization
        alpha = jnp.asarray(self.alpha, lin.flat_params.dtype)
        velocity = jax.tree_util.tree_map(lambda g, d: -(1 - alpha) * g - alpha * d, gradient,
                                          direction)
        return _flag_nonfinite(velocity, result)


class InterpolationFlow(AbstractFlow):
    r"""The flow whose outputs interpolate linearly from x(θ₀) to a target (2408.01517).

    $$\frac{d\theta}{dt} = D(\theta)^+\,(x^\star - x(\theta_0)), \qquad t \in [0, 1].$$

    While the rank condition rank D = QN holds, $DD^+ = I$, so $\frac{dx}{dt} = x^\star - x(\theta_0)$ and
    $x(t) = (1-t)\,x(\theta_0) + t\,x^\star$: the flow reaches the target — for L² the global
    minimum $x^\star = y$ — at the finite time t = 1. It is the adapted flow reparametrised by
    $t = 1 - e^{-s/N}$. Without the rank condition the outputs move by the projection of the
    constant direction onto range D, and t = 1 is not a minimum in general.

    `displacement` is $x^\star - x(\theta_0)$, shape ``(N, Q)``; build the flow with
    `interpolation_flow`. `solver` and `rtol` as in `AdaptedFlow`.
    """

    problem: Problem
    displacement: Float[Array, "N Q"]
    solver: str = eqx.field(static=True, default="auto")
    rtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_solver_name(self.solver)

    def __call__(self, t, params, args=None):
        flat, _ = ravel_pytree(params)
        num_rows = self.problem.num_samples * self.problem.output_dim
        method = resolve_solver(self.solver, 0, num_rows, flat.shape[0], flat.dtype)
        lin = linearize(self.problem, params, method=method)
        result = solve(lin, self.displacement.reshape(-1), solver=method, rtol=self.rtol)
        return _flag_nonfinite(lin.unravel(result.delta), result)


def _flag_nonfinite(velocity: PyTree, result) -> PyTree:
    """NaN where the solve met non-finite data (it returns a zero δ then), so the ODE solver
    rejects the step and `integrate` reports it, instead of the flow silently standing still."""
    return jax.tree_util.tree_map(lambda v: jnp.where(result.finite, v, jnp.nan), velocity)


def standard_flow(problem: Problem) -> StandardFlow:
    r"""The standard gradient flow $\theta' = -\nabla_\theta C$ of `problem`; see `StandardFlow`."""
    _check_problem(problem)
    return StandardFlow(problem)


def adapted_flow(problem: Problem, *, damping: float = 0.0, solver: str = "auto",
                 rtol: float | None = None) -> AdaptedFlow:
    r"""The adapted flow $\theta' = -D^+\nabla_x C$ of `problem`; see `AdaptedFlow`.

    `damping` λ ≥ 0 gives $-D^\top(DD^\top + \lambda I)^{-1}\nabla_x C$; `rtol` in (0, 1) is the
    singular-value cut-off of the solve (use e.g. 1e-10 in float64 when κ(D) ≳ 1e12).
    """
    _check_problem(problem)
    check_nonnegative("damping", damping)
    check_rtol(rtol)
    return AdaptedFlow(problem, damping, solver, rtol)


def homotopy_flow(problem: Problem, alpha: float | Float[Array, ""], *,
                  solver: str = "auto", rtol: float | None = None) -> HomotopyFlow:
    r"""The homotopy $V_\alpha = -[(1-\alpha)I + \alpha(D^\top D)^+]D^\top\nabla_x C$; see `HomotopyFlow`.

    `alpha` ∈ [0, 1]: 0 gives the standard flow, 1 the adapted flow. A value outside [0, 1]
    is a ``ValueError``; a non-real one a ``TypeError``. `solver` and `rtol` as in
    `adapted_flow`.
    """
    _check_problem(problem)
    _check_rtol(rtol)
    if isinstance(alpha, bool) or not (
        isinstance(alpha, numbers.Real) or (hasattr(alpha, "dtype") and jnp.ndim(alpha) == 0
                                            and jnp.issubdtype(alpha.dtype, jnp.floating))
    ):
        raise TypeError(f"alpha must be a real number in [0, 1], got {alpha!r}")
    if not isinstance(alpha, jax.core.Tracer):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        # An array leaf, so integrations at different α share one compilation.
        alpha = jnp.asarray(alpha, dtype=jnp.result_type(float))
    return HomotopyFlow(problem, alpha, solver, rtol)


def interpolation_flow(problem: Problem, params0: PyTree, *, target: Array | None = None,
                       solver: str = "auto", rtol: float | None = None) -> InterpolationFlow:
    r"""The linear-interpolation flow $d\theta/dt = D^+(x^\star - x(\theta_0))$ from `params0`.

    **Arguments:**

    - `problem`: the problem.
    - `params0`: θ₀, the starting parameters (the flow is meant to be integrated from there).
    - `target`: $x^\star$, outputs of shape ``(N, Q)``; default the targets y of an L² problem.
      For `loss="cross_entropy"` the default is the minimiser of C on the fibre of $x(\theta_0)$,
      $x_j^\star = \log y_j - \mathrm{mean}(\log y_j)\mathbf 1 + (s_j(0)/Q)\mathbf 1$ with
      $s_j(0) = \langle\mathbf 1, x_j(\theta_0)\rangle$ (DESIGN §2; needs positive label entries).
    - `solver`, `rtol`: the linear algebra of $D^+$, as in `adapted_flow`.

    Integrate it over t ∈ [0, 1], e.g. ``integrate(problem, params0, flow=flow, t1=1.0)``: under
    the rank condition the outputs are $x(t) = (1-t)x(\theta_0) + t x^\star$ exactly.
    """
    _check_problem(problem)
    _check_rtol(rtol)
    check_params(params0)
    x0 = problem.outputs(params0)
    if target is None:
        if problem.loss == "l2":
            target = problem.targets
        elif problem.loss == "cross_entropy":
            labels = problem.targets.astype(x0.dtype)
            if not bool(jnp.all(labels > 0)):
                raise ValueError(
                    "the cross-entropy fibre minimiser needs label vectors with positive entries "
                    "(use label smoothing), or pass target explicitly"
                )
            log_y = jnp.log(labels)
            target = (log_y - jnp.mean(log_y, axis=-1, keepdims=True)
                      + jnp.mean(x0, axis=-1, keepdims=True))
        else:  # pragma: no cover - every loss in _loss.LOSSES is handled above
            raise ValueError(f"no default target for loss={problem.loss!r}; pass target")
    target = jnp.asarray(target)
    _check_finite("target", target)
    if target.shape != x0.shape:
        raise ValueError(f"target must have the outputs' shape {x0.shape}, got {target.shape}")
    if not jnp.issubdtype(target.dtype, jnp.floating):
        raise TypeError(f"target must be a floating point array, got dtype {target.dtype}")
    return InterpolationFlow(problem, (target - x0).astype(x0.dtype), solver, rtol)


_check_rtol = check_rtol
_check_problem = check_problem
