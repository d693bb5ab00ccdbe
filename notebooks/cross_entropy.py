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
# # The adapted flow with the cross-entropy loss
#
# With logits $x_j = f(\theta, u_j) \in \mathbb{R}^Q$ and label vectors $y_j$ (positive entries
# summing to one), the cross-entropy cost is
#
# $$C = -\frac1N\sum_j \langle y_j, \log\mathrm{softmax}(x_j)\rangle, \qquad
#   \nabla_{x_j}C = \frac{\mathrm{softmax}(x_j) - y_j}{N}.$$
#
# Under the rank condition rank $D = QN$ the adapted flow $\theta' = -D^+\nabla_x C$ moves the
# logits by exactly $x_j' = -(\mathrm{softmax}(x_j) - y_j)/N$ (DESIGN §2). The entries of this
# velocity sum to zero, so
#
# 1. each sample's **logit sum** $s_j = \langle\mathbf 1, x_j\rangle$ is conserved: the flow stays
#    on the *fibre* $\{x_j : \langle\mathbf 1, x_j\rangle = s_j(0)\}$;
# 2. on that fibre C has a unique minimiser, where $\mathrm{softmax}(x_j) = y_j$:
#
#    $$x_j^\star = \log y_j - \mathrm{mean}(\log y_j)\,\mathbf 1 + \frac{s_j(0)}{Q}\,\mathbf 1,$$
#
#    and the adapted flow converges to it; the minimum value is the labels' entropy
#    $C^\star = -\frac1N\sum_j\langle y_j, \log y_j\rangle$.
#
# The standard flow $\theta' = -D^\top\nabla_x C$ moves the logits by $-DD^\top\nabla_x C$, which
# has no reason to keep $s_j$ fixed: it also ends where $\mathrm{softmax}(x_j) = y_j$, but at
# logits shifted along $\mathbf 1$ by amounts that depend on the whole trajectory.
#
# Two ways to give labels to `om.Problem(..., loss="cross_entropy")`:
#
# - **(a)** label vectors `(N, Q)` with positive entries summing to one;
# - **(b)** integer class indices `(N,)` with `label_smoothing=s`, which become
#   $y_j = (1 - s)e_{c_j} + s/Q$ (the fibre minimiser needs $s > 0$: one-hot labels have
#   $\log 0$ entries and no minimiser at finite logits).
#
# A small tanh network ($K = 173 \ge QN = 24$), float64 throughout; a few tens of seconds on two
# CPU cores. Every section ends with `assert`s that check its claims numerically.

# %%
import os

# Single-threaded OpenBLAS keeps jaxlib's small dense solves from competing with XLA's threads;
# it must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import outmetric as om

jax.config.update("jax_enable_x64", True)

# N = 8 samples in R^2, Q = 3 classes; a tanh network 2-10-10-3 has K = 173 >= QN = 24.
N, Q = 8, 3
key_model, key_data, key_labels = jax.random.split(jax.random.PRNGKey(0), 3)
inputs = jax.random.normal(key_data, (N, 2))
apply, params0 = om.mlp(key_model, [2, 10, 10, Q])

# (a) label vectors with positive entries; (b) class indices with label smoothing s = 0.2.
label_vectors = jax.nn.softmax(0.8 * jax.random.normal(key_labels, (N, Q)), axis=1)
classes = jnp.array([0, 1, 2, 0, 1, 2, 2, 0])
smoothing = 0.2
problems = {
    "(a) label vectors": om.Problem(apply, inputs, label_vectors, loss="cross_entropy"),
    "(b) classes, s = 0.2": om.Problem(apply, inputs, classes, loss="cross_entropy",
                                       label_smoothing=smoothing),
}
# The documented smoothing: y = (1 - s) e_c + s/Q.
smoothed = (1 - smoothing) * np.eye(Q)[np.asarray(classes)] + smoothing / Q
assert np.allclose(problems["(b) classes, s = 0.2"].targets, smoothed, rtol=0, atol=1e-15)
print("K =", om.num_parameters(params0), " QN =", Q * N)
for name, problem in problems.items():
    print(name, "->", om.regime(problem, params0).name,
          "  smallest label entry:", float(problem.targets.min()))


def fibre_minimiser(x0, labels):
    """x_j* = log y_j - mean(log y_j) 1 + (s_j(0)/Q) 1  (DESIGN §2)."""
    log_y = np.log(np.asarray(labels))
    s0 = np.asarray(x0).sum(axis=1, keepdims=True)
    return log_y - log_y.mean(axis=1, keepdims=True) + s0 / labels.shape[1]


def entropy_cost(labels):
    """C* = -(1/N) sum_j <y_j, log y_j>, the value of C where softmax(x_j) = y_j."""
    labels = np.asarray(labels)
    return float(-np.sum(labels * np.log(labels)) / labels.shape[0])


def slowest_rate(labels):
    """Linearised at x*, x_j' = -(diag y_j - y_j y_j^T)(x_j - x_j*)/N on the fibre: the slowest
    decay rate is the smallest non-zero eigenvalue of diag y_j - y_j y_j^T over j, over N."""
    labels = np.asarray(labels)
    eigs = [np.linalg.eigvalsh(np.diag(y) - np.outer(y, y))[1] for y in labels]
    return min(eigs) / labels.shape[0]


# %% [markdown]
# ## 1. Cost along the adapted and the standard flow
#
# Both flows start from the same $\theta_0$ and run to the same time $T$, long enough for the
# adapted flow to converge: near $x^\star$ it decays like $e^{-\lambda s/N}$ with $\lambda$ the
# smallest non-zero eigenvalue of $\mathrm{diag}\,y_j - y_jy_j^\top$ (about $\min_q y_{jq}$), so
# $T = 40/\text{rate}$. We plot $C - C^\star$, the gap to the smallest cost any logits can reach.
# The adapted flow's output dynamics do not depend on the network at all; the standard flow's
# do, through the NTK Gram matrix $DD^\top$.

# %%
runs = {}
for name, problem in problems.items():
    T = 40.0 / slowest_rate(problem.targets)
    ts = T * jnp.linspace(0.0, 1.0, 81) ** 2  # denser early on, where the logits move most
    adapted = om.integrate(problem, params0, t1=T, ts=ts)
    standard = om.integrate(problem, params0, flow=om.standard_flow(problem), t1=T, ts=ts,
                            rtol=1e-10, atol=1e-12)
    runs[name] = {
        "problem": problem, "T": T, "ts": np.asarray(ts),
        "adapted": adapted, "standard": standard,
        "x_adapted": np.asarray(jax.vmap(problem.outputs)(adapted.params)),
        "x_standard": np.asarray(jax.vmap(problem.outputs)(standard.params)),
        "C_star": entropy_cost(problem.targets),
    }
    print(f"{name}: T = {T:.0f}, steps adapted / standard: {adapted.num_steps} / "
          f"{standard.num_steps}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, (name, run) in zip(axes, runs.items()):
    for flow in ("adapted", "standard"):
        gap = np.asarray(run[flow].costs) - run["C_star"]
        ax.semilogy(run[flow].ts, np.maximum(gap, 1e-17), label=f"{flow} flow")
    ax.set(xlabel="s", ylabel="C - C*  (clipped at 1e-17)", ylim=(5e-18, None),
           title=f"cost gap along the flows: {name}")
    ax.legend()
plt.tight_layout()
plt.show()

for name, run in runs.items():
    costs = np.asarray(run["adapted"].costs)
    gap_adapted = costs[-1] - run["C_star"]
    gap_standard = float(run["standard"].costs[-1]) - run["C_star"]
    print(f"{name}: C* = {run['C_star']:.6f}, final gap adapted {gap_adapted:.2e}, "
          f"standard {gap_standard:.2e}")
    assert run["adapted"].result == "successful" and run["standard"].result == "successful"
    assert np.all(np.diff(costs) <= 1e-14)  # C never increases along the adapted flow
    assert abs(gap_adapted) <= 1e-12  # it reaches the smallest possible cost
    assert gap_adapted < gap_standard  # and gets there faster than the standard flow

# %% [markdown]
# ## 2. Each sample's logit sum is conserved
#
# $\max_j |s_j(t) - s_j(0)|$ along both flows. Along the adapted flow it stays at the level of
# the ODE solver's error (we check ≤ 1e-8); the standard flow moves the sums by O(1).

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for name, run in runs.items():
    for flow, style in (("adapted", "-"), ("standard", "--")):
        sums = run[f"x_{flow}"].sum(axis=2)
        run[f"drift_{flow}"] = np.abs(sums - sums[0]).max(axis=1)
        ax.semilogy(run["ts"], np.maximum(run[f"drift_{flow}"], 1e-17), style,
                    label=f"{name}, {flow}")
ax.set(xlabel="s", ylabel="max_j |s_j(s) - s_j(0)|", title="drift of the logit sums")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

for name, run in runs.items():
    print(f"{name}: max logit-sum drift adapted {run['drift_adapted'].max():.2e}, "
          f"standard {run['drift_standard'].max():.2e}")
    assert run["drift_adapted"].max() <= 1e-8
    assert run["drift_standard"].max() >= 1e-2  # the standard flow leaves the fibre

# %% [markdown]
# ## 3. The limit is the closed-form fibre minimiser
#
# $\max_{j,q}|x_{jq}(s) - x^\star_{jq}|$ with $x^\star$ computed from $x(0)$ and the labels alone.
# The adapted flow converges at the linearised rate (dotted); the standard flow's logits end at
# the right softmax but a different point: shifted along $\mathbf 1$, off the fibre of $x(0)$.
# The bar chart compares $\mathrm{softmax}$ of the adapted flow's limit with the label vectors.

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
for name, run in runs.items():
    x_star = fibre_minimiser(run["x_adapted"][0], run["problem"].targets)
    run["x_star"] = x_star
    for flow, style in (("adapted", "-"), ("standard", "--")):
        run[f"distance_{flow}"] = np.abs(run[f"x_{flow}"] - x_star).max(axis=(1, 2))
        axes[0].semilogy(run["ts"], run[f"distance_{flow}"], style, label=f"{name}, {flow}")
    rate = slowest_rate(run["problem"].targets)
    d0 = run["distance_adapted"][len(run["ts"]) // 4]
    axes[0].semilogy(run["ts"], d0 * np.exp(-rate * (run["ts"] - run["ts"][len(run["ts"]) // 4])),
                     "k:", lw=0.8)
axes[0].set(xlabel="s", ylabel="max |x(s) - x*|", ylim=(1e-14, None),
            title="distance to the fibre minimiser")
axes[0].legend(fontsize=7)

for ax, (name, run) in zip(axes[1:], runs.items()):
    p_limit = np.asarray(jax.nn.softmax(run["x_adapted"][-1], axis=1))
    labels = np.asarray(run["problem"].targets)
    width = 1 / (Q + 1)
    for q in range(Q):  # one bar per class q, grouped by sample j
        pos = np.arange(N) + (q - (Q - 1) / 2) * width
        ax.bar(pos, labels[:, q], width=width, color=f"C{q}", alpha=0.5, label=f"y_j[{q}]")
        ax.plot(pos, p_limit[:, q], "k_", ms=10, mew=2)
    ax.plot([], [], "k_", ms=10, mew=2, label="softmax(x_j(T))")
    ax.set(xlabel="sample j", ylabel="probability", xticks=np.arange(N),
           ylim=(0, 1.12), title=f"softmax of the limit vs labels: {name}")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
plt.tight_layout()
plt.show()

for name, run in runs.items():
    p_limit = np.asarray(jax.nn.softmax(run["x_adapted"][-1], axis=1))
    p_standard = np.asarray(jax.nn.softmax(run["x_standard"][-1], axis=1))
    labels = np.asarray(run["problem"].targets)
    print(f"{name}: |x(T) - x*| adapted {run['distance_adapted'][-1]:.2e}, standard "
          f"{run['distance_standard'][-1]:.2e};  |softmax(x(T)) - y| adapted "
          f"{np.abs(p_limit - labels).max():.2e}, standard {np.abs(p_standard - labels).max():.2e}")
    assert run["distance_adapted"][-1] <= 1e-6
    assert np.abs(p_limit - labels).max() <= 1e-6
    assert run["distance_standard"][-1] >= 1e-2  # a different minimiser, off the fibre

# %% [markdown]
# ## 4. Linear interpolation towards the fibre minimiser
#
# `om.interpolation_flow(problem, params0)` for a cross-entropy problem aims, by default, at
# $x^\star$: $d\theta/dt = D^+(x^\star - x(\theta_0))$ moves every logit vector on the straight
# segment $x(t) = (1 - t)x(\theta_0) + t x^\star$ and reaches the minimiser at $t = 1$ (the logit
# sums stay fixed along the segment too). The adapted flow reaches the same point along a curved
# path. Both paths lie in the fibre, an affine plane parallel to $\mathbf 1^\perp$; for $Q = 3$
# that plane is 2-D, and we draw it in an orthonormal basis of $\mathbf 1^\perp$.

# %%
run = runs["(a) label vectors"]
problem = run["problem"]
interp_flow = om.interpolation_flow(problem, params0)
assert np.allclose(interp_flow.displacement, run["x_star"] - run["x_adapted"][0], rtol=0,
                   atol=1e-13)
interp = om.integrate(problem, params0, flow=interp_flow, t1=1.0, ts=jnp.linspace(0.0, 1.0, 21))
x_interp = np.asarray(jax.vmap(problem.outputs)(interp.params))
t_saved = np.asarray(interp.ts)[:, None, None]
segment = (1 - t_saved) * x_interp[0] + t_saved * run["x_star"]
deviation = np.abs(x_interp - segment).max(axis=(1, 2))

basis = np.linalg.qr(np.stack([np.ones(Q), np.eye(Q)[0], np.eye(Q)[1]], axis=1))[0][:, 1:]

fig, axes = plt.subplots(1, 2, figsize=(13, 5))
axes[0].semilogy(interp.ts, np.maximum(np.asarray(interp.costs) - run["C_star"], 1e-17), "o-",
                 label="C - C*  (clipped at 1e-17)")
axes[0].semilogy(interp.ts, np.maximum(deviation, 1e-17), "s-",
                 label="max |x(t) - ((1-t) x(0) + t x*)|")
axes[0].set(xlabel="t", title="interpolation flow")
axes[0].legend(fontsize=8)
for j, color in zip(range(4), ("C0", "C1", "C2", "C3")):
    adapted_2d = run["x_adapted"][:, j] @ basis
    interp_2d = x_interp[:, j] @ basis
    axes[1].plot(*adapted_2d.T, "-", color=color, lw=1, label=f"adapted, sample {j}")
    axes[1].plot(*interp_2d.T, ".", color=color, ms=5, label=f"interpolation, sample {j}")
    axes[1].plot(*(run["x_star"][j] @ basis), "*", color=color, ms=14, mec="k")
axes[1].set(xlabel="logits in 1-perp, coordinate 1", ylabel="coordinate 2", aspect="equal",
            title="logit paths in the fibre (stars: x*)")
axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
plt.tight_layout()
plt.show()

sums = x_interp.sum(axis=2)
print(f"interpolation: max deviation from the segment {deviation.max():.2e}, "
      f"|x(1) - x*| {np.abs(x_interp[-1] - run['x_star']).max():.2e}, "
      f"C(1) - C* {float(interp.costs[-1]) - run['C_star']:.2e}, "
      f"logit-sum drift {np.abs(sums - sums[0]).max():.2e}")
assert deviation.max() <= 1e-6
assert np.abs(x_interp[-1] - run["x_star"]).max() <= 1e-6
assert abs(float(interp.costs[-1]) - run["C_star"]) <= 1e-10
assert np.abs(sums - sums[0]).max() <= 1e-8
