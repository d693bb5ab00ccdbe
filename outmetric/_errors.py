"""Errors shared by the training entry points (`fit`, `integrate`)."""

from typing import Any


class NonFiniteError(FloatingPointError):
    """Training produced non-finite values (NaN or inf); nothing computed before is lost.

    `.result` holds the run up to the last finite state: a `FitResult` from `fit` (its params
    are the last ones whose cost was finite), a `Trajectory` from `integrate` (the path up to
    the point where the flow could not go on).
    """

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result
