"""`fit`: a compiled training loop for any optax optimizer on a `Problem`, full-batch or mini-batch."""

import math
from typing import Any, Callable, Iterable, NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree
from tqdm.auto import tqdm

from ._problem import Problem, check_params
from ._transform import GRADIENT_FREE, output_metric_descent


class FitResult(NamedTuple):
    """What `fit` returns.

    - `params`, `state`: the final parameters and optimizer state.
    - `costs`: C at the start of each step and at the end, shape `(num_steps + 1,)` (for the
      mini-batch form: each batch's cost before its step).
    - `num_steps`: optimizer steps taken.
    - `converged`: whether C ≤ `eps` was reached (False without `eps`).
    """

    params: PyTree
    state: Any
    costs: np.ndarray
    num_steps: int
    converged: bool


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite cost or parameters; `.result` holds the last finite state."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


_DEFAULT_OPTIMIZER: list = []


def _default_optimizer():
    """One shared `output_metric_descent()`, so repeated `fit` calls reuse the compiled loop."""
    if not _DEFAULT_OPTIMIZER:
        _DEFAULT_OPTIMIZER.append(output_metric_descent())
    return _DEFAULT_OPTIMIZER[0]


def _uses_gradient(optimizer) -> bool:
    try:
        return optimizer.update not in GRADIENT_FREE
    except TypeError:
        return True


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _step(optimizer, problem, params, state, use_grad):
    """One optimizer step: (cost before, new params, new state, finite?)."""
    if use_grad:
        cost, grads = jax.value_and_grad(problem.cost)(params)
    else:
        cost = problem.cost(params)
        grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, new_state = optimizer.update(grads, state, params, problem=problem)
    new_params = optax.apply_updates(params, updates)
    finite = _all_finite(new_params) & jnp.isfinite(cost)
    return cost, new_params, new_state, finite


@eqx.filter_jit
def _run_chunk(optimizer, problem, params, state, num, eps, use_grad, chunk):
    """Up to `num` ≤ `chunk` steps in one compiled `while_loop`; stops at C ≤ eps or non-finite.

    Returns (steps taken, params, state, costs before each step (length `chunk`), done, bad).
    Only `chunk` is static, so every chunk of every `fit` call with that chunk size reuses one
    compilation.
    """
    dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
    costs = jnp.full(chunk, jnp.nan, dtype)

    def cond(carry):
        i, _, _, _, done, bad = carry
        return (i < num) & ~done & ~bad

    def body(carry):
        i, params, state, costs, _, _ = carry
        cost, new_params, new_state, finite = _step(optimizer, problem, params, state, use_grad)
        costs = costs.at[i].set(cost)
        done = cost <= eps
        keep = done | ~finite  # at eps, or about to go non-finite: stay where we are
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), params, new_params)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), state, new_state)
        return i + jnp.where(keep, 0, 1), params, state, costs, done, ~finite & ~done

    init = (jnp.asarray(0), params, state, costs, jnp.asarray(False), jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)


def fit(
    problem: Problem,
    params: PyTree,
    optimizer: optax.GradientTransformation | None = None,
    *,
    eps: float | None = None,
    max_steps: int = 1000,
    callback: Callable[[int, PyTree, Any, float], Any] | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    batches: Iterable | None = None,
) -> FitResult:
    """Train `params` on `problem` with an optax optimizer (default `output_metric_descent()`).

    The loop is compiled once: chunks of steps run inside one `lax.while_loop`, and between
    chunks the progress bar and `callback` run on the host. Each step calls
    ``optimizer.update(grads, state, params, problem=problem)``; `grads` is the ordinary
    gradient of C, except for outmetric's own transformations, which ignore it (zeros are passed
    and the backward pass is skipped).

    **Arguments:**

    - `problem`, `params`: the problem and initial parameters.
    - `optimizer`: any `optax.GradientTransformation` that accepts the `problem` extra arg
      (wrap plain optax optimizers with `optax.with_extra_args_support`; `fit` does it for you).
    - `eps`: stop once C ≤ eps (for `batches`: once a batch's cost is ≤ eps).
    - `max_steps`: step budget.
    - `callback`: `callback(step, params, state, cost)` after each chunk; return True to stop.
    - `progress`: show a tqdm bar.
    - `chunk_size`: steps per compiled chunk (default 10); the host checks in between.
    - `batches`: an iterable of `(inputs, targets)` mini-batches for the stochastic adapted
      method: one step (one solve) per batch on `problem.with_data(inputs, targets)`.

    **Returns:** a `FitResult`. A non-finite cost or parameters raise `NonFiniteError`, whose
    `.result` holds the last finite parameters and state, so nothing is lost.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an outmetric.Problem, got {type(problem).__name__}")
    check_params(params)
    if optimizer is None:
        optimizer = _default_optimizer()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not eps > 0 or not math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable: callback(step, params, state, cost)")
    use_grad = _uses_gradient(optimizer)
    optimizer = optax.with_extra_args_support(optimizer)
    state = optimizer.init(params)
    if batches is not None:
        return _fit_batches(problem, params, optimizer, state, eps, max_steps, callback, progress,
                            batches, use_grad)

    dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
    eps_value = jnp.asarray(-jnp.inf if eps is None else eps, dtype)
    chunk = chunk_size or 10
    history: list[float] = []
    bar = tqdm(total=max_steps, disable=not progress, desc="fit", unit="step")
    step, done, bad, stopped = 0, False, False, False
    try:
        while step < max_steps and not (done or bad or stopped):
            num = min(chunk, max_steps - step)
            taken, params, state, costs, done_c, bad_c = _run_chunk(
                optimizer, problem, params, state, jnp.asarray(num), eps_value, use_grad, chunk
            )
            taken, done, bad = int(taken), bool(done_c), bool(bad_c)
            costs = np.asarray(costs)
            history.extend(costs[:taken].tolist())
            if done:
                history.append(float(costs[taken]))
            bar.update(taken)
            step += taken
            last = history[-1] if history else float("nan")
            bar.set_postfix(cost=f"{last:.3e}")
            if callback is not None and callback(step, params, state, last):
                stopped = True
    finally:
        bar.close()
    if not done:
        history.append(float(problem.cost(params)))
    history = np.asarray(history)
    final_cost = float(history[-1])
    result = FitResult(params, state, history, step, bool(eps is not None and final_cost <= eps))
    if bad:
        raise NonFiniteError(
            f"fit: step {step} produced a non-finite cost or parameters; stopped with the last "
            "finite parameters in error.result (use optax.apply_if_finite to skip such steps)",
            result,
        )
    return result


def _fit_batches(problem, params, optimizer, state, eps, max_steps, callback, progress, batches,
                 use_grad):
    step_fn = eqx.filter_jit(lambda prob, p, s: _step(optimizer, prob, p, s, use_grad))
    costs = []
    converged = False
    bar = tqdm(total=max_steps, disable=not progress, desc="fit", unit="batch")
    try:
        for batch in batches:
            if len(costs) >= max_steps:
                break
            try:
                inputs, targets = batch
            except (TypeError, ValueError):
                raise TypeError("batches must yield (inputs, targets) pairs") from None
            batch_problem = problem.with_data(inputs, targets)
            cost, new_params, new_state, finite = step_fn(batch_problem, params, state)
            cost = float(cost)
            if eps is not None and cost <= eps:
                costs.append(cost)
                converged = True
                break
            if not bool(finite):
                raise NonFiniteError(
                    f"fit: batch {len(costs)} produced a non-finite cost or parameters",
                    FitResult(params, state, np.asarray(costs), len(costs), False),
                )
            params, state = new_params, new_state
            costs.append(cost)
            bar.update(1)
            bar.set_postfix(cost=f"{cost:.3e}")
            if callback is not None and callback(len(costs), params, state, cost):
                break
    finally:
        bar.close()
    steps = len(costs) - (1 if converged else 0)
    return FitResult(params, state, np.asarray(costs), steps, converged)
