"""Argument checks shared by the entry points: one definition of each, one wording.

Each check raises at call (or trace) time with a message that names the argument: a
``TypeError`` for a value of the wrong kind, a ``ValueError`` for one out of range. Numbers may
arrive as arrays (``optax.inject_hyperparams`` injects every numeric hyperparameter): a concrete
0-d array is checked like the number it holds, a traced one passes (the traced checks use
``eqx.error_if`` where the value is used), an array with more than one entry is refused.
"""

import numbers

import numpy as np

from ._problem import AbstractProblem, static_real


def check_problem(problem, name: str = "problem") -> None:
    """`problem` must be an outmetric problem: any kind of `AbstractProblem` (`Problem`,
    `ResidualProblem`, `Problem.from_residual`)."""
    if not isinstance(problem, AbstractProblem):
        raise TypeError(f"{name} must be an outmetric.Problem (or another problem kind: "
                        f"ResidualProblem, Problem.from_residual), got {type(problem).__name__}")


def check_scalar(name: str, value) -> None:
    """`value` must be one number: a real Python or NumPy number or a 0-d array."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if hasattr(value, "dtype"):
        if np.ndim(value) != 0:
            raise TypeError(f"{name} must be a scalar (a number or a 0-d array), got an array of "
                            f"shape {np.shape(value)}")
        if not np.issubdtype(np.dtype(value.dtype), np.number) or np.dtype(value.dtype) == bool:
            raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype}")
        return
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    """`value` must be one finite number ≥ 0 (a traced 0-d array passes)."""
    check_scalar(name, value)
    number = static_real(value)
    if number is not None and not 0 <= number < float("inf"):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")


def check_rtol(rtol, name: str = "rtol") -> None:
    """The relative singular-value cut-off of a rank decision: None (the default, max(M, K)·ε)
    or a number in (0, 1). One range for every caller: the solves, the flows and the geometry
    diagnostics count a direction when σ > rtol·σ_max (`outmetric._solve`, "Rank")."""
    if rtol is None or (hasattr(rtol, "dtype") and static_real(rtol) is None
                        and np.ndim(rtol) == 0 and not isinstance(rtol, (bool, np.bool_))):
        return  # None, or a traced scalar
    number = static_real(rtol)
    if number is None or not 0 < number < 1:
        raise ValueError(f"{name} must be a number in (0, 1) or None, got {rtol!r}")


def check_flag(name: str, value) -> None:
    """`value` must be True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
