"""x64 for theorem checks; the shared problem registry lives in helpers.py.

XLA's CPU runtime can wedge its multi-threaded Eigen pool while executing some batched
(vmapped) programs — a known XLA CPU hang that shows as a test blocked forever in
`block_until_ready`. The suite runs with that pool single-threaded. That flag and the two that
make compiling cheaper (below) are set before jax is imported and are inherited by the
notebook and benchmark subprocesses.
"""

import os
import shutil
import sys
import tempfile

# Compiling is most of the suite's time (its programs are small and run briefly), and XLA:CPU
# compiles them about 5x faster with its legacy loop emitters and without LLVM's optimisation
# passes: the same HLO, slower machine code. Measured on 2 cores, tests/test_scale.py and
# tests/test_flows.py under `-n 2`: 169 s -> 92 s. A flag already in XLA_FLAGS is kept as it is
# (set `--xla_backend_optimization_level=2` to test XLA's optimised code).
_SUITE_FLAGS = {"--xla_cpu_multi_thread_eigen": "false",
                "--xla_cpu_use_fusion_emitters": "false",
                "--xla_backend_optimization_level": "0"}
for _flag, _value in _SUITE_FLAGS.items():
    if _flag + "=" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

# One persistent XLA compilation cache per test run, shared by the pytest-xdist workers and the
# notebook, benchmark and CLI subprocesses they start: the tests build the same small programs
# again and again from fresh closures (the same HLO), and compiling is most of their time
# (measured: 12-19 % less wall time on 2 cores, same-time A/B runs). The controller creates it
# and removes it at the end; a JAX_COMPILATION_CACHE_DIR already set is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="outmetric-tests-xla-")
    os.environ["OUTMETRIC_TESTS_OWN_XLA_CACHE"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.path.dirname(__file__))


_UNGROUPED: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Note the tests `--dist loadgroup` has silently stopped grouping; they then fail.

    pytest-xdist groups a test by appending ``@<group>`` to its node id on each worker; some
    pytest releases drop that change (pytest-dev/pytest-xdist#1386), and each worker then runs
    the shared session fixtures (a 40–100 s benchmark run) once more, with nothing failing.
    """
    if getattr(config.option, "loadgroup", False):  # set on each worker by pytest-xdist
        _UNGROUPED.update(item.nodeid for item in items
                          if item.get_closest_marker("xdist_group") and "@" not in item.nodeid)


def pytest_runtest_setup(item):
    if item.nodeid in _UNGROUPED:
        pytest.fail(f"--dist loadgroup ignored this test's xdist_group mark with pytest "
                    f"{pytest.__version__} (pytest-dev/pytest-xdist#1386): install the test "
                    "extra's pinned pytest (pyproject.toml)", pytrace=False)


def pytest_unconfigure(config):
    if os.environ.get("OUTMETRIC_TESTS_OWN_XLA_CACHE") == str(os.getpid()):  # the creator only
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
