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
# # The uniform exponential rate and the a priori stopping time
#
# With more parameters than outputs ($K \ge QN$) and a Jacobian of full rank, the adapted flow
# $\theta' = -D^+\nabla_x C$ moves the outputs by $x' = -\nabla_x C = -(x - y)/N$, so
#
# $$x(s) - y = e^{-s/N}\,(x(0) - y), \qquad C(s) = e^{-2s/N}\,C(0),$$
#
# **whatever the architecture and the initialisation**. The time needed to reach a cost
# $\varepsilon$ is therefore known before training starts:
# $T(\varepsilon) = \frac N2\ln\frac{C(0)}{\varepsilon}$ (Chen, arXiv 2311.15487).
#
# This notebook checks both statements numerically, compares the standard gradient flow, and
# shows what the optimizer (the Euler discretisation with step $h = \eta N$) does with them.

# %%
import os

# CPU tip: jaxlib's dense factorizations (Cholesky, QR, SVD) run on scipy's OpenBLAS, whose
# thread pool competes with XLA's; single-threaded OpenBLAS makes a small Cholesky ~100×
# faster here. It must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import outmetric as om

jax.config.update("jax_enable_x64", True)

# N = 24 samples in R^4 of a smooth function; Q = 1. (Equispaced 1-D inputs would make D
# numerically singular, σ_min/σ_max ≈ 1e-11 for these networks: the regime of the theorem is
# full rank, and the flow is then too stiff to integrate cheaply.)
N = 24
u = jax.random.normal(jax.random.PRNGKey(42), (N, 4))
y = jnp.sin(u @ jnp.array([1.0, -2.0, 0.5, 1.0]))[:, None]

# %% [markdown]
# ## One rate for every initialisation and architecture
#
# Three random initialisations of a tanh network 4-16-16-1 and one GELU network 4-24-24-1,
# all with $K \ge N$. Each is integrated by diffrax (Tsit5, relative tolerance 1e-10) to the a
# priori stopping time $T(\varepsilon)$ for $\varepsilon = 10^{-10}$. The Gram matrices are well
# conditioned here (σ_min/σ_max ≈ 1e-2), so the flow uses the Cholesky solve, which compiles
# faster than the default QR.

# %%
EPS = 1e-10
TOL = dict(rtol=1e-10, atol=1e-13)
runs = {}


def adapted_run(apply, params):
    problem = om.Problem(apply, u, y)
    flow = om.adapted_flow(problem, solver="cholesky")
    return problem, om.integrate(problem, params, flow=flow, eps=EPS, **TOL)


start = time.perf_counter()
for seed in range(3):
    apply, params = om.mlp(jax.random.PRNGKey(seed), [4, 16, 16, 1], "tanh")
    runs[f"tanh 4-16-16-1, seed {seed}"] = adapted_run(apply, params)
runs["gelu 4-24-24-1"] = adapted_run(*om.mlp(jax.random.PRNGKey(7), [4, 24, 24, 1], "gelu"))
print(f"4 integrations in {time.perf_counter() - start:.1f} s")

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
worst = 0.0
for label, (problem, traj) in runs.items():
    ts, costs = np.asarray(traj.ts), np.asarray(traj.costs)
    predicted = costs[0] * np.exp(-2 * ts / N)
    deviation = np.abs(np.log(costs / predicted))
    worst = max(worst, deviation.max())
    ax0.semilogy(ts, costs, label=f"{label} (C(0) = {costs[0]:.2f})")
    ax1.semilogy(ts, costs / costs[0], lw=3, alpha=0.5)
s = np.linspace(0, max(float(t.ts[-1]) for _, t in runs.values()), 100)
ax1.semilogy(s, np.exp(-2 * s / N), "k--", label=r"$e^{-2s/N}$")
ax0.set(xlabel="flow time s", ylabel="C(s)", title="adapted flow, four starts")
ax1.set(xlabel="flow time s", ylabel="C(s) / C(0)", title="all on one line")
ax0.legend(fontsize=7)
ax1.legend()
fig.tight_layout()
plt.show()
print(f"largest |log(C(s) / (C(0)e^(-2s/N)))| over all paths: {worst:.2e}")
assert worst < 1e-5

# %% [markdown]
# ## The a priori stopping time
#
# For each run, integrate to $T(\varepsilon)$ computed from $C(0)$ alone, and compare the cost
# reached with $\varepsilon$. (The integration stops at $C \le \varepsilon$; the theorem says that
# happens exactly at $T(\varepsilon)$.)

# %%
print(f"{'run':28s} {'C(0)':>8s} {'T(eps)':>8s} {'s at stop':>10s} {'C at stop':>10s}")
for label, (problem, traj) in runs.items():
    cost0 = float(traj.costs[0])
    print(f"{label:28s} {cost0:8.3f} {traj.stopping_time:8.2f} {float(traj.ts[-1]):10.2f} "
          f"{float(traj.costs[-1]):10.3e}")
    assert abs(float(traj.ts[-1]) - traj.stopping_time) < 1e-3 * traj.stopping_time

# %% [markdown]
# Any other target works the same way: the saved time $s_i$ is the stopping time of
# $\varepsilon_i = C(0)e^{-2s_i/N}$, and the cost measured there is that $\varepsilon_i$.

# %%
problem, traj = runs["tanh 4-16-16-1, seed 0"]
ts, costs = np.asarray(traj.ts)[1:], np.asarray(traj.costs)[1:]
epsilons = float(traj.costs[0]) * np.exp(-2 * ts / N)
T = np.array([om.stopping_time(float(traj.costs[0]), e, N) for e in epsilons])
np.testing.assert_allclose(T, ts, rtol=1e-9)
fig, ax = plt.subplots(figsize=(5.5, 4))
ax.loglog(epsilons, costs, "o", ms=3, label="C(T(ε)) measured")
ax.loglog(epsilons, epsilons, "k--", label="C = ε")
ax.set(xlabel="target ε", ylabel="cost at T(ε)", title="a priori stopping time")
ax.legend()
fig.tight_layout()
plt.show()
np.testing.assert_allclose(costs, epsilons, rtol=1e-5)

# %% [markdown]
# ## The standard flow has no such rate
#
# The standard flow $\theta' = -\nabla_\theta C$ moves the outputs by $x' = -DD^\top\nabla_x C$:
# each eigen-direction of the NTK Gram matrix $DD^\top$ decays at its own rate. With the
# smallest eigenvalues near zero, the cost stalls long before $\varepsilon$.

# %%
problem, traj = runs["tanh 4-16-16-1, seed 0"]
params0 = jax.tree_util.tree_map(lambda a: a[0], traj.params)
gram_eigs = np.linalg.eigvalsh(np.asarray(problem.jacobian(params0) @ problem.jacobian(params0).T))
standard = om.integrate(problem, params0, flow=om.standard_flow(problem),
                        t1=float(traj.stopping_time), rtol=1e-8, atol=1e-10)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
ax0.semilogy(traj.ts, traj.costs, label="adapted flow")
ax0.semilogy(standard.ts, standard.costs, label="standard flow")
ax0.axhline(EPS, color="gray", ls=":", label="ε")
ax0.set(xlabel="flow time s", ylabel="C", title="same start, same time")
ax0.legend()
ax1.semilogy(np.sort(gram_eigs)[::-1], "o", ms=3)
ax1.set(xlabel="index", ylabel="eigenvalue", title=r"spectrum of the NTK Gram $DD^\top$ at θ(0)")
fig.tight_layout()
plt.show()
print(f"standard flow at s = T(eps): C = {float(standard.costs[-1]):.3e} (adapted: "
      f"{float(traj.costs[-1]):.3e}); Gram eigenvalues from {gram_eigs.max():.2e} down to "
      f"{gram_eigs.min():.2e}")
assert float(standard.costs[-1]) > 1e3 * EPS

# %% [markdown]
# ## The discrete method: $(1-\eta)^2$ per step
#
# Output-metric descent takes the Euler step of the adapted flow with time step $h = \eta N$:
# $\Delta\theta = -\eta D^+(x - y)$. For a model linear in θ the residual shrinks by exactly
# $(1-\eta)$, so $C_k = (1-\eta)^{2k}C_0$; for a network it does so up to the curvature of the
# model, $O(\eta^2\lVert x - y\rVert^2)$ per step, which vanishes as the residual does. The plain
# step (`damping=0`, no line search) with η = 1/2 and η = 1:

# %%
fig, ax = plt.subplots(figsize=(6, 4))
apply, params = om.mlp(jax.random.PRNGKey(0), [4, 16, 16, 1], "tanh")
problem = om.Problem(apply, u, y)
for eta, color in ((0.5, "C0"), (1.0, "C1")):
    opt = om.output_metric_descent(eta, damping=0.0, linesearch=None)
    result = om.fit(problem, params, opt, max_steps=40 if eta < 1 else 8, eps=1e-24,
                    progress=False)
    k = np.arange(len(result.costs))
    ax.semilogy(k, result.costs, "o-", color=color, ms=3, label=f"η = {eta}: measured")
    if eta < 1:
        ax.semilogy(k, result.costs[0] * (1 - eta) ** (2 * k), "--", color=color,
                    label=r"$(1-\eta)^{2k}C_0$")
        ratios = result.costs[1:] / result.costs[:-1]
        print(f"η = {eta}: per-step ratio C_k+1/C_k, last ten: {np.round(ratios[-10:], 6)}")
        assert np.allclose(ratios[-10:], (1 - eta) ** 2, rtol=1e-3)
    else:
        print(f"η = 1 (Newton's method on x(θ) = y): costs {np.array2string(result.costs, precision=2)}")
ax.set(xlabel="step k", ylabel="C", title="output-metric descent, plain step")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## At full size: all 1,797 digits
#
# The same statement on a real dataset: one-hot regression of the ten digit classes on all
# 1,797 scikit-learn digits ($QN = 17{,}970$) with a 64-959-10 tanh MLP ($K = 71{,}935 \ge
# 4QN$), trained by the default `om.fit` until $C \le 10^{-10}C(0)$. It takes minutes on two
# CPU cores, so this section plots the record that `python benchmarks/digits_theorem.py`
# writes to `benchmarks/results/digits_theorem.json` (rerun that command to regenerate it):
# the measured cost per step beside the flow's $C(0)e^{-2k}$ at flow time $s = kN$ (η = 1),
# the per-step rate $C_{k+1}/C_k$, and the cost against wall time beside Adam (best of three
# learning rates) and L-BFGS, each given outmetric's time.

# %%
import json
import pathlib

results = pathlib.Path(om.__file__).resolve().parent.parent / "benchmarks" / "results"
record_path = results / "digits_theorem.json"
if not record_path.exists():
    print(f"{record_path} not found: run `python benchmarks/digits_theorem.py` first")
else:
    record = json.loads(record_path.read_text())
    run = record["outmetric"]
    costs = np.array(run["costs"]) / run["cost0"]
    k = np.arange(len(costs))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    ax1.semilogy(k, costs, "o-", ms=3, label="default om.fit (measured)")
    ax1.semilogy(k, np.exp(-2.0 * k), "k--", label=r"flow $C(0)e^{-2k}$")
    ax1.axhline(1e-10, color="grey", lw=0.8)
    ax1.set(xlabel="step k", ylabel="C / C(0)", ylim=(1e-13, 10))
    ax1.legend(fontsize=8)
    ax2.plot(k[1:], costs[1:] / costs[:-1], "o-", ms=3, label=r"$C_{k+1}/C_k$")
    ax2.axhline(np.exp(-2.0), color="k", ls="--", label=r"flow: $e^{-2}$ per unit step")
    ax2.set(xlabel="step k", ylabel="per-step rate", yscale="log")
    ax2.legend(fontsize=8)
    times = [0.0] + run["step_end_times_s"]
    ax3.semilogy(times[:len(costs)], costs, "o-", ms=3, label="outmetric (with compilation)")
    for baseline in record.get("baselines", []):
        trace = np.array(baseline["trace"])
        ax3.semilogy(trace[:, 1], trace[:, 2] / run["cost0"], label=baseline["name"])
    ax3.axhline(1e-10, color="grey", lw=0.8)
    ax3.set(xlabel="wall time (s)", ylim=(1e-13, 10))
    ax3.legend(fontsize=7)
    fig.suptitle(f"digits: N = {run['num_samples']}, QN = {run['num_rows']}, "
                 f"K = {run['num_params']}", fontsize=10)
    fig.tight_layout()
    plt.show()
    print(f"{run['steps']} steps, {run['wall_s']:.0f} s: C = {costs[-1]:.2e}·C(0); "
          f"peak memory {run['peak_bytes'] / 2**30:.2f} GiB")
    for baseline in record.get("baselines", []):
        print(f"  {baseline['name']:>14}: {baseline['final_relative_cost']:.2e}·C(0) "
              f"in {baseline['seconds']:.0f} s")
    assert costs[-1] <= 1e-10 and run["reached"]
