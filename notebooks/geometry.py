# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The geometry of output-metric descent
#
# Everything about the adapted flow $\theta' = -D^+\nabla_x C$ is read off the output Jacobian
# $D(\theta) \in \mathbb{R}^{QN\times K}$ (DESIGN §2):
#
# 1. the **rank condition** rank $D = QN$ and the spectrum of $D$ along training;
# 2. the **sub-Riemannian split** $\mathbb{R}^K = H \oplus V$ into horizontal
#    $H = \operatorname{range} D^\top$ and vertical $V = \ker D$ directions, and lengths in the
#    pull-back metric $g(u, v) = \langle Du, Dv\rangle$;
# 3. **critical sets**: equilibria $\{D^\top\nabla_x C = 0\}$ come in manifolds, whose dimension
#    is the nullity of the Hessian;
# 4. the **homotopy** $V_\alpha = -[(1-\alpha)I + \alpha(D^\top D)^+]D^\top\nabla_x C$ from the
#    standard ($\alpha = 0$) to the adapted flow ($\alpha = 1$);
# 5. **linear interpolation**: $d\theta/dt = D^+(y - x(\theta_0))$ reaches the global minimum at
#    $t = 1$.
#
# The models are small (a few hundred parameters) so that the notebook runs in well under a
# minute on two CPU cores; float64 throughout.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

import outmetric as om

jax.config.update("jax_enable_x64", True)


def flat(tree):
    return ravel_pytree(tree)[0]


# N = 12 samples of a 1-D function, Q = 1; a tanh network 1-12-12-1 has K = 193 >= QN = 12.
N = 12
u = jnp.linspace(-1.0, 1.0, N)[:, None]
y = jnp.sin(3 * u) + 0.3 * jnp.cos(7 * u)
apply, params0 = om.mlp(jax.random.PRNGKey(0), [1, 12, 12, 1])
problem = om.Problem(apply, u, y)
K, M = om.num_parameters(params0), N
print("K =", K, " QN =", M)
print(om.regime(problem, params0))

# %% [markdown]
# ## 1. The homotopy family, and the spectrum of D along training
#
# One integration per $\alpha \in \{0, 0.5, 1\}$ over the same time span. $\alpha$ is an array
# leaf of the flow, so the three integrations share a single compilation. The adapted flow
# ($\alpha = 1$) follows $C(s) = C(0)e^{-2s/N}$ exactly; the standard flow slows down as soon as
# the residual sits in directions where $DD^\top$ has small eigenvalues.

# %%
T = 0.5 * N * np.log(float(problem.cost(params0)) / 1e-8)  # the a priori stopping time T(1e-8)
ts = jnp.linspace(0.0, T, 41)
alphas = [0.0, 0.5, 1.0]
paths = {a: om.integrate(problem, params0, flow=om.homotopy_flow(problem, a), t1=T, ts=ts,
                         rtol=1e-9, atol=1e-12)
         for a in alphas}

spectra = {a: np.stack([np.asarray(om.jacobian_spectrum(problem, jax.tree_util.tree_map(
    lambda leaf: leaf[i], paths[a].params))) for i in range(len(ts))]) for a in (0.0, 1.0)}

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for a in alphas:
    axes[0].semilogy(paths[a].ts, paths[a].costs, label=f"alpha = {a}")
axes[0].semilogy(ts, paths[1.0].costs[0] * np.exp(-2 * ts / N), "k:", label="C(0) exp(-2s/N)")
axes[0].set(xlabel="s", ylabel="C", title="homotopy: cost along the flows")
axes[0].legend()
for ax, a, name in ((axes[1], 1.0, "adapted"), (axes[2], 0.0, "standard")):
    ax.semilogy(ts, spectra[a], lw=0.8)
    ax.set(xlabel="s", ylabel="singular values of D", title=f"spectrum of D along the {name} flow")
plt.tight_layout()
plt.show()
print("smallest singular value, start -> end (adapted):", spectra[1.0][0, -1], "->",
      spectra[1.0][-1, -1])
print(om.regime(problem, paths[1.0].final_params))

# %% [markdown]
# ## 2. Horizontal and vertical directions; the pull-back length
#
# The adapted velocity $-D^+\nabla_x C$ and the standard velocity $-D^\top\nabla_x C$ both lie in
# $H = \operatorname{range} D^\top$: their vertical parts vanish. A random direction is mostly
# vertical ($\dim V = K - QN$), and so is weight decay $-\theta$: it moves the parameters along
# the fibres of $\theta \mapsto x(\theta)$ without changing the outputs to first order.
#
# The g-length of a path is the Euclidean length of its output path. The adapted flow moves
# the outputs along the straight segment from $x(0)$ to $y$, so its length is
# $\|x(0) - y\| - \|x(s) - y\|$; the standard flow's output path is curved and longer.

# %%
adapted = jax.jit(lambda p: om.adapted_flow(problem)(0.0, p))
standard = jax.jit(lambda p: om.standard_flow(problem)(0.0, p))
random_v = jax.tree_util.tree_map(lambda leaf: jax.random.normal(jax.random.PRNGKey(1), leaf.shape),
                                  params0)


def vertical_fraction(params, v):
    return float(jnp.linalg.norm(flat(om.vertical(problem, params, v))) / jnp.linalg.norm(flat(v)))


rows = {"adapted velocity": [], "standard velocity": [], "random direction": [],
        "weight decay -theta": []}
for i in range(0, len(ts), 4):
    p = jax.tree_util.tree_map(lambda leaf: leaf[i], paths[1.0].params)
    rows["adapted velocity"].append(vertical_fraction(p, adapted(p)))
    rows["standard velocity"].append(vertical_fraction(p, standard(p)))
    rows["random direction"].append(vertical_fraction(p, random_v))
    rows["weight decay -theta"].append(vertical_fraction(p, jax.tree_util.tree_map(jnp.negative, p)))

x_path = {a: np.asarray(jax.vmap(problem.outputs)(paths[a].params))[..., 0] for a in (0.0, 1.0)}
distance = np.linalg.norm(x_path[1.0] - np.asarray(y)[:, 0], axis=1)
length = {a: np.asarray(om.pullback_length(problem, paths[a], cumulative=True)) for a in (0.0, 1.0)}

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, values in rows.items():
    axes[0].semilogy(ts[::4], np.maximum(values, 1e-18), "o-", label=name)
axes[0].set(xlabel="s", ylabel="||v_V|| / ||v||", title="vertical fraction along the adapted flow")
axes[0].legend(fontsize=8)
axes[1].plot(ts, length[1.0], label="g-length, adapted")
axes[1].plot(ts, distance[0] - distance, "k:", label="||x(0) - y|| - ||x(s) - y||")
axes[1].plot(ts, length[0.0], label="g-length, standard")
axes[1].set(xlabel="s", title="pull-back length of the orbit")
axes[1].legend(fontsize=8)
j, k = 2, 8  # two samples: the output plane (x_j, x_k)
for a, name in ((1.0, "adapted: a segment"), (0.0, "standard: curved")):
    axes[2].plot(x_path[a][:, j], x_path[a][:, k], ".-", label=name)
axes[2].plot(y[j, 0], y[k, 0], "k*", ms=12, label="target y")
axes[2].set(xlabel=f"x_{j}", ylabel=f"x_{k}", title="output paths")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()
print("relative gap, adapted length vs output distance:",
      abs(length[1.0][-1] - (distance[0] - distance[-1])) / (distance[0] - distance[-1]))

# %% [markdown]
# ## 3. Critical sets
#
# **Global minima of an overparametrised fit.** With rank $D = QN$ at a point where $x = y$, the
# Hessian is $D^\top D/N$: $K - QN$ zero eigenvalues, the tangent space of the fibre
# $\{x(\theta) = y\}$. Two Gauss–Newton steps $\theta \leftarrow \theta - D^+(x - y)$ polish the end
# of the adapted flow to round-off first.
#
# **Duplicated hidden units.** A 2-3-1 tanh network fitted *exactly* by a teacher of the same
# shape, embedded into width 5 by splitting two hidden units (outgoing weights $\lambda a$ and
# $(1-\lambda)a$): the function is unchanged, $D$ gains 8 columns but no rank, so the Hessian
# $D^\top D/N$ has nullity $2(d + 2) = 8$. Along the splitting line $\lambda \mapsto \theta_\lambda$
# the cost stays at its minimum; along a generic direction it rises.

# %%
@jax.jit
def gauss_newton(theta):
    direction, _, _ = om.output_metric_gradient(problem, theta)
    return jax.tree_util.tree_map(lambda p, d: p - N * d, theta, direction)


def hessian_magnitudes(problem, params):
    f, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda z: problem.cost(unravel(z))))(f)
    return np.abs(np.linalg.eigvalsh(hessian))


theta = paths[1.0].final_params
for _ in range(2):
    theta = gauss_newton(theta)
print("cost at the polished minimum:", float(problem.cost(theta)),
      " equilibrium:", bool(om.is_equilibrium(problem, theta)))
dim_minima = om.critical_dimension(problem, theta)
print("critical_dimension:", dim_minima, "  K - QN =", K - M)
eig_minima = hessian_magnitudes(problem, theta)


def one_hidden_tanh(p, v):
    return jnp.tanh(v @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


keys = jax.random.split(jax.random.PRNGKey(4), 5)
u2 = jax.random.normal(keys[0], (24, 2))
teacher = {"w1": jax.random.normal(keys[1], (2, 3)), "b1": 0.5 * jax.random.normal(keys[2], (3,)),
           "w2": jax.random.normal(keys[3], (3, 1)), "b2": jnp.zeros(1)}
problem2 = om.Problem(one_hidden_tanh, u2, jax.vmap(one_hidden_tanh, (None, 0))(teacher, u2))


def split(p, lam):
    a = p["w2"][:, 0]
    return {"w1": jnp.concatenate([p["w1"], p["w1"][:, :2]], axis=1),
            "b1": jnp.concatenate([p["b1"], p["b1"][:2]]),
            "w2": jnp.concatenate([a.at[:2].multiply(lam), (1 - lam) * a[:2]])[:, None],
            "b2": p["b2"]}


wide = split(teacher, jnp.array([0.3, 0.6]))
print(om.regime(problem2, wide))
print("critical_dimension (split units):", om.critical_dimension(problem2, wide), " by hand: 8")
eig_wide = hessian_magnitudes(problem2, wide)

lams = jnp.linspace(-1.0, 2.0, 61)
f_wide, unravel_wide = ravel_pytree(wide)
generic = jax.random.normal(keys[4], f_wide.shape)
generic = generic / jnp.linalg.norm(generic)
along_line = jax.vmap(lambda lam: problem2.cost(split(teacher, jnp.array([lam, 0.6]))))(lams)
along_generic = jax.vmap(
    lambda lam: problem2.cost(unravel_wide(f_wide + 0.5 * (lam - 0.3) * generic)))(lams)

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for ax, eig, dim, title in ((axes[0], eig_minima, dim_minima, "global minima, 1-12-12-1"),
                            (axes[1], eig_wide, 8, "split units, 2-5-1")):
    ax.semilogy(np.sort(eig)[::-1] / eig.max() + 1e-20, ".")
    ax.axhline(np.sqrt(np.finfo(float).eps), color="k", ls=":", label="tol = sqrt(eps)")
    ax.axvline(len(eig) - dim - 0.5, color="r", ls="--", label=f"nullity {dim}")
    ax.set(xlabel="index", ylabel="|eigenvalue| / max", title=f"Hessian spectrum: {title}")
    ax.legend(fontsize=8)
axes[2].semilogy(lams, np.maximum(along_line, 1e-34), label="along the splitting line")
axes[2].semilogy(lams, np.maximum(along_generic, 1e-34), label="along a generic direction")
axes[2].set(xlabel="lambda", ylabel="C", title="a line of global minima")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. All homotopy fields vanish at the same points
#
# $\|V_\alpha\|$ for $\alpha \in [0, 1]$ at the start (a non-equilibrium) and at the split-unit
# critical point: zero for every $\alpha$ at the equilibrium, positive for every $\alpha$ elsewhere.

# %%
field = jax.jit(lambda a, p: jnp.linalg.norm(flat(om.homotopy_flow(problem, a)(0.0, p))))
field2 = jax.jit(lambda a, p: jnp.linalg.norm(flat(om.homotopy_flow(problem2, a)(0.0, p))))
alpha_grid = np.linspace(0.0, 1.0, 11)
start = [float(field(a, params0)) for a in alpha_grid]
at_critical = [float(field2(a, wide)) for a in alpha_grid]
plt.figure(figsize=(5, 4))
plt.semilogy(alpha_grid, start, "o-", label="at theta(0) (not critical)")
plt.semilogy(alpha_grid, np.maximum(at_critical, 1e-20), "s-", label="at the split-unit minimum")
plt.xlabel("alpha")
plt.ylabel("||V_alpha||")
plt.legend()
plt.title("homotopy fields")
plt.show()

# %% [markdown]
# ## 5. Linear interpolation in output space
#
# $d\theta/dt = D^+(y - x(\theta_0))$ for $t \in [0, 1]$ moves every output on the segment
# $x(t) = (1 - t)x(\theta_0) + ty$ and reaches the global minimum at $t = 1$ — the adapted flow
# with time $t = 1 - e^{-s/N}$.

# %%
interp = om.integrate(problem, params0, flow=om.interpolation_flow(problem, params0), t1=1.0,
                      ts=jnp.linspace(0.0, 1.0, 11))
x_interp = np.asarray(jax.vmap(problem.outputs)(interp.params))[..., 0]
x0 = x_interp[0]
t_saved = np.asarray(interp.ts)[:, None]
predicted = (1 - t_saved) * x0 + t_saved * np.asarray(y)[:, 0]
print("max |x(t) - ((1 - t) x(0) + t y)|:", np.abs(x_interp - predicted).max())
print("cost at t = 1:", float(interp.costs[-1]))

grid = jnp.linspace(-1.0, 1.0, 200)[:, None]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for i in range(0, 11, 2):
    p = jax.tree_util.tree_map(lambda leaf: leaf[i], interp.params)
    axes[0].plot(grid[:, 0], jax.vmap(apply, (None, 0))(p, grid)[:, 0], lw=1,
                 label=f"t = {float(interp.ts[i]):.1f}")
axes[0].plot(u[:, 0], y[:, 0], "k*", label="data")
axes[0].set(xlabel="u", title="the network along the interpolation flow")
axes[0].legend(fontsize=8)
t_of_s = 1 - np.exp(-np.asarray(ts) / N)
for j in (0, 5, 11):
    axes[1].plot(interp.ts, x_interp[:, j], "o", label=f"interpolation, x_{j}")
    axes[1].plot(t_of_s, x_path[1.0][:, j], "-", label=f"adapted, x_{j} at t = 1 - exp(-s/N)")
axes[1].set(xlabel="t", ylabel="output", title="outputs move on straight lines")
axes[1].legend(fontsize=7)
plt.tight_layout()
plt.show()
