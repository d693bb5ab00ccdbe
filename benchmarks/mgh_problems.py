"""The Moré–Garbow–Hillstrom least-squares test problems as JAX residuals.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, *Testing unconstrained optimization software*,
ACM TOMS 7(1):17–41, 1981 (MGH). All 35 problems, numbered as in the paper, with f(x) = ‖r(x)‖²
(the paper's f = Σ fᵢ², no ½). The residuals, dimensions and standard starting points follow
MINPACK's testing aids (`ssqfcn`/`initpt` of the LMDER driver, `vecfcn` of the HYBRD driver and
`objfcn`/`initpt` of the unconstrained-minimization set, netlib minpack/ex); problems outside
MINPACK-1's least-squares set use the paper's definitions, checked against those routines.
Multiples of the start follow MINPACK's `initpt`: factor·x0, except Watson (x0 = 0), whose
multiple is x = factor in every component.

`fstar` is the paper's minimum for the chosen (n, m): exact where the paper gives it exactly (0,
or a formula), otherwise the published value with `fstar_digits` significant digits. `local`
lists other minima the paper reports (value, digits, where).
"""

import math
from typing import Callable, NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class MGHProblem(NamedTuple):
    number: int
    name: str
    n: int
    m: int
    x0: tuple
    residual: Callable[[jax.Array], jax.Array]
    fstar: float
    fstar_digits: int | None = None  # None: exact
    local: tuple = ()  # ((value, digits, note), ...)
    fill_start: bool = False  # the multiple of the start is x = factor (Watson)
    note: str = ""

    def start(self, factor: float) -> np.ndarray:
        x0 = np.asarray(self.x0, dtype=float)
        if factor == 1:
            return x0
        return np.full_like(x0, float(factor)) if self.fill_start else factor * x0


def _i(m):  # 1-based index vector as float
    return jnp.arange(1, m + 1, dtype=jnp.float64)


# ----------------------------------------------------------------------------- 1–18


def rosenbrock(x):
    return jnp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


def freudenstein_roth(x):
    return jnp.stack([-13.0 + x[0] + ((5.0 - x[1]) * x[1] - 2.0) * x[1],
                      -29.0 + x[0] + ((x[1] + 1.0) * x[1] - 14.0) * x[1]])


def powell_badly_scaled(x):
    return jnp.stack([1e4 * x[0] * x[1] - 1.0, jnp.exp(-x[0]) + jnp.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x):
    return jnp.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0])


_BEALE_Y = jnp.array([1.5, 2.25, 2.625])


def beale(x):
    return _BEALE_Y - x[0] * (1.0 - x[1] ** _i(3))


def jennrich_sampson(x, m=10):
    i = _i(m)
    return 2.0 + 2.0 * i - (jnp.exp(i * x[0]) + jnp.exp(i * x[1]))


def helical_valley(x):
    tpi = 2.0 * jnp.pi
    safe = jnp.where(x[0] == 0, 1.0, x[0])
    angle = jnp.arctan(x[1] / safe) / tpi
    theta = jnp.where(x[0] > 0, angle,
                      jnp.where(x[0] < 0, angle + 0.5, jnp.where(x[1] >= 0, 0.25, -0.25)))
    return jnp.stack([10.0 * (x[2] - 10.0 * theta),
                      10.0 * (jnp.sqrt(x[0] ** 2 + x[1] ** 2) - 1.0), x[2]])


_BARD_Y = jnp.array([0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96,
                     1.34, 2.10, 4.39])


def bard(x):
    u = _i(15)
    v = 16.0 - u
    w = jnp.minimum(u, v)
    return _BARD_Y - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = jnp.array([0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989, 0.3521,
                      0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009])


def gaussian(x):
    t = (8.0 - _i(15)) / 2.0
    return x[0] * jnp.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _GAUSS_Y


_MEYER_Y = jnp.array([34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0,
                      8261.0, 7030.0, 6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0])


def meyer(x):
    t = 45.0 + 5.0 * _i(16)
    return x[0] * jnp.exp(x[1] / (t + x[2])) - _MEYER_Y


def gulf(x, m=99):
    t = _i(m) / 100.0
    y = 25.0 + (-50.0 * jnp.log(t)) ** (2.0 / 3.0)
    return jnp.exp(-jnp.abs(y - x[1]) ** x[2] / x[0]) - t


def box_3d(x, m=10):
    t = 0.1 * _i(m)
    return jnp.exp(-t * x[0]) - jnp.exp(-t * x[1]) - x[2] * (jnp.exp(-t) - jnp.exp(-10.0 * t))


def powell_singular(x):
    return jnp.stack([x[0] + 10.0 * x[1], math.sqrt(5.0) * (x[2] - x[3]),
                      (x[1] - 2.0 * x[2]) ** 2, math.sqrt(10.0) * (x[0] - x[3]) ** 2])


def wood(x):
    return jnp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0],
                      math.sqrt(90.0) * (x[3] - x[2] ** 2), 1.0 - x[2],
                      math.sqrt(10.0) * (x[1] + x[3] - 2.0), (x[1] - x[3]) / math.sqrt(10.0)])


_KO_Y = jnp.array([0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323,
                   0.0235, 0.0246])
_KO_U = jnp.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])


def kowalik_osborne(x):
    u = _KO_U
    return _KO_Y - x[0] * (u ** 2 + u * x[1]) / (u ** 2 + u * x[2] + x[3])


def brown_dennis(x, m=20):
    t = _i(m) / 5.0
    return ((x[0] + t * x[1] - jnp.exp(t)) ** 2
            + (x[2] + x[3] * jnp.sin(t) - jnp.cos(t)) ** 2)


_OSB1_Y = jnp.array([0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784,
                     0.751, 0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522,
                     0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420,
                     0.414, 0.411, 0.406])


def osborne_1(x):
    t = 10.0 * (_i(33) - 1.0)
    return _OSB1_Y - (x[0] + x[1] * jnp.exp(-t * x[3]) + x[2] * jnp.exp(-t * x[4]))


def biggs_exp6(x, m=13):
    t = 0.1 * _i(m)
    y = jnp.exp(-t) - 5.0 * jnp.exp(-10.0 * t) + 3.0 * jnp.exp(-4.0 * t)
    return (x[2] * jnp.exp(-t * x[0]) - x[3] * jnp.exp(-t * x[1])
            + x[5] * jnp.exp(-t * x[4]) - y)


_OSB2_Y = jnp.array([1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725,
                     0.746, 0.679, 0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724,
                     0.649, 0.649, 0.694, 0.644, 0.624, 0.661, 0.612, 0.558, 0.533, 0.495,
                     0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429,
                     0.523, 0.562, 0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645, 0.632,
                     0.591, 0.559, 0.597, 0.625, 0.739, 0.710, 0.729, 0.720, 0.636, 0.581,
                     0.428, 0.292, 0.162, 0.098, 0.054])


def osborne_2(x):
    t = (_i(65) - 1.0) / 10.0
    return _OSB2_Y - (x[0] * jnp.exp(-t * x[4]) + x[1] * jnp.exp(-(t - x[8]) ** 2 * x[5])
                      + x[2] * jnp.exp(-(t - x[9]) ** 2 * x[6])
                      + x[3] * jnp.exp(-(t - x[10]) ** 2 * x[7]))


def watson(x):
    n = x.shape[0]
    t = _i(29)[:, None] / 29.0
    j = jnp.arange(n, dtype=jnp.float64)[None, :]  # j - 1 for j = 1..n
    s1 = jnp.sum(j[:, 1:] * t ** (j[:, 1:] - 1.0) * x[None, 1:], axis=1)
    s2 = jnp.sum(t ** j * x[None, :], axis=1)
    return jnp.concatenate([s1 - s2 ** 2 - 1.0, jnp.stack([x[0], x[1] - x[0] ** 2 - 1.0])])


# ----------------------------------------------------------------------------- 21–35


def extended_rosenbrock(x):
    odd, even = x[0::2], x[1::2]
    return jnp.stack([10.0 * (even - odd ** 2), 1.0 - odd], axis=1).reshape(-1)


def extended_powell_singular(x):
    q = x.reshape(-1, 4)
    return jnp.stack([q[:, 0] + 10.0 * q[:, 1], math.sqrt(5.0) * (q[:, 2] - q[:, 3]),
                      (q[:, 1] - 2.0 * q[:, 2]) ** 2,
                      math.sqrt(10.0) * (q[:, 0] - q[:, 3]) ** 2], axis=1).reshape(-1)


def penalty_1(x):
    a = math.sqrt(1e-5)
    return jnp.concatenate([a * (x - 1.0), jnp.stack([jnp.sum(x ** 2) - 0.25])])


def penalty_2(x):
    n = x.shape[0]
    a = math.sqrt(1e-5)
    i = _i(n)
    y = jnp.exp(i[1:] / 10.0) + jnp.exp(i[:-1] / 10.0)
    ex = jnp.exp(x / 10.0)
    return jnp.concatenate([
        jnp.stack([x[0] - 0.2]),
        a * (ex[1:] + ex[:-1] - y),
        a * (ex[1:] - math.exp(-0.1)),
        jnp.stack([jnp.sum((n - i + 1.0) * x ** 2) - 1.0]),
    ])


def variably_dimensioned(x):
    s = jnp.sum(_i(x.shape[0]) * (x - 1.0))
    return jnp.concatenate([x - 1.0, jnp.stack([s, s ** 2])])


def trigonometric(x):
    n = x.shape[0]
    return n - jnp.sum(jnp.cos(x)) + _i(n) * (1.0 - jnp.cos(x)) - jnp.sin(x)


def brown_almost_linear(x):
    n = x.shape[0]
    head = x[:-1] + jnp.sum(x) - (n + 1.0)
    return jnp.concatenate([head, jnp.stack([jnp.prod(x) - 1.0])])


def _grid(n):
    h = 1.0 / (n + 1)
    return h, _i(n) * h


def discrete_boundary_value(x):
    n = x.shape[0]
    h, t = _grid(n)
    padded = jnp.concatenate([jnp.zeros(1), x, jnp.zeros(1)])
    return (2.0 * x - padded[:-2] - padded[2:] + h ** 2 * (x + t + 1.0) ** 3 / 2.0)


def discrete_integral_equation(x):
    n = x.shape[0]
    h, t = _grid(n)
    c = (x + t + 1.0) ** 3
    lower = jnp.tril(jnp.ones((n, n)))  # j ≤ i
    s1 = lower @ (t * c)
    s2 = (1.0 - lower) @ ((1.0 - t) * c)  # j > i
    return x + h * ((1.0 - t) * s1 + t * s2) / 2.0


def broyden_tridiagonal(x):
    padded = jnp.concatenate([jnp.zeros(1), x, jnp.zeros(1)])
    return (3.0 - 2.0 * x) * x - padded[:-2] - 2.0 * padded[2:] + 1.0


def broyden_banded(x, ml=5, mu=1):
    n = x.shape[0]
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    band = ((j >= i - ml) & (j <= i + mu) & (j != i)).astype(x.dtype)
    return x * (2.0 + 5.0 * x ** 2) + 1.0 - band @ (x * (1.0 + x))


def linear_full_rank(x, m=10):
    n = x.shape[0]
    s = 2.0 * jnp.sum(x) / m + 1.0
    return jnp.concatenate([x, jnp.zeros(m - n)]) - s


def linear_rank_1(x, m=10):
    return _i(m) * jnp.sum(_i(x.shape[0]) * x) - 1.0


def linear_rank_1_zero(x, m=10):
    n = x.shape[0]
    s = jnp.sum(_i(n)[1:-1] * x[1:-1])
    r = (_i(m) - 1.0) * s - 1.0
    return r.at[0].set(-1.0).at[m - 1].set(-1.0)


def chebyquad(x, m=None):
    n = x.shape[0]
    m = n if m is None else m
    y = 2.0 * x - 1.0
    rows = []
    t_prev, t_cur = jnp.ones_like(x), y
    for i in range(1, m + 1):
        value = jnp.sum(t_cur) / n
        if i % 2 == 0:
            value = value + 1.0 / (i * i - 1.0)
        rows.append(value)
        t_prev, t_cur = t_cur, 2.0 * y * t_cur - t_prev
    return jnp.stack(rows)


# ----------------------------------------------------------------------------- the set


def _disc_start(n):
    t = np.arange(1, n + 1) / (n + 1)
    return tuple(t * (t - 1.0))


PROBLEMS: tuple[MGHProblem, ...] = (
    MGHProblem(1, "Rosenbrock", 2, 2, (-1.2, 1.0), rosenbrock, 0.0),
    MGHProblem(2, "Freudenstein-Roth", 2, 2, (0.5, -2.0), freudenstein_roth, 0.0,
               local=((48.9842, 6, "at (11.41, -0.8968)"),)),
    MGHProblem(3, "Powell badly scaled", 2, 2, (0.0, 1.0), powell_badly_scaled, 0.0),
    MGHProblem(4, "Brown badly scaled", 2, 3, (1.0, 1.0), brown_badly_scaled, 0.0),
    MGHProblem(5, "Beale", 2, 3, (1.0, 1.0), beale, 0.0),
    MGHProblem(6, "Jennrich-Sampson", 2, 10, (0.3, 0.4), jennrich_sampson, 124.362, 6),
    MGHProblem(7, "Helical valley", 3, 3, (-1.0, 0.0, 0.0), helical_valley, 0.0),
    MGHProblem(8, "Bard", 3, 15, (1.0, 1.0, 1.0), bard, 8.21487e-3, 6,
               local=((17.4286, 6, "at (0.8406, -inf, -inf)"),)),
    MGHProblem(9, "Gaussian", 3, 15, (0.4, 1.0, 0.0), gaussian, 1.12793e-8, 6),
    MGHProblem(10, "Meyer", 3, 16, (0.02, 4000.0, 250.0), meyer, 87.9458, 6),
    MGHProblem(11, "Gulf research and development", 3, 99, (5.0, 2.5, 0.15), gulf, 0.0,
               note="m = 99 as in MINPACK's objfcn; 10·x0 = (50, 25, 1.5) is the solution"),
    MGHProblem(12, "Box 3-D", 3, 10, (0.0, 10.0, 20.0), box_3d, 0.0),
    MGHProblem(13, "Powell singular", 4, 4, (3.0, -1.0, 0.0, 1.0), powell_singular, 0.0),
    MGHProblem(14, "Wood", 4, 6, (-3.0, -1.0, -3.0, -1.0), wood, 0.0),
    MGHProblem(15, "Kowalik-Osborne", 4, 11, (0.25, 0.39, 0.415, 0.39), kowalik_osborne,
               3.07505e-4, 6, local=((1.02734e-3, 6, "at (+inf, -14.07, -inf, -inf)"),)),
    MGHProblem(16, "Brown-Dennis", 4, 20, (25.0, 5.0, -5.0, -1.0), brown_dennis, 85822.2, 6),
    MGHProblem(17, "Osborne 1", 5, 33, (0.5, 1.5, -1.0, 0.01, 0.02), osborne_1, 5.46489e-5, 6),
    MGHProblem(18, "Biggs EXP6", 6, 13, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), biggs_exp6, 0.0,
               local=((5.65565e-3, 6, "the paper's value for m = 13"),),
               note="f = 0 at (1, 10, 1, 5, 4, 3)"),
    MGHProblem(19, "Osborne 2", 11, 65, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
               osborne_2, 4.01377e-2, 6),
    MGHProblem(20, "Watson", 9, 31, (0.0,) * 9, watson, 1.39976e-6, 6, fill_start=True,
               note="n = 9; multiples of the zero start are x = factor (MINPACK initpt)"),
    MGHProblem(21, "Extended Rosenbrock", 10, 10, (-1.2, 1.0) * 5, extended_rosenbrock, 0.0),
    MGHProblem(22, "Extended Powell singular", 8, 8, (3.0, -1.0, 0.0, 1.0) * 2,
               extended_powell_singular, 0.0),
    MGHProblem(23, "Penalty I", 10, 11, tuple(float(j) for j in range(1, 11)), penalty_1,
               7.08765e-5, 6),
    MGHProblem(24, "Penalty II", 10, 20, (0.5,) * 10, penalty_2, 2.93660e-4, 6),
    MGHProblem(25, "Variably dimensioned", 10, 12, tuple(1.0 - j / 10 for j in range(1, 11)),
               variably_dimensioned, 0.0),
    MGHProblem(26, "Trigonometric", 10, 10, (0.1,) * 10, trigonometric, 0.0),
    MGHProblem(27, "Brown almost-linear", 10, 10, (0.5,) * 10, brown_almost_linear, 0.0,
               local=((1.0, None, "at (a, ..., a, (n+1) - n·a), a^n·((n+1) - n·a) = 0"),)),
    MGHProblem(28, "Discrete boundary value", 10, 10, _disc_start(10), discrete_boundary_value,
               0.0),
    MGHProblem(29, "Discrete integral equation", 10, 10, _disc_start(10),
               discrete_integral_equation, 0.0),
    MGHProblem(30, "Broyden tridiagonal", 10, 10, (-1.0,) * 10, broyden_tridiagonal, 0.0),
    MGHProblem(31, "Broyden banded", 10, 10, (-1.0,) * 10, broyden_banded, 0.0),
    MGHProblem(32, "Linear full rank", 5, 10, (1.0,) * 5, linear_full_rank, 10.0 - 5.0),
    MGHProblem(33, "Linear rank 1", 5, 10, (1.0,) * 5, linear_rank_1,
               10 * 9 / (2 * (2 * 10 + 1))),
    MGHProblem(34, "Linear rank 1, zero columns and rows", 5, 10, (1.0,) * 5, linear_rank_1_zero,
               (10 ** 2 + 3 * 10 - 6) / (2 * (2 * 10 - 3))),
    MGHProblem(35, "Chebyquad", 8, 8, tuple(j / 9 for j in range(1, 9)), chebyquad,
               3.51687e-3, 6),
)


def by_name(name: str) -> MGHProblem:
    key = name.lower().replace("_", " ").replace("-", " ")
    for p in PROBLEMS:
        if key in (p.name.lower().replace("-", " "), str(p.number), f"mgh{p.number:02d}"):
            return p
    raise KeyError(name)


def slug(p: MGHProblem) -> str:
    return f"mgh{p.number:02d}"
