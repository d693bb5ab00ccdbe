"""`RESULTS`: why a run of output-metric descent ended (or that it has not).

The codes follow MINPACK's `info` and optimistix's `RESULTS`: the optimizer's state carries one
(`state.status`), set by its termination tests at each update, and `fit` stops on any code other
than `running` and reports it as `FitResult.status`.
"""

import enum


class RESULTS(enum.IntEnum):
    """Termination codes of `output_metric_descent` and `fit`.

    - `running`: no test has fired.
    - `eps_reached`: C ≤ `eps` (`fit`'s target).
    - `ftol_reached`: the actual and the predicted relative reductions of C are both ≤ `ftol`
      (and the gain ratio ≤ 2): the cost is at its minimum to relative accuracy `ftol`.
    - `xtol_reached`: the scaled step ‖S^{1/2}δ‖ (or the trust radius) is ≤ `xtol`·‖S^{1/2}θ‖:
      the parameters are at a minimiser to relative accuracy `xtol`.
    - `gtol_reached`: the largest cosine between the residual and a column of D is ≤ `gtol`:
      the gradient is orthogonal to range D, a stationary point.
    - `stalled`: no decrease of C was found within the update's trials, with the step still
      larger than `xtol` allows: the model cannot be improved from here at this precision.
    - `max_steps_reached`: `fit`'s step budget ran out first.
    - `stopped_by_callback`: `fit`'s callback returned True.
    - `nonfinite`: NaN or inf in the cost, the parameters or the solve (`fit` raises
      `NonFiniteError`, whose result carries this code).
    - `data_exhausted`: a mini-batch `fit`'s batches ran out before `max_steps`. (The
      per-update tests do not end a mini-batch run: each batch is other data.)
    - `overflow`: D and the cost are finite but D's squares overflow the dtype (the Gram
      matrix or the column norms of D are inf: |D| ≳ 1e154 in float64, 1e19 in float32); no
      step is taken, and `fit` raises `NonFiniteError`, whose result carries this code.
    """

    running = 0
    eps_reached = 1
    ftol_reached = 2
    xtol_reached = 3
    gtol_reached = 4
    stalled = 5
    max_steps_reached = 6
    stopped_by_callback = 7
    nonfinite = 8
    data_exhausted = 9
    overflow = 10

    @property
    def converged(self) -> bool:
        """True for the convergence codes: eps, ftol, xtol, gtol."""
        return self in _CONVERGED

    @property
    def message(self) -> str:
        """One readable line saying why the run ended."""
        return _MESSAGES[self]


_CONVERGED = frozenset({RESULTS.eps_reached, RESULTS.ftol_reached, RESULTS.xtol_reached,
                        RESULTS.gtol_reached})

_MESSAGES = {
    RESULTS.running: "still running: no termination test has fired",
    RESULTS.eps_reached: "converged: the cost reached eps",
    RESULTS.ftol_reached: "converged: the actual and predicted relative reductions of the cost "
                          "are below ftol",
    RESULTS.xtol_reached: "converged: the relative (scaled) step is below xtol",
    RESULTS.gtol_reached: "converged: the gradient is orthogonal to the columns of D to gtol "
                          "(a stationary point)",
    RESULTS.stalled: "stalled: no decrease of the cost was found, yet the step is larger than "
                     "xtol; the fit cannot improve at this precision (try float64, a smaller "
                     "xtol, or rescaling the targets)",
    RESULTS.max_steps_reached: "not converged: max_steps ran out",
    RESULTS.stopped_by_callback: "stopped: the callback returned True",
    RESULTS.nonfinite: "failed: NaN or inf in the cost, the parameters or the solve",
    RESULTS.data_exhausted: "stopped: the batches ran out before max_steps",
    RESULTS.overflow: "failed: the Jacobian D is finite but its Gram matrix (its squares) "
                      "overflows the dtype; rescale the parameters or the model so that "
                      "|dx/dθ| is moderate",
}
