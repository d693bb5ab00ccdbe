"""Every notebook under notebooks/ (jupytext percent-format `.py`) runs to completion.

Each notebook is one test, run as a script in a fresh interpreter with the non-interactive
matplotlib backend and a temporary working directory, so a figure or file it writes never
lands in the repository. A notebook added later is picked up without editing this file.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))

#: Wall-clock limit per notebook, generous against the < 60 s each is written to take.
TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{path.name} did not finish within {TIMEOUT_S} s:\n{err.stderr or ''}")
    if proc.returncode != 0:
        pytest.fail(f"{path.name} exited with status {proc.returncode}:\n"
                    f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
                    f"--- stderr (tail) ---\n{proc.stderr[-8000:]}")
