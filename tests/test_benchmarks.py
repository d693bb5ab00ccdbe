"""The benchmark command's smoke run (`--quick`): it runs and writes sane files.

Never asserts a wall-clock number: the quick problems are tiny and their times mean nothing.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = ["diabetes", "pinn_poisson"]
# One pytest-xdist worker runs these tests, so the session fixture `quick_run` runs once.
pytestmark = pytest.mark.xdist_group("benchmark_quick_run")


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--problems", *PROBLEMS,
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_sane_json_markdown_and_plots(quick_run):
    out, stdout = quick_run
    for name in PROBLEMS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < png.stat().st_size < 400_000
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert "--quick" in md and "## diabetes" in md and "## pinn_poisson" in md
    assert "| outmetric |" in md and "| lbfgs |" in md and "| optx-lm |" in md
    assert "summary.md" in stdout
    # One test, not two: the 43 s run behind it then happens once under any xdist schedule.
    summary = json.loads((out / "summary.json").read_text())
    machine = summary["machine"]
    assert machine["cores"] >= 1 and machine["backend"] and machine["versions"]["jax"]
    assert summary["quick"] is True
    for name in PROBLEMS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["problem"] == name and data["cost0"] > 0
        runs = data["runs"]
        families = {row["family"] for row in runs.values()}
        assert {"outmetric", "outmetric-cg", "adam", "lbfgs", "optx-gn", "optx-lm"} <= families
        assert set(data["best_of_family"]) == families
        for row in runs.values():
            assert row["status"] in ("target", "budget", "max_steps", "halted", "non-finite")
            steps = [p[0] for p in row["trace"]]
            times = [p[1] for p in row["trace"]]
            assert steps == sorted(steps) and times == sorted(times) and times[0] == 0.0
            assert row["memory_mb"] is None or row["memory_mb"] > 0
        # outmetric's default optimizer never increases the cost and makes progress.
        ours = runs["outmetric"]
        assert math.isfinite(ours["final_cost"]) and ours["final_cost"] < 0.5 * data["cost0"]
        costs = [p[2] for p in ours["trace"]]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(costs, costs[1:]))
    pinn = json.loads((out / "pinn_poisson.json").read_text())
    assert pinn["error_targets"] == [1e-3, 1e-6]
    assert pinn["runs"]["outmetric"]["final_error"] < 1.0


def test_quick_run_reports_values_at_a_fixed_budget(quick_run):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    for name in PROBLEMS:
        data = summary["problems"][name]
        budget = data["fixed_budget_seconds"]
        assert math.isfinite(budget) and budget == data["budget_seconds"] > 0
        for row in data["table"].values():
            for key in ("cost_at_budget", "relative_cost_at_budget", "error_at_budget",
                        "budget_point", "stopped_before_budget"):
                assert key in row, (name, row["method"], key)
            assert 0.0 <= row["budget_point"]["seconds"] <= budget
            assert row["budget_point"]["step"] <= row["steps"]
            values = [row["cost_at_budget"]]
            if name == "pinn_poisson":
                values.append(row["error_at_budget"])
            else:
                assert row["error_at_budget"] is None
            if row["status"] != "non-finite":  # a diverged run keeps its non-finite value
                assert all(v is not None and math.isfinite(v) for v in values), row["method"]
            if row["stopped_before_budget"]:  # stopped before T: its final value
                assert row["cost_at_budget"] == row["final_cost"] or row["status"] == "non-finite"
        ours = data["table"]["outmetric"]
        assert math.isfinite(ours["cost_at_budget"]) and ours["cost_at_budget"] < data["cost0"]
        assert ours["relative_cost_at_budget"] == ours["cost_at_budget"] / data["cost0"]
        assert f"C/C(0) at T = {budget:g} s" in md
    assert "error at T = " in md and "fixed budget T = " in md


def test_from_results_rerenders_without_running(quick_run, tmp_path):
    out, _ = quick_run
    original = json.loads((out / "summary.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in PROBLEMS:  # the problem files only: no summary, no plots
        shutil.copy(out / f"{name}.json", copy / f"{name}.json")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--from-results", str(copy)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("summary", *PROBLEMS):
        assert (copy / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (copy / "summary.md").read_text()
    assert "--quick" in md and "## diabetes" in md and "## pinn_poisson" in md
    assert "| outmetric |" in md and "C/C(0) at T" in md
    rebuilt = json.loads((copy / "summary.json").read_text())
    assert rebuilt["quick"] is True
    # The problem files are written before the run ends: they lack only the final load average.
    assert rebuilt["machine"] == {k: v for k, v in original["machine"].items()
                                  if k != "load_average_end"}
    assert rebuilt["targets"] == original["targets"]
    for name in PROBLEMS:
        old, new = original["problems"][name]["table"], rebuilt["problems"][name]["table"]
        assert old.keys() == new.keys()
        for family in old:
            for key in ("cost_at_budget", "error_at_budget", "budget_point", "seconds_to_target"):
                a, b = old[family][key], new[family][key]
                assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
    # Into another folder: the source's summary.json supplies the total time.
    other = tmp_path / "other"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--from-results", str(out),
                           "--out", str(other)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((other / "summary.json").read_text())["total_seconds"] == pytest.approx(
        original["total_seconds"])
    assert not (other / "diabetes.json").exists()  # re-rendering writes no problem files


def test_demo_compare_runs_the_baselines(tmp_path, capsys):
    from outmetric._cli import main

    out = tmp_path / "demo"
    tiny = ["--max-samples", "24", "--width", "16", "--flow-samples", "8", "--baseline-steps",
            "40", "--no-progress", "--eps", "1e-8", "--compare", "--compare-seconds", "5"]
    assert main(["demo", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    for label in ("L-BFGS (optax)", "Gauss-Newton (optimistix)",
                  "Levenberg-Marquardt (optimistix)"):
        assert f"| {label} |" in printed
    assert str(out / "demo.png") in printed and str(out / "demo.json") in printed
    rows = {r["method"]: r for r in json.loads((out / "demo.json").read_text())["rows"]}
    assert rows["Levenberg-Marquardt (optimistix)"]["final_cost"] < rows["adam (lr 1e-3)"]["final_cost"]
    assert all(math.isfinite(r["wall_time"]) and r["steps"] >= 1 for r in rows.values())


def _finite_numbers(tree, path="result"):
    """Every number in a JSON tree is finite (booleans and strings pass)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _finite_numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            _finite_numbers(value, f"{path}[{i}]")
    elif isinstance(tree, float):
        assert math.isfinite(tree), path


def test_gpu_benchmark_tiny_mode(tmp_path):
    """`benchmarks/gpu.py --tiny` runs every part's code at tiny sizes and writes its JSON."""
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu.py"), "--tiny",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("gpu_*_tiny.json")
    data = json.loads(path.read_text())
    assert data["tiny"] is True and data["device"] and data["machine"]["device_kind"]
    results = data["results"]
    assert set(results) == {"matmul", "theorem", "krylov", "dense"}
    for part, result in results.items():
        assert "error" not in result, (part, result.get("error"))
        _finite_numbers(result, part)
    assert results["matmul"]["default"]["flops_per_s"] > 0
    theorem = results["theorem"]
    assert theorem["num_params"] >= 4 * theorem["num_rows"] and theorem["steps"] >= 1
    assert theorem["costs"][-1] < theorem["cost0"] and len(theorem["step_end_times_s"]) >= 1
    assert theorem["plan"]["method"] and theorem["wall_s"] > 0
    assert results["krylov"]["updates"][0]["solve_steps"] >= 1
    dense = results["dense"]
    assert dense["fixed_damping_step"]["min_s"] > 0 and dense["fraction_of_matmul_rate"] > 0
    assert dense["default_update"]["updates"][0]["cost_after"] <= dense["default_update"][
        "updates"][0]["cost_before"]


def test_digits_minibatch_tiny_mode(tmp_path):
    """`benchmarks/digits_minibatch.py --tiny` runs outmetric's two mini-batch rules, Adam at
    three rates on the same batches and the full-batch default, and writes its JSON and
    Markdown (a smoke test: 1 s each)."""
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "digits_minibatch.py"),
                           "--tiny", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "digits_minibatch_tiny.json").read_text())
    names = [r["name"] for r in data["runs"]]
    assert len(names) == 6 and names[1].startswith("outmetric SPRING")
    for row in data["runs"]:
        assert row["steps"] > 0 and math.isfinite(row["train_cost"])
        assert 0 <= row["test_accuracy"] <= 1
    assert data["best_adam"] in names and set(data["lower_cost_than_best_adam"]) == set(names[:2])
    md = (tmp_path / "digits_minibatch_tiny.md").read_text()
    assert "| adam(lr=0.001), mini-batch |" in md and "--tiny" in md


def test_digits_cross_entropy_tiny_mode(tmp_path):
    """`benchmarks/digits_cross_entropy.py --tiny` times the default step, races `fit` against
    Adam at three rates, and writes its JSON and Markdown (numbers unchecked: a smoke test;
    about 30 s, most of it compiling, on 2 loaded cores)."""
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "digits_cross_entropy.py"),
                           "--tiny", "--dtype", "float64", "--steps", "3", "--seeds", "1",
                           "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "digits_cross_entropy_tiny.json").read_text())
    assert data["tiny"] is True and data["machine"]["load_average_1_5_15_min"]
    [step] = data["steps"]
    assert "error" not in step, step.get("error")
    assert len(step["steps"]) == 3 and step["median_step_s"] > 0 and step["compile_s"] > 0
    assert step["plan"]["method"] in step["solvers"] and step["any_fallback"] is False
    race = data["race"]
    assert "error" not in race, race.get("error")
    assert race["outmetric"]["steps"] == 3
    assert race["outmetric"]["train_cost"] < step["costs"][0]
    assert [a["learning_rate"] for a in race["adam"]] == [1e-2, 1e-3, 1e-4]
    for row in [race["outmetric"]] + race["adam"]:
        assert 0 <= row["test_accuracy"] <= 1 and math.isfinite(row["train_cost"])
    assert [r["seed"] for r in data["races"]] == [1]  # one race per --seeds entry
    assert len(race["outmetric"]["test_accuracies"]) == len(race["outmetric"]["costs"])
    md = (tmp_path / "digits_cross_entropy_tiny.md").read_text()
    assert "--tiny" in md and "| adam(lr=0.01) |" in md and "load average" in md
    assert "## Over the seeds" in md and "| float64 | 1 |" in md
