"""Composition with optax: frozen leaves (`optax.masked`, `optax.multi_transform`) and
transformations chained before output-metric descent.

`optax.masked(inner, mask)` hands `inner` the parameters with every frozen leaf replaced by an
`optax.MaskedNode` (an empty node: `ravel_pytree` skips it). Output-metric descent then solves
over the trained leaves only, $\\delta = D_T^+ r$ with $D_T = \\partial x/\\partial\\theta_T$ the
columns of D that belong to the trained leaves $\\theta_T$, while the model is still evaluated at
the full parameters: the frozen values come from the ``full_params`` extra argument (`fit`
passes it; a hand-written loop passes ``full_params=params``).
"""

from typing import Callable

import jax
import optax
from jaxtyping import PyTree

from ._problem import Problem
from ._residual import PointSet, ResidualProblem, StackedResidualProblem


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked_leaves(params: PyTree) -> bool:
    """Whether `params` is a masked view (some leaves are `optax.MaskedNode`)."""
    return any(_is_masked(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_masked))


def unmasked_problem(problem: Problem, params: PyTree, extra_args: dict, name: str) -> Problem:
    """`problem` as a function of the trained leaves of `params`: the model sees the frozen leaves
    at their values in ``extra_args["full_params"]``. `problem` itself when nothing is masked."""
    if not has_masked_leaves(params):
        return problem
    full = extra_args.get("full_params")
    if full is None:
        raise ValueError(
            f"{name}.update got params with frozen leaves (optax.MaskedNode, from optax.masked "
            "or optax.multi_transform), and the model needs their values: pass the full "
            "parameters as an extra argument, opt.update(grads, state, params, problem=problem, "
            "full_params=params) (outmetric.fit does this for you)")
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_masked)
    full_structure = jax.tree_util.tree_structure(full)
    if len(jax.tree_util.tree_leaves(full)) != len(leaves):
        raise ValueError(f"full_params has structure {full_structure}, which does not match the "
                         f"masked params it completes")

    def merge(trained: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda t, f: f if _is_masked(t) else t, trained, full,
                                      is_leaf=_is_masked)

    if isinstance(problem, StackedResidualProblem):
        residual_fn = problem.residual_fn
        return StackedResidualProblem(lambda p: residual_fn(merge(p)), problem.num_samples)
    if isinstance(problem, ResidualProblem):
        return ResidualProblem({
            name: PointSet(lambda p, x, fn=s.residual_fn: fn(merge(p), x), s.points, s.weight,
                           num_outputs=s.num_outputs)
            for name, s in zip(problem.names, problem.sets)})
    apply_fn = problem.apply_fn
    return Problem(lambda p, u: apply_fn(merge(p), u), problem.inputs, problem.targets,
                   loss=problem.loss, batched=problem.batched,
                   label_smoothing=problem.label_smoothing)


def discards_upstream(optimizer: optax.GradientTransformation,
                      discarding: Callable[[Callable], bool], depth: int = 0) -> bool:
    """Whether `optimizer` chains a transformation before one whose update ignores its incoming
    updates (`discarding(update_fn)`), so that the upstream work is thrown away. Looks through
    `optax.chain` (and the closures of wrappers such as `optax.masked`) by their closures."""
    if depth > 8:
        return False
    update = getattr(optimizer, "update", None)
    for cell in getattr(update, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, (tuple, list)) and value and all(callable(v) for v in value):
            if any(discarding(fn) for fn in value[1:]):
                return True  # an optax.chain with a discarding update after the first
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, optax.GradientTransformation) and discards_upstream(
                    item, discarding, depth + 1):
                return True
    return False
