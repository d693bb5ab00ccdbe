"""x64 for theorem checks; the shared problem registry lives in helpers.py.

XLA's CPU runtime can wedge its multi-threaded Eigen pool while executing some batched
(vmapped) programs — a known XLA CPU hang that shows as a test blocked forever in
`block_until_ready`. The suite runs with that pool single-threaded; it is set before jax is
imported and inherited by the notebook and benchmark subprocesses.
"""

import os
import sys

_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"
if _EIGEN_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_EIGEN_FLAG}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))
