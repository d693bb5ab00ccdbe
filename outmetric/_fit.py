"""`fit`: a compiled training loop for any optax optimizer on a `Problem`, full-batch or
mini-batch, that never returns non-finite parameters as a success and can checkpoint and resume."""

import contextlib
import functools
import hashlib
import itertools
import math
import os
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from ._checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    CheckpointLock,
    check_fingerprint,
    check_overwritable,
    check_writable,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from ._errors import NonFiniteError
from ._masking import discards_upstream
from ._problem import (
    AbstractProblem,
    check_params,
    nonfinite_cost_message,
    params_dtype,
    static_real,
)
from ._results import RESULTS
from ._transform import (
    GRADIENT_FREE,
    OutputMetricDescentState,
    ScaleByOutputMetricState,
    output_metric_descent,
)
from ._validation import check_problem

__all__ = ["FitResult", "NonFiniteError", "fit"]


class FitResult(NamedTuple):
    """What `fit` returns.

    - `params`, `state`: the final parameters and optimizer state.
    - `costs`: C at the start of each step and at the end, shape `(num_steps + 1,)` (for the
      mini-batch form: each batch's cost before its step).
    - `num_steps`: optimizer steps taken (including those before a resumed checkpoint).
    - `converged`: whether the run ended on a convergence code of `status` (C ≤ `eps`, or the
      optimizer's ftol, xtol or gtol test).
    - `fallback_steps`: how many steps' output-metric solves fell back to the rank-revealing
      SVD because the Gram matrix was singular or too ill-conditioned for its factorization
      (0 for optimizers without an output-metric solve).
    - `min_rank`: the smallest rank of D that those solves estimated (-1: none estimated).
      Under damping the Cholesky estimate counts the directions λ props up; build the
      optimizer with ``track_min_singular_value=True`` for a rank from the Gram eigenvalues.
    - `resumed_from`: the step of the checkpoint this run resumed from (0 for a fresh run).
    - `min_singular_values`: σ_min(D) at each step, shape `(num_steps,)`, from optimizers
      built with ``track_min_singular_value=True`` (-1 where not estimated): watch it fall to
      see a rank loss coming.
    - `status`: why the run ended, an `outmetric.RESULTS` member (`eps_reached`,
      `ftol_reached`, `xtol_reached`, `gtol_reached`, `stalled`, `max_steps_reached`,
      `stopped_by_callback`, or `nonfinite` on the result a `NonFiniteError` carries);
      `message` says it in words.
    """

    params: PyTree
    state: Any
    costs: np.ndarray
    num_steps: int
    converged: bool
    fallback_steps: int = 0
    min_rank: int = -1
    resumed_from: int = 0
    min_singular_values: np.ndarray | None = None
    status: RESULTS = RESULTS.running

    @property
    def message(self) -> str:
        """Why the run ended, in words (`status.message`)."""
        return self.status.message


_DEFAULT_OPTIMIZERS: dict = {}

#: `gram_average` of `fit`'s default optimizer when `batches` redraws the data every step.
BATCH_GRAM_AVERAGE = 0.3


def _default_optimizer(batches: bool = False):
    """One shared default optimizer per mode, so repeated `fit` calls reuse the compiled loop:
    `output_metric_descent()` on fixed data; with `batches`,
    `output_metric_descent(gram_average=BATCH_GRAM_AVERAGE)` (the Gram averaged over the
    batches, light damping and ENGD's line search on each batch: on the 5-D Poisson PINN with
    points redrawn every step, L² error 1e-6 at 160 steps and 1e-7 at 380, where the trust
    region is near 1e-5 after 350)."""
    if batches not in _DEFAULT_OPTIMIZERS:
        _DEFAULT_OPTIMIZERS[batches] = (
            output_metric_descent(gram_average=BATCH_GRAM_AVERAGE) if batches
            else output_metric_descent())
    return _DEFAULT_OPTIMIZERS[batches]


def _uses_gradient(optimizer) -> bool:
    try:
        return optimizer.update not in GRADIENT_FREE
    except TypeError:
        return True


def _discards(update) -> bool:
    try:
        return update in GRADIENT_FREE
    except TypeError:  # an unhashable callable
        return False


def _prepare(optimizer) -> tuple[optax.GradientTransformationExtraArgs, bool]:
    """(the optimizer with extra-args support, whether it uses ∇C), after the chain check;
    remembered for the last 64 optimizers (a tiny fit's checks cost as much as its steps)."""
    try:
        return _prepare_cached(optimizer)
    except TypeError:  # an unhashable optimizer
        return _prepare_uncached(optimizer)


def _prepare_uncached(optimizer):
    use_grad = bool(_uses_gradient(optimizer))
    _warn_discarded_upstream(optimizer)
    return optax.with_extra_args_support(optimizer), use_grad


_prepare_cached = functools.lru_cache(maxsize=64)(_prepare_uncached)


def _warn_discarded_upstream(optimizer) -> None:
    """A warning when transformations run before output-metric descent in a chain: it computes
    its step from the problem and discards the updates it receives, so their work is lost."""
    if discards_upstream(optimizer, _discards):
        warnings.warn(
            "fit: the optimizer chains transformations before output_metric_descent (or "
            "scale_by_output_metric), e.g. optax.chain(optax.clip_by_global_norm(1.0), "
            "output_metric_descent()); it computes its step from the problem and discards the "
            "updates it receives, so those transformations have no effect. Put them after it "
            "(optax.chain(output_metric_descent(), optax.clip_by_global_norm(1.0)) clips the "
            "output-metric step)", UserWarning, stacklevel=3)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _is_solve_state(x) -> bool:
    return isinstance(x, (OutputMetricDescentState, ScaleByOutputMetricState))


def _solve_report(state) -> tuple[jax.Array, ...]:
    """(any SVD fallback, smallest rank estimate or -1, smallest σ_min(D) or -1, all solves
    finite, termination status) over the outmetric states inside `state`; the status is the
    largest `RESULTS` code of the `output_metric_descent` states (`running` if none).

    Finds `OutputMetricDescentState`/`ScaleByOutputMetricState` however the optimizer nests
    them (`optax.chain`, `inject_hyperparams`, `apply_if_finite`, ...).
    """
    states = [s for s in jax.tree_util.tree_leaves(state, is_leaf=_is_solve_state)
              if _is_solve_state(s)]
    running = jnp.asarray(RESULTS.running, jnp.int32)
    if not states:
        return (jnp.asarray(False), jnp.asarray(-1, jnp.int32), jnp.asarray(-1.0),
                jnp.asarray(True), running)
    fallback = jnp.any(jnp.stack([jnp.asarray(s.fallback, bool) for s in states]))
    ranks = jnp.stack([jnp.asarray(s.rank, jnp.int32) for s in states])
    known = ranks >= 0
    rank = jnp.where(jnp.any(known), jnp.min(jnp.where(known, ranks, jnp.iinfo(jnp.int32).max)), -1)
    sigmas = jnp.stack([jnp.asarray(s.min_singular_value) for s in states])
    seen = sigmas >= 0
    sigma = jnp.where(jnp.any(seen), jnp.min(jnp.where(seen, sigmas, jnp.inf)), -1.0)
    finite = jnp.all(jnp.stack([jnp.asarray(s.finite, bool) for s in states]))
    codes = [jnp.asarray(s.status, jnp.int32) for s in states
             if isinstance(s, OutputMetricDescentState)]
    status = jnp.max(jnp.stack(codes)) if codes else running
    return fallback, rank.astype(jnp.int32), sigma, finite, status


def _merge_rank(current, new):
    """The smaller of two rank estimates, where -1 means 'none yet'."""
    return jnp.where(current < 0, new, jnp.where(new < 0, current, jnp.minimum(current, new)))


def _step(optimizer, problem, params, state, use_grad):
    """One optimizer step on a freshly drawn batch: (cost before, new params, new state, new
    params finite?).

    The update is told ``fresh_data=True`` (the batch is not the one the state was last
    updated on; `output_metric_descent` then leaves out its geodesic acceleration). A
    `output_metric_descent` records C(θ) in its state (`OutputMetricDescentState.cost`), which
    is then the cost; it is not evaluated a second time."""
    if use_grad:
        cost, grads = jax.value_and_grad(problem.cost)(params)
    else:
        cost = None
        grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, new_state = optimizer.update(grads, state, params, problem=problem,
                                          full_params=params, fresh_data=True)
    if cost is None:
        recorded = _recorded_cost(new_state)
        cost = problem.cost(params) if recorded is None else recorded
    new_params = optax.apply_updates(params, updates)
    return cost, new_params, new_state, _all_finite(new_params)


def _recorded_cost(state):
    """C before the update when `state` is an `OutputMetricDescentState` (the optimizer is
    `output_metric_descent` itself, not a chain or wrapper that might keep an older state),
    else None."""
    return state.cost if isinstance(state, OutputMetricDescentState) else None


def _select(flag, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)


def _values(problem, params, use_grad):
    """(C(params), ∇C(params) or None): what a step needs at its params."""
    if use_grad:
        return jax.value_and_grad(problem.cost)(params)
    return problem.cost(params), None


@functools.lru_cache(maxsize=64)
def _compiled_chunk(optimizer, use_grad: bool, chunk: int) -> Callable:
    """`_run_chunk` for one optimizer, gradient use and chunk length, under `jax.jit`.

    The optimizer (a tuple of functions, not a pytree of arrays) is closed over, so each call
    goes through jit's C++ dispatch path (tens of microseconds) rather than equinox's
    pytree-filtering wrapper; on a tiny fit that dispatch is most of the wall time. The cache
    holds the optimizers of the last 64 configurations."""
    return jax.jit(functools.partial(_run_chunk, optimizer, use_grad=use_grad, chunk=chunk))


def _run_chunk(optimizer, problem, carry, num, eps, *, use_grad, chunk):
    """Up to `num` ≤ `chunk` steps in one compiled `while_loop`.

    `carry` is (params, state, cost, grads, fallbacks, min_rank): the cost C(params) (finite)
    and, for optimizers that use it, the gradient there (else None), evaluated where the step
    to params was judged. Each step is judged by its candidate: the new params are taken only
    if they are finite, the solve met no NaN or inf, and C is finite there; C and ∇C at the
    candidate, needed for that test, are the next step's. So a step that leads where the model
    is not finite is never taken (no previous state is carried to undo it), and each step
    evaluates C (and ∇C) once. The loop stops at C ≤ eps, at a step not taken, or when the
    optimizer's state reports a termination status (`RESULTS`; the update that reports it is
    kept).

    The carry's C and params are checked first (`fit` does not wait for its prologue): where
    either is not finite no step runs and `ChunkReport.start_bad` says so.

    Returns (carry, floats, ints), packed so that the host reads the chunk in one transfer:
    `floats` = (costs before each step, σ_min(D) of each step's solve (-1 where not
    estimated), each as `_history` blocks of length `chunk` in all, and the cost at the final
    params); `ints` = `ChunkReport`'s fields. Only `chunk` is static, so every chunk of every
    `fit` call with that chunk size reuses one compilation, and where chunks end does not
    change the arithmetic.
    """
    params, _, cost, _, _, _ = carry
    dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
    costs = _history(chunk, jnp.nan, dtype)
    sigmas = _history(chunk, -1.0, dtype)
    running = jnp.asarray(RESULTS.running, jnp.int32)
    false = jnp.asarray(False)
    start_ok = jnp.isfinite(cost) & _all_finite(params)

    def cond(loop):
        i, _, _, _, done, bad, _, _, status, _ = loop
        return (i < num) & start_ok & ~done & ~bad & (status == running)

    def body(loop):
        i, carry, costs, sigmas, _, _, _, _, _, _ = loop
        params, state, cost, grads, fallbacks, min_rank = carry
        gradient = grads if use_grad else jax.tree_util.tree_map(jnp.zeros_like, params)
        updates, new_state = optimizer.update(gradient, state, params, problem=problem,
                                              full_params=params)
        new_params = optax.apply_updates(params, updates)
        fallback, rank, sigma, solve_ok, status = _solve_report(new_state)
        new_cost, new_grads = _values(problem, new_params, use_grad)
        params_ok = _all_finite(new_params)
        cost_ok = jnp.isfinite(new_cost)
        advance = params_ok & solve_ok & cost_ok
        nonfinite_cost = params_ok & solve_ok & ~cost_ok
        # A non-finite cost from finite outputs: the loss overflows the dtype, not the model.
        cost_overflow = jax.lax.cond(
            nonfinite_cost, lambda: jnp.all(jnp.isfinite(problem.outputs(new_params))),
            lambda: jnp.asarray(False))
        costs = _record(costs, i, cost.astype(dtype))
        sigmas = _record(sigmas, i, sigma.astype(dtype))
        carry = (*_select(advance, (new_params, new_state, new_cost.astype(dtype), new_grads),
                          (params, state, cost, grads)),
                 fallbacks + (advance & fallback).astype(fallbacks.dtype),
                 jnp.where(advance, _merge_rank(min_rank, rank), min_rank))
        # An overflowing Gram is reported whatever the solve did with it.
        keep = advance | (status == RESULTS.overflow)
        status = jnp.where(keep, status, running)
        done = advance & (status == running) & (new_cost <= eps)
        status = jnp.where(done, RESULTS.eps_reached, status)
        return (i + advance.astype(i.dtype), carry, costs, sigmas, done, ~advance,
                nonfinite_cost, ~solve_ok, status.astype(jnp.int32), cost_overflow)

    done = cost <= eps  # (a resumed run may start there)
    init = (jnp.asarray(0, jnp.int32), carry, costs, sigmas, done, false, false, false,
            jnp.where(done, RESULTS.eps_reached, running).astype(jnp.int32), false)
    (taken, carry, costs, sigmas, done, bad, nonfinite_cost, solve_bad, status,
     cost_overflow) = jax.lax.while_loop(cond, body, init)
    floats = (*costs, *sigmas, carry[2].astype(dtype)[None])
    ints = jnp.stack([jnp.asarray(x).astype(jnp.int32) for x in (
        taken, done, bad, nonfinite_cost, solve_bad, status, cost_overflow, carry[4], carry[5],
        ~start_ok)])
    return carry, floats, ints


# Entries per block of a chunk's history: 64 float64 numbers, 512 bytes. On XLA's CPU runtime
# (jax 0.10) a compiled chunk that holds a buffer larger than that pays about 50 µs more per
# call, and a few µs more per step, than one whose buffers are all this small: a 14×2 NIST fit
# of 17 steps ran its chunk in 297 µs with one (100,) history and in 208 µs with blocks
# (`benchmarks/fit_overhead.py`); on larger problems the model's own buffers exceed it anyway.
HISTORY_BLOCK = 64


def _history(length: int, fill, dtype) -> tuple[Array, ...]:
    """`length` entries of `fill`, as blocks of at most `HISTORY_BLOCK`."""
    return tuple(jnp.full(min(HISTORY_BLOCK, length - start), fill, dtype)
                 for start in range(0, length, HISTORY_BLOCK))


def _record(history: tuple[Array, ...], i, value) -> tuple[Array, ...]:
    """`history` with entry i set to `value`."""
    return tuple(jnp.where(i // HISTORY_BLOCK == k, block.at[i % HISTORY_BLOCK].set(value), block)
                 for k, block in enumerate(history))


def _read_history(floats, chunk: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(costs, σ_min, final cost) from a chunk's `floats` on the host."""
    blocks = -(-chunk // HISTORY_BLOCK)
    return (np.concatenate(floats[:blocks]), np.concatenate(floats[blocks:2 * blocks]),
            float(floats[-1][0]))


class ChunkReport(NamedTuple):
    """What the host reads of a chunk (`_run_chunk`'s `ints`): steps taken; whether C ≤ eps was
    reached; whether a step was not taken (bad), because C was not finite at it
    (nonfinite_cost) or its solve met NaN or inf (solve_bad); the status; whether the
    non-finite C came from finite outputs (cost_overflow); the fallback count and the
    smallest rank so far; whether C or the params were not finite at the chunk's start
    (start_bad: no step ran)."""

    taken: int
    done: bool
    bad: bool
    nonfinite_cost: bool
    solve_bad: bool
    status: int
    cost_overflow: bool
    fallbacks: int
    min_rank: int
    start_bad: bool

    @classmethod
    def read(cls, ints: np.ndarray) -> "ChunkReport":
        (taken, done, bad, nonfinite_cost, solve_bad, status, cost_overflow, fallbacks,
         min_rank, start_bad) = ints.tolist()
        return cls(taken, bool(done), bool(bad), bool(nonfinite_cost), bool(solve_bad), status,
                   bool(cost_overflow), fallbacks, min_rank, bool(start_bad))


def _is_real_number(value) -> bool:
    return static_real(value) is not None


def _is_positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def fit(
    problem: AbstractProblem,
    params: PyTree,
    optimizer: optax.GradientTransformation | None = None,
    *,
    eps: float | None = None,
    max_steps: int = 1000,
    callback: Callable[[int, PyTree, Any, float], Any] | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    batches: Iterable | Callable | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
) -> FitResult:
    """Train `params` on `problem` with an optax optimizer (default `output_metric_descent()`).

    The loop is compiled once: chunks of steps run inside one `lax.while_loop`, and between
    chunks the progress bar, `callback` and checkpoints run on the host. Each step calls
    ``optimizer.update(grads, state, params, problem=problem)``; `grads` is the ordinary
    gradient of C, except for outmetric's own transformations, which ignore it (zeros are passed
    and the backward pass is skipped).

    **Arguments:**

    - `problem`, `params`: the problem and initial parameters (finite, real floating point).
    - `optimizer`: any `optax.GradientTransformation` that accepts the `problem` extra arg
      (default: `output_metric_descent()`; with `batches`,
      ``output_metric_descent(gram_average=0.3)``, the rule for data redrawn every step)
      (wrap plain optax optimizers with `optax.with_extra_args_support`; `fit` does it for you).
    - `eps`: stop once C ≤ eps (for `batches`: once a batch's cost is ≤ eps).
    - `max_steps`: the total step budget (a resumed run counts the steps before its checkpoint).
    - `callback`: `callback(step, params, state, cost)` after each chunk; return True to stop.
    - `progress`: show a tqdm bar.
    - `chunk_size`: steps per compiled chunk (default 10, or 100 without a progress bar,
      callback or checkpoints); the host checks in between.
    - `batches`: new data, one step (one solve) per batch on `problem.with_batch(batch)`. For a
      `Problem`: an iterable of `(inputs, targets)` mini-batches (the stochastic adapted method,
      on `problem.with_data(inputs, targets)`). For a `ResidualProblem`: fresh collocation
      points, as an iterable of ``{name: points}`` dicts, or a sampler, a callable
      ``sampler(key) -> {name: points}`` called before step i with
      ``jax.random.fold_in(jax.random.key(0), i)`` (fold your own seed into the key inside the
      sampler to vary the draws); sets left out keep their points. Points of the same shapes
      do not recompile the step.
    - `checkpoint_dir`: a folder (created if missing) where ``checkpoint.npz`` holds params,
      optimizer state, step count and cost history. It is written atomically (temporary file,
      then rename) every `checkpoint_every` steps, when the run ends (also by `NonFiniteError`)
      and when an exception stops it (`KeyboardInterrupt`, a failing callback); a run killed
      outright leaves the last one readable. Read it with `load_checkpoint`.
    - `checkpoint_every`: steps between checkpoints (default: every chunk); chunks also end
      at these steps.
    - `resume`: if `checkpoint_dir` holds a checkpoint, continue from it (default). The
      continued run is the same computation: its parameters and cost history equal those of an
      uninterrupted run bit for bit (on the same machine and JAX version). With `batches`, the
      first `step` batches of the iterable are skipped, so it must yield the same sequence
      again (a sampler is simply called with the keys of the remaining steps). A checkpoint written with another model, optimizer state layout or data
      (inputs, targets, loss: a SHA-256 of them is stored) is a `CheckpointError`; changed
      optimizer hyperparameters with the same state layout cannot be detected.
      `resume=False` starts afresh and overwrites the checkpoint.

    Precision follows `params`: JAX computes in float32 unless float64 is switched on
    (``jax.config.update("jax_enable_x64", True)``) and params and data are float64.

    **Returns:** a `FitResult`, which also reports how many steps' solves needed the
    rank-revealing fallback. A non-finite cost or parameters raise `NonFiniteError`, whose
    `.result` holds the last parameters with a finite cost and their optimizer state, so nothing
    is lost; wrap the optimizer in `optax.apply_if_finite` to skip non-finite updates instead.
    """
    check_problem(problem)
    check_params(params, values=False)  # the values are checked with the first cost, below
    # (through the class: an equinox method looked up on the instance builds a bound-method
    # module each time, a tenth of a tiny fit)
    type(problem).size_from(problem, params)
    if optimizer is None:
        optimizer = _default_optimizer(batches is not None)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    if eps is not None and (not _is_real_number(eps) or not eps > 0 or not math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    eps = None if eps is None else float(eps)
    if not _is_positive_int(max_steps):
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    if chunk_size is not None and not _is_positive_int(chunk_size):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable: callback(step, params, state, cost)")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    if batches is not None and (isinstance(batches, (str, bytes))
                                or not (hasattr(batches, "__iter__") or callable(batches))):
        raise TypeError("batches must be an iterable of (inputs, targets) pairs (for a "
                        "ResidualProblem: of {name: points} dicts, or a sampler key -> dict), "
                        f"got {type(batches).__name__}")
    checkpoint = _checkpoint_path(checkpoint_dir, checkpoint_every, resume)
    max_steps = int(max_steps)
    optimizer, use_grad = _prepare(optimizer)
    if batches is None:  # (the mini-batch form checks each batch's cost as it comes)
        # One compiled call: C(θ₀) (which also checks apply_fn's output shape early) and the
        # optimizer's initial state. It is not waited for: the first chunk checks that C(θ₀)
        # and θ₀ are finite before its first step, and `_fit_full` raises if not.
        values, state = _compiled_start(optimizer, use_grad)(problem, params)
    else:
        values = None
        check_params(params)
        state = _init(optimizer, params)
    start = _Progress(0, params, state, (), 0, -1, ())
    fingerprint = _data_fingerprint(problem, params, batches) if checkpoint is not None else None
    lock = contextlib.nullcontext()
    if checkpoint is not None:
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        lock = CheckpointLock(checkpoint)  # held for the run: a second run here is refused
    with lock:
        if checkpoint is not None and resume and os.path.exists(checkpoint):
            saved = load_checkpoint(checkpoint, params, state)
            if len(saved.costs) != saved.step:
                raise CheckpointError(f"checkpoint {checkpoint!r} has {len(saved.costs)} costs "
                                      f"for {saved.step} steps; it was not written by fit")
            check_fingerprint(checkpoint, saved.extra, fingerprint)
            sigmas = saved.extra.get("min_singular_values", np.full(saved.step, -1.0))
            start = _Progress(saved.step, saved.params, saved.opt_state,
                              tuple(saved.costs.tolist()),
                              int(saved.extra.get("fallback_steps", 0)),
                              int(saved.extra.get("min_rank", -1)),
                              tuple(np.asarray(sigmas, float).reshape(-1).tolist()))
        elif checkpoint is not None:
            check_overwritable(checkpoint)  # resume=False: never over a file fit did not write
        # The host sees the run between chunks; without a bar, a callback or checkpoints it
        # has nothing to do there, and longer chunks save the dispatches.
        interactive = progress or callback is not None or checkpoint is not None
        chunk = int(chunk_size or (10 if interactive else 100))
        every = int(checkpoint_every or chunk) if checkpoint is not None else None
        if checkpoint is not None:  # a folder that cannot take the checkpoint fails now
            check_writable(checkpoint, start.params, start.state, max_steps, extra=fingerprint)
        checkpoint = None if checkpoint is None else (checkpoint, fingerprint)
        args = (problem, optimizer, start, eps, max_steps, callback, progress, chunk, batches,
                use_grad, checkpoint, every)
        if batches is not None:
            return _fit_batches(*args)
        # (resumed: the values at the checkpoint's params are evaluated there)
        return _fit_full(*args, values=values if start.step == 0 else None)


def _data_fingerprint(problem: AbstractProblem, params: PyTree, batches) -> dict[str, str]:
    """What a checkpoint must have been written by to be resumed: `data_fingerprint`, SHA-256 of
    the loss, the shapes and dtypes and (where this host can read them) the bytes of the inputs
    and targets; `model_fingerprint`, of the model's jaxpr (`model_fingerprint`); `mode`,
    full-batch or mini-batch."""
    layout, data = problem.fingerprint_parts()
    digest = hashlib.sha256(layout.encode())
    for leaf in jax.tree_util.tree_leaves(data):
        digest.update(f"{jnp.shape(leaf)}|{jnp.asarray(leaf).dtype}".encode())
        if getattr(leaf, "is_fully_addressable", True):
            digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return {"data_fingerprint": digest.hexdigest(),
            "model_fingerprint": model_fingerprint(problem, params),
            "mode": "full-batch" if batches is None else "mini-batch"}


def _checkpoint_path(checkpoint_dir, checkpoint_every, resume) -> str | None:
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if checkpoint_every is not None and not _is_positive_int(checkpoint_every):
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if checkpoint_dir is None:
        if checkpoint_every is not None:
            raise ValueError("checkpoint_every needs checkpoint_dir, the folder to write to")
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a folder path, got {type(checkpoint_dir).__name__}")
    folder = os.fspath(checkpoint_dir) or os.curdir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"checkpoint_dir {folder!r} exists and is not a folder")
    return os.path.join(folder, CHECKPOINT_FILE)


class _Progress(NamedTuple):
    """A consistent snapshot of a run, replaced as a whole (one assignment) after each chunk, so
    a `KeyboardInterrupt` at any moment finds a state that can be checkpointed."""

    step: int
    params: PyTree
    state: Any
    costs: tuple
    fallback_steps: int
    min_rank: int
    sigmas: tuple


def _save(checkpoint, snap: _Progress) -> int | None:
    """Checkpoint `snap` to `checkpoint` = (path, fingerprints of `_data_fingerprint`), if given;
    returns the step saved."""
    if checkpoint is None:
        return None
    path, fingerprint = checkpoint
    save_checkpoint(path, snap.params, snap.state, snap.step, snap.costs,
                    extra={"fallback_steps": snap.fallback_steps, "min_rank": snap.min_rank,
                           "min_singular_values": np.asarray(snap.sigmas, float),
                           **fingerprint})
    return snap.step


def _save_unless_saved(checkpoint, snap: _Progress, saved_at: int) -> None:
    """The final checkpoint of a run, unless the last one written already holds `snap`."""
    if checkpoint is not None and (snap.step != saved_at or snap.step == 0):
        _save(checkpoint, snap)


def _final_save(checkpoint, snap: _Progress, saved_at: int, result: FitResult) -> None:
    """The run's last checkpoint; if it cannot be written the error still hands back the run."""
    try:
        _save_unless_saved(checkpoint, snap, saved_at)
    except OSError as err:
        raise CheckpointError(
            f"fit: the run ended ({result.status.name}, step {result.num_steps}) but its final "
            f"checkpoint could not be written to {checkpoint[0]!r} ({err.strerror or err}); "
            "error.result holds the trained result", result) from err


def _warn_rank_loss(problem: AbstractProblem, result: FitResult) -> None:
    """A `RuntimeWarning` when solves of this run fell back to the rank-revealing SVD."""
    if result.fallback_steps == 0:
        return
    num_params = jax.flatten_util.ravel_pytree(result.params)[0].shape[0]
    full = min(problem.num_samples * problem.output_dim, num_params)
    warnings.warn(
        f"fit: {result.fallback_steps} step(s) had a singular or too ill-conditioned Gram "
        f"matrix and fell back to the SVD pseudo-inverse (smallest rank of D estimated: "
        f"{result.min_rank} of min(QN, K) = {full}): rank is lost there. FitResult."
        "fallback_steps and .min_rank say so; track_min_singular_value=True records σ_min(D) "
        "per step", RuntimeWarning, stacklevel=3)


class _NoBar:
    """What `fit` talks to when `progress=False` (a disabled tqdm still costs ~0.1 ms a call)."""

    n = 0

    def set_postfix(self, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress_bar(progress: bool, total: int, initial: int, unit: str):
    if not progress:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc="fit", unit=unit)


def _overflow_message(problem: AbstractProblem, params: PyTree, step: int) -> str:
    dtype = jax.flatten_util.ravel_pytree(params)[0].dtype
    return (f"fit: at step {step} the Jacobian D = dx/dθ is finite but its squares overflow "
            f"{dtype} (the Gram matrix or the squared column norms of D are inf): the model "
            "is too sensitive to its parameters for this precision, not broken. Rescale the "
            "parameters and the model's use of them so that |dx/dθ| is moderate (below about "
            f"{np.sqrt(np.finfo(dtype).max / max(problem.num_samples * problem.output_dim, 1)):.0e}"
            "). error.result holds the last parameters and their optimizer state")


def _no_progress(problem: AbstractProblem, result: FitResult, eps) -> FitResult:
    """A run of updates that never lowered the cost (every trial step rejected) is not silent:
    a `RuntimeWarning` when it did not converge, or when the targets dwarf the model's outputs
    (then a convergence test that fired on rejected trials is no convergence: `stalled`)."""
    costs = result.costs
    if (result.num_steps == 0 or result.status in (RESULTS.eps_reached, RESULTS.gtol_reached,
                                                   RESULTS.stopped_by_callback)
            or not np.all(np.isfinite(costs)) or costs[-1] < costs[0] or costs[0] == 0
            or (eps is not None and costs[-1] <= eps)):
        return result
    hint = ""
    if problem.per_sample:  # data with targets (a residual problem's targets are zero)
        outputs = np.abs(np.asarray(_outputs(problem, result.params)))
        targets = np.abs(np.asarray(problem.targets, float))
        ratio = np.max(targets) / max(np.max(outputs), np.finfo(float).tiny)
        if ratio > 1e6:
            hint = (f" The targets are {ratio:.1e} times the model's outputs (largest |target| "
                    f"{np.max(targets):.3g}, largest |output| {np.max(outputs):.3g}): rescale "
                    "the targets (or the model's output layer) to a comparable size.")
    if result.status.converged and not hint:
        return result  # (started at a minimum: nothing to improve)
    if result.status.converged:
        result = result._replace(status=RESULTS.stalled, converged=False)
    warnings.warn(
        f"fit: the cost did not decrease in {result.num_steps} step(s) (C = {costs[0]:.6g} "
        f"throughout): every trial step was rejected; status {result.status.name!r}.{hint}",
        RuntimeWarning, stacklevel=3)
    return result


@eqx.filter_jit
def _outputs(problem, params):
    return problem.outputs(params)


def _finite_cost_message(what: str, step: int) -> str:
    blame = ("" if "overflows" in what else
             ": the model or the optimizer produced NaN or inf")
    return (f"fit: {what} at step {step}{blame}. "
            "error.result holds the last parameters with a finite cost and their optimizer "
            "state (wrap the optimizer in optax.apply_if_finite to skip non-finite updates)")


def _fit_full(problem, optimizer, snap, eps, max_steps, callback, progress, chunk, batches,
              use_grad, checkpoint, every, values=None):
    """The full-batch loop; `values` = (C, ∇C or None) at `snap.params` when known."""
    dtype = params_dtype(snap.params)
    eps_value = np.asarray(-np.inf if eps is None else eps, dtype)
    resumed_from = saved_at = snap.step
    bar = _progress_bar(progress, max_steps, snap.step, "step")
    done = bad = nonfinite_cost = stopped = solve_bad = cost_overflow = False
    final_cost = report = None
    # A run resumed from the checkpoint of a finished run has nothing left to do.
    status = (RESULTS(int(_solve_report(snap.state)[4])) if snap.step > 0
              else RESULTS.running)
    run_chunk = _compiled_chunk(optimizer, bool(use_grad), int(chunk))
    if values is None:
        values = _compiled_values(bool(use_grad))(problem, snap.params)
    carry = (snap.params, snap.state, *values, np.int32(snap.fallback_steps),
             np.int32(snap.min_rank))
    try:
        while (snap.step < max_steps and not (done or bad or stopped)
               and status == RESULTS.running):
            num = min(chunk, max_steps - snap.step)
            if every is not None:
                num = min(num, every - snap.step % every)
            carry, floats, ints = run_chunk(problem, carry, np.int32(num), eps_value)
            # All the host needs, read at once (np.asarray per array: a quarter of
            # jax.device_get's cost on a tiny fit, where it is a tenth of the time).
            floats, ints = [np.asarray(x) for x in floats], np.asarray(ints)
            report = ChunkReport.read(ints)
            if report.start_bad:
                break
            taken, done, bad, nonfinite_cost, solve_bad = report[:5]
            cost_overflow = report.cost_overflow
            status = RESULTS(report.status)
            costs, sigmas, final_cost = _read_history(floats, chunk)
            history = snap.costs + tuple(costs[:taken].tolist())
            sigma_history = snap.sigmas + tuple(sigmas[:taken].tolist())
            snap = _Progress(len(history), carry[0], carry[1], history, report.fallbacks,
                             report.min_rank, sigma_history)
            bar.n = snap.step
            bar.set_postfix(cost=f"{history[-1] if history else float('nan'):.3e}")
            if every is not None and not bad and snap.step % every == 0:
                saved_at = _save(checkpoint, snap)
            if callback is not None and callback(snap.step, snap.params, snap.state,
                                                 history[-1] if history else float("nan")):
                stopped = True
            if status != RESULTS.running:
                break
    except BaseException:  # Ctrl-C, a failing callback, a traced error: keep the progress
        _save(checkpoint, snap)
        raise
    finally:
        bar.close()
    if report is not None and report.start_bad:  # (nothing ran, nothing is saved)
        check_params(snap.params)  # raises, naming params
        raise ValueError(f"fit: {nonfinite_cost_message(problem, snap.params)}")
    if final_cost is None:
        final_cost = float(carry[2])
    overflow = status == RESULTS.overflow and not done
    if done:
        status = RESULTS.eps_reached
    elif overflow:
        bad = True
    elif bad:
        status = RESULTS.nonfinite
    elif stopped and status == RESULTS.running:
        status = RESULTS.stopped_by_callback
    elif status == RESULTS.running and snap.step >= max_steps:
        status = RESULTS.max_steps_reached
    history = np.asarray(snap.costs + (final_cost,))
    result = FitResult(snap.params, snap.state, history, snap.step, status.converged,
                       snap.fallback_steps, snap.min_rank, resumed_from,
                       np.asarray(snap.sigmas, float), status)
    _final_save(checkpoint, snap, saved_at, result)
    if not overflow:  # (an overflowing Gram is not a rank loss)
        _warn_rank_loss(problem, result)
        result = _no_progress(problem, result, eps)
    if bad:
        if overflow:
            raise NonFiniteError(_overflow_message(problem, snap.params, snap.step), result)
        if solve_bad:
            what = "the output-metric solve met NaN or inf in the Jacobian or the residual"
        elif nonfinite_cost and cost_overflow:
            what = (f"the cost became non-finite while the model's outputs stayed finite: the "
                    f"{problem.loss} cost overflows {jnp.dtype(dtype)} (rescale the targets and "
                    "the model's outputs)")
        elif nonfinite_cost:
            what = "the cost became non-finite"
        else:
            what = "the update gave non-finite parameters"
        raise NonFiniteError(_finite_cost_message(what, snap.step), result)
    return result


def _init(optimizer, params):
    """optimizer.init(params), compiled once per optimizer (`_compiled_init`)."""
    return _compiled_init(optimizer)(params)


@functools.lru_cache(maxsize=64)
def _compiled_init(optimizer) -> Callable:
    return jax.jit(optimizer.init)


@functools.lru_cache(maxsize=64)
def _compiled_start(optimizer, use_grad: bool) -> Callable:
    """((C(θ₀), ∇C(θ₀) or None), optimizer.init(θ₀)) in one compiled call: a tiny fit pays one
    dispatch before its first chunk, and no wait."""
    def start(problem, params):
        return _values(problem, params, use_grad), optimizer.init(params)
    return jax.jit(start)


@functools.lru_cache(maxsize=4)
def _compiled_values(use_grad: bool) -> Callable:
    return jax.jit(functools.partial(_values, use_grad=use_grad))


@eqx.filter_jit
def _batch_step(optimizer, problem, params, state, use_grad):
    """One mini-batch step and its solve report; compiled once per optimizer and batch shape."""
    cost, new_params, new_state, params_ok = _step(optimizer, problem, params, state, use_grad)
    return (cost, new_params, new_state, params_ok, *_solve_report(new_state))


def _fit_batches(problem, optimizer, snap, eps, max_steps, callback, progress, chunk, batches,
                 use_grad, checkpoint, every):
    del chunk
    resumed_from = saved_at = snap.step
    prev = None  # (params, state) before the last step
    converged = stopped = False
    failure = None
    last_cost = None
    if callable(batches) and not hasattr(batches, "__iter__"):  # a sampler: key of step i
        base = jax.random.key(0)
        iterator = (batches(jax.random.fold_in(base, i)) for i in itertools.count(snap.step))
        skip = 0
    else:
        iterator, skip = iter(batches), snap.step
        first = next(iterator, None)
        if first is None:
            raise ValueError("batches is empty: it yielded no (inputs, targets) pair (or point "
                             "set), so there is nothing to train on (a generator that was "
                             "already consumed?)")
        iterator = itertools.chain([first], iterator)
    bar = _progress_bar(progress, max_steps, snap.step, "batch")
    try:
        for _ in range(skip):  # a resumed run skips the batches already trained on
            if next(iterator, None) is None:
                raise CheckpointError(
                    f"resuming at step {snap.step}, but batches ended before that: pass the "
                    "same sequence of batches as the interrupted run")
        end = object()
        while snap.step < max_steps:  # (no batch is drawn past the budget)
            batch = next(iterator, end)
            if batch is end:
                break
            batch_problem = problem.with_batch(batch)
            (cost, new_params, new_state, params_ok, fallback, rank, sigma, solve_ok,
             code) = _batch_step(optimizer, batch_problem, snap.params, snap.state, use_grad)
            cost = float(cost)
            if not math.isfinite(cost):
                failure = "the cost became non-finite"
                if bool(jnp.all(jnp.isfinite(_outputs(batch_problem, snap.params)))):
                    failure = (f"the cost became non-finite while the model's outputs stayed "
                               f"finite: the {problem.loss} cost overflows "
                               f"{jax.flatten_util.ravel_pytree(snap.params)[0].dtype} (rescale "
                               "the targets and the model's outputs)")
                if prev is not None:  # the previous step led somewhere the model is not finite
                    snap = _Progress(snap.step - 1, *prev, snap.costs[:-1], snap.fallback_steps,
                                     snap.min_rank, snap.sigmas[:-1])
                break
            if eps is not None and cost <= eps:
                last_cost = cost
                converged = True
                break
            if int(code) == RESULTS.overflow:
                failure = _overflow_message(batch_problem, snap.params, snap.step)
                break
            if not bool(solve_ok):
                failure = "the output-metric solve met NaN or inf in the Jacobian or the residual"
                break
            if not bool(params_ok):
                failure = "the update gave non-finite parameters"
                break
            prev = (snap.params, snap.state)
            snap = _Progress(snap.step + 1, new_params, new_state, snap.costs + (cost,),
                             snap.fallback_steps + int(bool(fallback)),
                             int(_merge_rank(jnp.asarray(snap.min_rank, jnp.int32), rank)),
                             snap.sigmas + (float(sigma),))
            bar.update(1)
            bar.set_postfix(cost=f"{cost:.3e}")
            if every is not None and snap.step % every == 0:
                saved_at = _save(checkpoint, snap)
            if callback is not None and callback(snap.step, snap.params, snap.state, cost):
                stopped = True
                break
    except BaseException:  # Ctrl-C, a failing callback, a traced error: keep the progress
        _save(checkpoint, snap)
        raise
    finally:
        bar.close()
    costs = snap.costs + ((last_cost,) if converged else ())
    # Each batch is other data: the optimizer's per-update tests (ftol, xtol, stall) do not end
    # a mini-batch run; eps, the budget, the callback and the data do.
    if converged:
        status = RESULTS.eps_reached
    elif failure is not None:
        status = RESULTS.nonfinite
    elif stopped:
        status = RESULTS.stopped_by_callback
    elif snap.step >= max_steps:
        status = RESULTS.max_steps_reached
    else:
        status = RESULTS.data_exhausted
    result = FitResult(snap.params, snap.state, np.asarray(costs), snap.step, converged,
                       snap.fallback_steps, snap.min_rank, resumed_from,
                       np.asarray(snap.sigmas, float), status)
    _final_save(checkpoint, snap, saved_at, result)
    _warn_rank_loss(problem, result)
    if failure is not None:
        if failure.startswith("fit: "):  # a complete message (the Gram overflowed)
            raise NonFiniteError(failure, result._replace(status=RESULTS.overflow))
        raise NonFiniteError(_finite_cost_message(failure, snap.step).replace("step", "batch", 1),
                             result)
    return result
