"""Reliability, second part: named errors for more bad input, integrate's tolerances at any
parameter scale and its diffrax options, output precision, jit of a Problem's methods, and
checkpoints that two runs, a foreign file, another model or a killed writer cannot spoil."""

import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
import tomllib

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import outmetric as om
from helpers import make_problem, tanh_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

P, S = make_problem("tanh_mlp", n=4, q=2, width=4, depth=1)
APPLY = tanh_mlp(jax.random.PRNGKey(0), 5, 2, width=4, depth=1).apply
X, Y = P.inputs, P.targets
LABELS = jax.nn.softmax(Y, axis=1)  # valid cross-entropy label vectors
#: One optimizer object for every checkpoint test, so its loop compiles once (and fast).
SGD = optax.sgd(0.05)


def fit(*args, **kwargs):
    return om.fit(*args, progress=False, **kwargs)


def batch_model(params, inputs):
    """A model written for a batch (n, d): it flattens each row, so one sample (d,) breaks it."""
    return APPLY(params, inputs.reshape(inputs.shape[0], -1))


def foreign_file(tmp):
    path = os.path.join(tmp, "checkpoint.npz")
    np.savez(path, weights=np.arange(3.0))
    return path


# ------------------------------------------------------------------------------- dependencies


def test_every_imported_package_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = {re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower()
                    for dep in tomllib.load(f)["project"]["dependencies"]}
    imported = set()
    folder = os.path.join(ROOT, "outmetric")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            guarded = set()  # imports inside `try: ... except ImportError` are optional
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and any(
                        isinstance(h.type, ast.Name) and h.type.id in ("ImportError",
                                                                       "ModuleNotFoundError")
                        for h in node.handlers):
                    guarded |= {id(n) for part in node.body for n in ast.walk(part)}
            for node in ast.walk(tree):
                names = set()
                if isinstance(node, ast.Import):
                    names = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = {node.module.split(".")[0]}
                if id(node) not in guarded:
                    imported |= names
    assert "jaxtyping" in imported
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party - declared == set()
