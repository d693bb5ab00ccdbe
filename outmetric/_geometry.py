r"""The geometry of the output metric: rank, spectrum, the horizontal/vertical split, lengths,
equilibria and the dimension of critical sets (DESIGN §2).

With $M = QN$ outputs and $K$ parameters, everything here is read off the output Jacobian
$D(\theta) \in \mathbb{R}^{M\times K}$ and the cost $C$:

- the **rank condition** rank D = min(M, K) and the regime it puts the flows in;
- the **sub-Riemannian split** $\mathbb{R}^K = H \oplus V$, $V = \ker D$ (vertical),
  $H = \operatorname{range} D^\top = V^\perp$ (horizontal), and lengths in the pull-back metric
  $g(u, v) = \langle Du, Dv\rangle$;
- **equilibria** $\{D^\top\nabla_x C = 0\}$ and the local dimension of the critical set, the
  nullity of the Hessian of C there.

The linear algebra with D goes through `outmetric._solve` (one solve for every caller); the
Hessian eigenvalues of `critical_dimension` are computed here, densely for small K and by
Lanczos (ARPACK) on Hessian-vector products otherwise.
"""

import math
import numbers
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._integrate import Trajectory
from ._problem import AbstractProblem, Problem, check_params
from ._solve import (
    SOLVERS,
    default_rtol,
    kept_singular_values,
    linearize,
    project_horizontal,
    resolve_solver,
    singular_values,
)
from ._validation import check_problem, check_rtol

#: Largest K for which `critical_dimension(method="auto")` forms the dense K×K Hessian.
DENSE_HESSIAN_MAX = 2000

REGIMES = ("overparametrised", "underparametrised", "rank-lost")


# ---------------------------------------------------------------------------- argument checks


_check_problem = check_problem
_check_rtol = check_rtol


def _check_nonnegative(value, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _check_solver(solver) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not a known solver; choose one of {list(SOLVERS)}")


def _check_tangent(params: PyTree, v: PyTree) -> None:
    """`v` must be a pytree with the structure, shapes and a floating dtype of `params`."""
    p_def = jax.tree_util.tree_structure(params)
    v_def = jax.tree_util.tree_structure(v)
    if p_def != v_def:
        raise TypeError(
            f"v must be a pytree shaped like params; params has structure {p_def}, v has {v_def}"
        )
    for (path, p), w in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves(v)):
        if jnp.shape(w) != jnp.shape(p):
            raise ValueError(
                f"v leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(w)}, params has "
                f"{jnp.shape(p)}"
            )
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise TypeError(
                f"v leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(w)}; tangent "
                "vectors must be floating point"
            )


def _sizes(problem: Problem, params: PyTree) -> tuple[int, int, jnp.dtype]:
    flat, _ = ravel_pytree(params)
    return problem.num_samples * problem.output_dim, flat.shape[0], flat.dtype


# ---------------------------------------------------------------------------- rank condition


@eqx.filter_jit
def _spectrum(problem: Problem, params: PyTree) -> Float[Array, " r"]:
    return singular_values(linearize(problem, params, method="svd"))


def jacobian_spectrum(problem: Problem, params: PyTree) -> Float[Array, " r"]:
    r"""The singular values of the output Jacobian, $\sigma_1 \ge \dots \ge \sigma_r \ge 0$.

    $D(\theta) \in \mathbb{R}^{QN\times K}$ as in `Problem.linearize`; $r = \min(QN, K)$. The
    rank condition of DESIGN §2 is $\sigma_r > 0$; $\sigma_r$ is the speed limit of the adapted
    flow ($\|D^+\| = 1/\sigma_r$) and $\sigma_1^2/\sigma_r^2$ the condition number of the Gram
    matrix $DD^\top$ (or $D^\top D$) that the solve factors.

    **Arguments:**

    - `problem`: the `Problem`.
    - `params`: θ, the parameter pytree.

    **Returns:** a float array of shape ``(min(QN, K),)``, in descending order (a dense SVD,
    `jax.numpy.linalg.svd`, of the Jacobian). Jit-compatible.
    """
    _check_problem(problem)
    check_params(params)
    return _spectrum(problem, params)


def numerical_rank(problem: Problem, params: PyTree, rtol: float | None = None) -> Int[Array, ""]:
    r"""The numerical rank of D: the number of singular values $\sigma_i > \mathrm{rtol}\cdot\sigma_1$.

    **Arguments:**

    - `problem`, `params`: the problem and θ.
    - `rtol`: relative cut-off in [0, 1); default $\max(QN, K)\cdot\varepsilon$ (as
      `numpy.linalg.matrix_rank`), the same cut-off the solve uses for its rank estimate and
      its pseudo-inverse, so the rank here is the one the flows act on.

    **Returns:** an integer scalar array. D = 0 has rank 0.
    """
    _check_problem(problem)
    check_params(params)
    _check_rtol(rtol)
    num_rows, num_params, dtype = _sizes(problem, params)
    rtol = default_rtol(num_rows, num_params, dtype) if rtol is None else rtol
    return jnp.sum(kept_singular_values(_spectrum(problem, params), rtol)).astype(jnp.int32)


class Regime(NamedTuple):
    """Which case of DESIGN §2 the flows are in at θ; `str(regime)` says it in words.

    - `name`: ``"overparametrised"`` (rank D = QN ≤ K), ``"underparametrised"``
      (rank D = K < QN) or ``"rank-lost"`` (rank D < min(QN, K)).
    - `rank`: the numerical rank of D.
    - `num_outputs`: QN. `num_params`: K.
    - `smallest_singular_value`: $\\sigma_{\\min(QN,K)}$; `largest_singular_value`: $\\sigma_1$.
    """

    name: str
    rank: int
    num_outputs: int
    num_params: int
    smallest_singular_value: float
    largest_singular_value: float

    @property
    def description(self) -> str:
        """The regime and what it means for the adapted flow, in one sentence or two."""
        m, k, r = self.num_outputs, self.num_params, self.rank
        s_min, s_max = self.smallest_singular_value, self.largest_singular_value
        if self.name == "overparametrised":
            return (
                f"overparametrised: rank D = QN = {m} <= K = {k} (sigma_min = {s_min:.3g}, "
                f"sigma_max = {s_max:.3g}); the rank condition holds, the adapted flow moves the "
                "outputs by x' = -grad_x C and C(s) = exp(-2s/N) C(0)."
            )
        if self.name == "underparametrised":
            return (
                f"underparametrised: rank D = K = {k} < QN = {m} (sigma_min = {s_min:.3g}, "
                f"sigma_max = {s_max:.3g}); the outputs move by the projected gradient "
                "x' = -P grad_x C and C does not increase, with no global-minimum guarantee."
            )
        return (
            f"rank-lost: rank D = {r} < min(QN, K) = {min(m, k)} (QN = {m}, K = {k}, "
            f"sigma_min/sigma_max = {s_min / s_max if s_max > 0 else 0.0:.3g}); the pseudo-inverse "
            "flow x' = -P_range(D) grad_x C may stop at an equilibrium above the global minimum."
        )

    def __str__(self) -> str:
        return self.description


def regime(problem: Problem, params: PyTree, rtol: float | None = None) -> Regime:
    r"""Classify θ by the rank condition: over- or underparametrised, or rank lost.

    With $M = QN$ and $r$ = `numerical_rank(problem, params, rtol)`:

    - ``"overparametrised"`` when $r = M \le K$: $D^+ = D^\top(DD^\top)^{-1}$, $x' = -\nabla_x C$;
    - ``"underparametrised"`` when $r = K < M$: $D^+ = (D^\top D)^{-1}D^\top$, $x' = -P\nabla_xC$;
    - ``"rank-lost"`` when $r < \min(M, K)$: only the pseudo-inverse flow is defined.

    **Arguments:** as `numerical_rank`.

    **Returns:** a `Regime`; `str()` of it describes the regime in words. Not jit-compatible
    (it returns Python numbers).
    """
    _check_problem(problem)
    check_params(params)
    _check_rtol(rtol)
    num_rows, num_params, dtype = _sizes(problem, params)
    rtol = default_rtol(num_rows, num_params, dtype) if rtol is None else rtol
    spectrum = _spectrum(problem, params)
    rank = int(jnp.sum(kept_singular_values(spectrum, rtol)))
    if rank < min(num_rows, num_params):
        name = "rank-lost"
    elif num_rows <= num_params:
        name = "overparametrised"
    else:
        name = "underparametrised"
    return Regime(name, rank, num_rows, num_params, float(spectrum[-1]), float(spectrum[0]))


# ---------------------------------------------------------------------------- sub-Riemannian split


@eqx.filter_jit
def _horizontal(problem: Problem, params: PyTree, v: PyTree, solver: str, rtol) -> PyTree:
    flat_v, _ = ravel_pytree(v)
    num_rows, num_params, dtype = _sizes(problem, params)
    method = resolve_solver(solver, 0, num_rows, num_params, dtype)
    lin = linearize(problem, params, method=method)
    return lin.unravel(project_horizontal(lin, flat_v.astype(dtype), solver=method, rtol=rtol))


def horizontal(problem: Problem, params: PyTree, v: PyTree, *, solver: str = "auto",
               rtol: float | None = None) -> PyTree:
    r"""The horizontal part of a tangent vector: its projection onto $H = \operatorname{range}D^\top$.

    $$v_H = D^+D\,v,$$

    the orthogonal projection onto $(\ker D)^\perp$. The pull-back metric
    $g(u, v) = \langle Du, Dv\rangle$ is an inner product on H (under the rank condition), and
    the adapted velocity $-D^+\nabla_x C$ lies in H. Computed by one `outmetric._solve.solve`
    with right-hand side $Dv$.

    **Arguments:**

    - `problem`, `params`: the problem and θ.
    - `v`: a tangent vector, a pytree shaped like `params`.
    - `solver`: the linear algebra, as in `adapted_flow` (default QR, dense).
    - `rtol`: the singular-value cut-off for rank loss (default as `numerical_rank`): directions
      whose singular value is below it count as vertical.

    **Returns:** $v_H$, a pytree shaped like `params`. Jit-compatible.
    """
    _check_problem(problem)
    check_params(params)
    _check_tangent(params, v)
    _check_solver(solver)
    _check_rtol(rtol)
    return _horizontal(problem, params, v, solver, rtol)


def vertical(problem: Problem, params: PyTree, v: PyTree, *, solver: str = "auto",
             rtol: float | None = None) -> PyTree:
    r"""The vertical part of a tangent vector: its projection onto $V = \ker D$.

    $$v_V = v - D^+D\,v,$$

    so that $Dv_V = 0$: moving along $v_V$ leaves every output unchanged to first order (the
    fibre directions of θ ↦ x(θ)), and $v = v_H + v_V$ with $v_H \perp v_V$. Arguments and
    returns as `horizontal`.
    """
    _check_problem(problem)
    check_params(params)
    _check_tangent(params, v)
    _check_solver(solver)
    _check_rtol(rtol)
    v_h = _horizontal(problem, params, v, solver, rtol)
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a) - b, v, v_h)


@eqx.filter_jit
def _path_outputs(problem: Problem, path: PyTree) -> Float[Array, "S M"]:
    x = jax.vmap(problem.outputs)(path)
    return x.reshape(x.shape[0], -1)


def pullback_length(problem: Problem, trajectory: Trajectory, *,
                    cumulative: bool = False) -> Float[Array, ""] | Float[Array, " S"]:
    r"""The length of a saved path θ(s) in the pull-back metric $g(u, v) = \langle Du, Dv\rangle$.

    $$L = \int_{s_0}^{s_1} \|D(\theta(s))\,\theta'(s)\|\,ds
        = \int_{s_0}^{s_1} \Big\|\frac{d}{ds}\,x(\theta(s))\Big\|\,ds,$$

    because $D\theta' = (x\circ\theta)'$ by the chain rule: the g-length of any parameter path
    is the Euclidean length of its output path. It is computed as the length of the polygon
    through the saved outputs, $\sum_i \|x(s_{i+1}) - x(s_i)\|$, for these reasons:

    - it is **exact for straight output paths**, whatever the grid: the adapted flow with the
      rank condition ($x(s) - y = e^{-s/N}(x(0) - y)$) and the interpolation flow move the
      outputs along a segment, and then $L = \|x(s_0) - y\| - \|x(s_1) - y\|$ to the accuracy
      of the saved points (the ODE tolerance), with no quadrature error — a trapezoid rule on
      $\|D\theta'\|$ would add an $O(h^2)$ error there;
    - for a curved output path it is an inscribed polygon: a lower bound that converges at
      second order, with error about $\frac{1}{24}\int\kappa^2\|x'\|^3h^2\,ds$ for step h and
      curvature κ; save more points (`integrate(..., num_saves=)`) to tighten it;
    - it needs one forward pass per saved point, no Jacobian and no flow evaluation, so it
      applies to a `Trajectory` of any flow.

    **Arguments:**

    - `problem`: the `Problem` the trajectory was computed for.
    - `trajectory`: an `outmetric.Trajectory` (from `integrate`).
    - `cumulative`: if True, return the length from the first saved time to each saved time.

    **Returns:** a scalar, or with `cumulative=True` an array of shape ``(S,)`` starting at 0.
    """
    _check_problem(problem)
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"trajectory must be an outmetric.Trajectory, got {type(trajectory).__name__}"
        )
    if not isinstance(cumulative, bool):
        raise TypeError(f"cumulative must be True or False, got {cumulative!r}")
    x = _path_outputs(problem, trajectory.params)
    steps = jnp.linalg.norm(jnp.diff(x, axis=0), axis=-1)
    if cumulative:
        return jnp.concatenate([jnp.zeros(1, steps.dtype), jnp.cumsum(steps)])
    return jnp.sum(steps)


# ---------------------------------------------------------------------------- equilibria


@eqx.filter_jit
def _stationarity(problem: Problem, params: PyTree):
    lin = linearize(problem, params, method="qr")
    grad_x = problem.output_gradient(lin.outputs).reshape(-1)
    grad_theta = lin.rmatvec(grad_x)
    norm_d = jnp.linalg.norm(lin.jacobian)  # Frobenius, ≥ σ_1
    targets = problem.targets.astype(grad_x.dtype)
    output_scale = (jnp.linalg.norm(lin.outputs) + jnp.linalg.norm(targets)) / problem.num_samples
    return jnp.linalg.norm(grad_theta), norm_d * jnp.linalg.norm(grad_x), norm_d * output_scale


def is_equilibrium(problem: Problem, params: PyTree, *, tol: float | None = None,
                   atol: float | None = None) -> Bool[Array, ""]:
    r"""Whether θ is an equilibrium of the flows: $D^\top\nabla_x C = \nabla_\theta C \approx 0$.

    Every flow of DESIGN §2 (standard, adapted, homotopy) vanishes exactly on this set. The test
    is relative to the size the gradient would have without cancellation,

    $$\|D^\top\nabla_x C\|_2 \le \mathrm{tol}\cdot\|D\|_F\,\|\nabla_x C\|_2 + \mathrm{atol},$$

    which reads "∇ₓC is orthogonal to range D up to tol" and does not depend on the scale of
    the model or the data. `atol` is the round-off floor, so that a global minimum whose
    residual is round-off noise counts as an equilibrium.

    **Arguments:**

    - `problem`, `params`: the problem and θ.
    - `tol`: relative tolerance, default $\sqrt{\varepsilon}$ (1.5e-8 in float64, 3.5e-4 in
      float32). A point returned by an integrator is stationary only to about its tolerance;
      polish it (a few Newton or Gauss–Newton steps) or loosen `tol`.
    - `atol`: absolute tolerance on $\|D^\top\nabla_x C\|_2$; default
      $\max(QN, K)\,\varepsilon\,\|D\|_F\,(\|x\| + \|y\|)/N$, the round-off in evaluating it.

    **Returns:** a boolean scalar array. Jit-compatible.
    """
    _check_problem(problem)
    check_params(params)
    _check_nonnegative(tol, "tol")
    _check_nonnegative(atol, "atol")
    num_rows, num_params, dtype = _sizes(problem, params)
    eps = float(jnp.finfo(dtype).eps)
    tol = math.sqrt(eps) if tol is None else tol
    grad_norm, relative_scale, roundoff_scale = _stationarity(problem, params)
    if atol is None:
        atol = max(num_rows, num_params) * eps * roundoff_scale
    return grad_norm <= tol * relative_scale + atol


@eqx.filter_jit
def _dense_hessian_eigenvalues(problem: Problem, params: PyTree) -> Float[Array, " K"]:
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: problem.cost(unravel(f)))(flat)
    return jnp.linalg.eigvalsh(0.5 * (hessian + hessian.T))


def _lanczos_nullity(problem: Problem, params: PyTree, tol: float) -> int:
    """K − #{|λ| > tol·|λ|_max} from the largest-magnitude eigenvalues, found in growing blocks."""
    import scipy.sparse.linalg as spla

    flat, unravel = ravel_pytree(params)
    num_params = flat.shape[0]
    # Hessian-vector products v ↦ Hv by forward-over-reverse differentiation (jax.jvp of
    # jax.grad), linearised once at θ and compiled; the K×K Hessian is never formed.
    _, hvp = jax.linearize(jax.grad(lambda f: problem.cost(unravel(f))), flat)
    hvp = jax.jit(hvp)
    dtype = np.dtype(flat.dtype)
    operator = spla.LinearOperator(
        (num_params, num_params), dtype=dtype,
        matvec=lambda v: np.asarray(hvp(jnp.asarray(np.ravel(v), flat.dtype)), dtype),
    )
    start = np.random.default_rng(0).standard_normal(num_params).astype(dtype)
    num_rows = problem.num_samples * problem.output_dim
    # At a global minimum of L², H = DᵀD/N has rank ≤ QN: a block of 2·QN sees its null space.
    k = min(num_params - 1, max(2 * num_rows + 2, 16))
    while True:
        try:
            values = spla.eigsh(operator, k=k, which="LM", v0=start, tol=0,
                                return_eigenvectors=False)
        except spla.ArpackNoConvergence as err:  # pragma: no cover - depends on ARPACK
            raise RuntimeError(
                f"critical_dimension: Lanczos (ARPACK) did not converge for {k} eigenvalues of "
                "the K×K Hessian; try method='dense'"
            ) from err
        magnitudes = np.abs(values)
        cutoff = tol * magnitudes.max()
        if magnitudes.min() <= cutoff:  # the block reaches into the null space
            return num_params - int(np.sum(magnitudes > cutoff))
        if k == num_params - 1:  # nullity ≤ 1 and eigsh cannot return all K values
            return _dense_nullity(problem, params, tol)
        k = min(2 * k, num_params - 1)


def _dense_nullity(problem: Problem, params: PyTree, tol: float) -> int:
    magnitudes = np.abs(np.asarray(_dense_hessian_eigenvalues(problem, params)))
    return int(np.sum(magnitudes <= tol * magnitudes.max()))


def critical_dimension(problem: Problem, params: PyTree, *, tol: float | None = None,
                       method: str = "auto", check: bool = True) -> int:
    r"""The local dimension of the critical set at a critical point θ: nullity of $\nabla^2_\theta C$.

    The critical set $\{D^\top\nabla_x C = 0\}$ is generically a submanifold, not isolated
    points (DESIGN §2). Its tangent space at θ lies in the kernel of the Hessian
    $\nabla^2_\theta C(\theta)$, the derivative of θ ↦ $D^\top\nabla_x C$; for L²,

    $$\nabla^2_\theta C = \tfrac1N D^\top D
        + \tfrac1N\sum_{j,q}(x_{j,q} - y_{j,q})\,\nabla^2_\theta x_{j,q}.$$

    This function returns $\dim\ker\nabla^2_\theta C$, which **is** the dimension of the critical
    set when that set is a clean (Morse–Bott) critical manifold and an upper bound for it
    otherwise. At a global minimum of an overparametrised L² fit with rank D = QN the Hessian
    is $D^\top D/N$ and the answer is $K - QN$, the dimension of the fibre $\{x(\theta) = y\}$.

    **Arguments:**

    - `problem`, `params`: the problem and a critical point θ.
    - `tol`: an eigenvalue λ of the Hessian counts as zero when $|\lambda| \le
      \mathrm{tol}\cdot\max_i|\lambda_i|$. Default $\sqrt\varepsilon$ (1.5e-8 in float64): far
      above the round-off of the Hessian (~K·ε), and far below the curvature that genuine
      directions of a well-conditioned fit have; at a point known only to accuracy δ the null
      eigenvalues are O(δ), so polish the critical point first.
    - `method`: ``"dense"`` (the K×K Hessian by `jax.hessian`, eigenvalues by `eigvalsh`),
      ``"lanczos"`` (Hessian-vector products, `jax.jvp` of `jax.grad`, fed to
      `scipy.sparse.linalg.eigsh`; the largest-magnitude eigenvalues are computed in blocks of
      growing size until one reaches below the cut-off, so the cost grows with the rank of the
      Hessian rather than K), or ``"auto"``: dense for K ≤ 2000.
    - `check`: warn (``RuntimeWarning``) when θ does not pass `is_equilibrium`, where the
      nullity means nothing about critical sets.

    **Returns:** a Python int in [0, K].
    """
    _check_problem(problem)
    check_params(params)
    _check_nonnegative(tol, "tol")
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method={method!r} is not known; choose 'auto', 'dense' or 'lanczos'")
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    _, num_params, dtype = _sizes(problem, params)
    tol = math.sqrt(float(jnp.finfo(dtype).eps)) if tol is None else tol
    if check and not bool(is_equilibrium(problem, params)):
        warnings.warn(
            "critical_dimension: params is not an equilibrium (D^T grad_x C is not ~0), so the "
            "Hessian nullity is not the dimension of a critical set",
            RuntimeWarning, stacklevel=2,
        )
    if method == "auto":
        method = "dense" if num_params <= DENSE_HESSIAN_MAX else "lanczos"
    if method == "dense" or num_params < 3:  # eigsh needs 1 ≤ k < K
        return _dense_nullity(problem, params, tol)
    return _lanczos_nullity(problem, params, tol)
