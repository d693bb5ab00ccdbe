"""Shared helpers of the classic least-squares benchmarks (`benchmarks.nist`, `benchmarks.mgh`).

Three solvers, each with its own defaults ("defaults against defaults"):

- ``minpack``: `scipy.optimize.least_squares(method="lm")` — MINPACK's LMDER — with scipy's
  default tolerances (ftol = xtol = gtol = 1e-8, max_nfev = 100·n); residual and Jacobian
  (`jax.jacfwd`) are jitted JAX functions whose values are handed to MINPACK as float64 NumPy
  arrays.
- ``optimistix``: `optimistix.LevenbergMarquardt(rtol=1e-8, atol=1e-8)` through
  `optx.least_squares(..., max_steps=1000, throw=False)`, jitted once per problem. Optimistix has
  no default tolerances and its documentation recommends none; 1e-8 matches scipy's.
- ``outmetric``: `outmetric.fit(problem, x0, output_metric_descent())` with `fit`'s default
  `max_steps` (1000); one optimizer object per process, so its compiled loop is reused.

Timing is warm: each solver runs once on the problem (compiling whatever it compiles), then
`repeats` more times; the reported time is the MEDIAN of those wall times (with
`block_until_ready` on JAX outputs), not the minimum.
"""

import datetime
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SOLVERS = ("minpack", "optimistix", "outmetric")
LRE_CAP = 11.0
OPTX_RTOL = 1e-8
OPTX_ATOL = 1e-8
OPTX_MAX_STEPS = 1000

SOLVER_NOTES = {
    "minpack": "scipy.optimize.least_squares(method='lm') = MINPACK LMDER; scipy defaults "
               "ftol=xtol=gtol=1e-8, max_nfev=100*n; Jacobian by jax.jacfwd (jitted); steps = nfev; "
               "status = scipy's (0: max_nfev reached, 1: gtol, 2: ftol, 3: xtol, 4: ftol and "
               "xtol)",
    "optimistix": f"optimistix.LevenbergMarquardt(rtol={OPTX_RTOL:g}, atol={OPTX_ATOL:g}) (no "
                  f"library default exists), least_squares(max_steps={OPTX_MAX_STEPS}, "
                  "throw=False), jitted once per problem; steps = num_steps",
    "outmetric": "outmetric.fit(Problem.from_residual(r, m), x0, output_metric_descent()) with "
                 "fit's default max_steps (1000); steps = FitResult.num_steps",
}


# ----------------------------------------------------------------------------- accuracy


def lre(estimate, certified, cap: float = LRE_CAP) -> float:
    """Log relative error −log10(|b − c|/|c|), the minimum over the parameters.

    Each parameter's value is clipped to [0, `cap`] (an exact match scores `cap`; a relative error
    above 1, or a non-finite estimate, scores 0). A certified value of 0 uses the absolute error.
    """
    b = np.asarray(estimate, dtype=float).reshape(-1)
    c = np.asarray(certified, dtype=float).reshape(-1)
    if b.shape != c.shape:
        raise ValueError(f"estimate has shape {b.shape}, certified {c.shape}")
    scores = []
    for bi, ci in zip(b, c):
        if not math.isfinite(bi):
            scores.append(0.0)
            continue
        err = abs(bi - ci) / (abs(ci) if ci != 0 else 1.0)
        scores.append(cap if err == 0 else min(cap, max(0.0, -math.log10(err))))
    return min(scores)


def sum_of_squares(residual_fn: Callable, x) -> float:
    """‖r(x)‖² in float64 (NaN if x or r(x) is not finite)."""
    x = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(x)):
        return float("nan")
    r = np.asarray(residual_fn(jnp.asarray(x)), dtype=float)
    return float(np.dot(r, r)) if np.all(np.isfinite(r)) else float("nan")


# ----------------------------------------------------------------------------- timing


def median_warm_time(run_once: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """Run `run_once` once (warm-up: compilation, caches), then `repeats` times.

    Returns (the last result, the median wall time of the timed runs, the warm-up's time).
    `run_once` must block until its result is ready.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t = time.perf_counter()
    result = run_once()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = run_once()
        times.append(time.perf_counter() - t)
    return result, statistics.median(times), first


class Record(NamedTuple):
    """One solver's run from one start."""

    solver: str
    params: list
    steps: int | None
    status: str | None
    converged: bool | None
    seconds: float  # median warm wall time
    first_seconds: float  # the warm-up run (includes compilation)
    sum_sq: float  # ‖r‖² at the final params
    extra: dict

    def as_dict(self, param_digits: int = 12) -> dict:
        """JSON-ready, rounded: parameters to `param_digits` significant digits, ‖r‖² to 12."""
        out = {
            "solver": self.solver,
            "params": [_round(p, param_digits) for p in self.params],
            "sum_sq": _round(self.sum_sq, 12),
            "steps": self.steps,
            "status": self.status,
            "converged": self.converged,
            "seconds": _round(self.seconds, 4),
            "first_seconds": _round(self.first_seconds, 3),
        }
        out.update(self.extra)
        return out


def _round(x, digits):
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return float(f"{x:.{digits}g}")


def _error_record(solver: str, n: int, exc: BaseException) -> Record:
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return Record(solver, [float("nan")] * n, None, "error", False, float("nan"), float("nan"),
                  float("nan"), {"error": msg})


# ----------------------------------------------------------------------------- solvers


class LeastSquaresProblem(NamedTuple):
    """A residual r: R^n → R^m as a jittable JAX function of a float64 vector."""

    name: str
    residual: Callable[[jax.Array], jax.Array]
    num_params: int
    num_residuals: int


def run_scipy_lm(fun: Callable, jac: Callable, x0, repeats: int = 5) -> Record:
    """MINPACK LM through `scipy.optimize.least_squares(method="lm")`, default tolerances.

    `fun(x) -> (m,)` and `jac(x) -> (m, n)` may return JAX arrays; they are converted to float64
    NumPy arrays (the conversion is part of the timed work, as any JAX user of MINPACK pays it).
    """
    from scipy.optimize import least_squares

    x0 = np.asarray(x0, dtype=float)

    def f(x):
        return np.asarray(fun(x), dtype=np.float64)

    def j(x):
        return np.asarray(jac(x), dtype=np.float64)

    try:
        res, seconds, first = median_warm_time(
            lambda: least_squares(f, x0, jac=j, method="lm"), repeats)
    except Exception as exc:  # e.g. residuals not finite at x0
        return _error_record("minpack", x0.size, exc)
    params = np.asarray(res.x, dtype=float)
    sum_sq = float(2.0 * res.cost)
    return Record("minpack", params.tolist(), int(res.nfev), f"{res.status}", bool(res.success),
                  seconds, first, sum_sq, {"njev": None if res.njev is None else int(res.njev)})


_OPTX_NAMES: dict[int, str] | None = None


def _optx_status_name(result) -> str:
    import optimistix as optx

    global _OPTX_NAMES
    if _OPTX_NAMES is None:
        _OPTX_NAMES = {int(np.asarray(item._value)): name
                       for name, item in optx.RESULTS._name_to_item.items()}
    return _OPTX_NAMES.get(int(np.asarray(result._value)), str(result))


def make_optimistix_lm(fn: Callable):
    """A jitted `y0 -> (value, result, num_steps)` for `optx.least_squares` with LM.

    `fn(y, args) -> residuals`. Build once per problem: every start then reuses the compilation.
    """
    import equinox as eqx
    import optimistix as optx

    solver = optx.LevenbergMarquardt(rtol=OPTX_RTOL, atol=OPTX_ATOL)

    @eqx.filter_jit
    def solve(y0):
        sol = optx.least_squares(fn, solver, y0, max_steps=OPTX_MAX_STEPS, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    return solve


def run_optimistix_lm(fn, x0, repeats: int = 5) -> Record:
    """optimistix's Levenberg–Marquardt from `x0`.

    `fn` is either the residual `fn(y, args)` or an `OptimistixSolver` (pass the latter to share
    one compilation across starts).
    """
    solve = fn.solve if isinstance(fn, OptimistixSolver) else make_optimistix_lm(fn)
    x0 = jnp.asarray(x0, dtype=jnp.float64)

    def once():
        out = solve(x0)
        jax.block_until_ready(out[0])
        return out

    try:
        (value, result, steps), seconds, first = median_warm_time(once, repeats)
    except Exception as exc:
        return _error_record("optimistix", x0.size, exc)
    status = _optx_status_name(result)
    params = np.asarray(value, dtype=float)
    return Record("optimistix", params.tolist(), int(steps), status, status == "successful",
                  seconds, first, float("nan"), {})


class OptimistixSolver:
    """`make_optimistix_lm` for a residual `r(x)`: one compilation shared by every start."""

    def __init__(self, residual: Callable):
        self.solve = make_optimistix_lm(lambda y, args: residual(y))


def optimistix_solver(residual: Callable) -> OptimistixSolver:
    return OptimistixSolver(residual)


_OPTIMIZER: list = []


def outmetric_optimizer():
    """The one `output_metric_descent()` of this process (its compiled loop is cached on it)."""
    if not _OPTIMIZER:
        import outmetric as om

        _OPTIMIZER.append(om.output_metric_descent())
    return _OPTIMIZER[0]


def _status_name(status) -> str | None:
    if status is None:
        return None
    name = getattr(status, "name", None)
    return str(name) if name is not None else str(status)


def run_outmetric(problem, x0, repeats: int = 5) -> Record:
    """`outmetric.fit(problem, x0, output_metric_descent())` with fit's default `max_steps`.

    Records `FitResult.status` (its `.name`) where the core provides it, else None; a
    `NonFiniteError` is recorded as status "non-finite" with the last finite parameters.
    `steps_to_final`: the first step whose cost is within 1e-9 (relative) of the final one —
    how many steps the run needed, when the core does not stop by itself.
    """
    import outmetric as om

    optimizer = outmetric_optimizer()
    x0 = jnp.asarray(x0, dtype=jnp.float64)

    def once():
        try:
            result = om.fit(problem, x0, optimizer, progress=False)
            error = None
        except om.NonFiniteError as exc:
            result, error = exc.result, exc
        jax.block_until_ready(result.params)
        return result, error

    try:
        (result, error), seconds, first = median_warm_time(once, repeats)
    except Exception as exc:  # e.g. non-finite initial cost
        return _error_record("outmetric", x0.size, exc)
    params = np.asarray(result.params, dtype=float).reshape(-1)
    costs = np.asarray(result.costs, dtype=float)
    status = _status_name(getattr(result, "status", None))
    if error is not None:
        status = "non-finite" if status is None else f"{status} (non-finite)"
    extra = {}
    finite = costs[np.isfinite(costs)]
    if finite.size:
        final = finite[-1]
        hit = np.nonzero(costs <= final + 1e-9 * abs(final))[0]
        extra["steps_to_final"] = int(hit[0]) if hit.size else None
    return Record("outmetric", params.tolist(), int(result.num_steps), status,
                  bool(result.converged), seconds, first, float("nan"), extra)


class Solvers(NamedTuple):
    """What each solver compiles for one problem, built once and shared by every start."""

    residual: Callable  # jitted r(x)
    jacobian: Callable  # jitted jax.jacfwd(r)(x)
    optimistix: "OptimistixSolver"
    outmetric: Any  # outmetric.Problem


def prepare(lsp: LeastSquaresProblem) -> Solvers:
    import outmetric as om

    return Solvers(jax.jit(lsp.residual), jax.jit(jax.jacfwd(lsp.residual)),
                   optimistix_solver(lsp.residual),
                   om.Problem.from_residual(lsp.residual, num_residuals=lsp.num_residuals))


def run_all(lsp: LeastSquaresProblem, x0, repeats: int, solvers: Solvers | None = None):
    """The three solvers on one problem from one start; `sum_sq` filled in from the residual.

    Pass `solvers = prepare(lsp)` to share the compilations across starts.
    """
    if solvers is None:
        solvers = prepare(lsp)
    residual, jac = solvers.residual, solvers.jacobian
    optx_solve, om_problem = solvers.optimistix, solvers.outmetric
    records = [
        run_scipy_lm(residual, jac, x0, repeats),
        run_optimistix_lm(optx_solve, x0, repeats),
        run_outmetric(om_problem, x0, repeats),
    ]
    out = []
    for rec in records:
        if rec.status != "error":
            rec = rec._replace(sum_sq=sum_of_squares(residual, rec.params))
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- reporting


def machine_info() -> dict:
    """CPU model, cores, library versions, float64, OPENBLAS_NUM_THREADS, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in ("jax", "jaxlib", "optimistix", "scipy", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "float": "float64" if jax.config.jax_enable_x64 else "float32",
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": load_average(),
    }


def load_average():
    """The 1-, 5- and 15-minute load averages (other work on the machine inflates times)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line(info: dict) -> str:
    v = info["versions"]
    return (f"{info['cpu']}, {info['cores']} cores; {info['backend']} backend, jax {v['jax']}, "
            f"optimistix {v['optimistix']}, scipy {v['scipy']}; {info['float']}; "
            f"OPENBLAS_NUM_THREADS={info['openblas_num_threads']}; {info['date']}; load average "
            f"{info.get('load_average')} at the start, {info.get('load_average_end')} at the end")


def write_json(path: str, result: dict) -> None:
    """`result` as JSON with each record of `result["records"]` on one line (small, diffable)."""
    import json

    head = {k: v for k, v in result.items() if k != "records"}
    text = json.dumps(head, indent=1, allow_nan=False)
    records = ",\n".join(" " + json.dumps(r, allow_nan=False, separators=(",", ":"))
                          for r in result.get("records", []))
    text = text[:-2] + ',\n "records": [\n' + records + "\n ]\n}\n"
    with open(path, "w") as f:
        f.write(text)


def median_or_none(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def fmt_seconds(x) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"
