"""`outmetric demo` on a tiny setting, the data loader, and the CLI's errors."""

import json
import os

import numpy as np
import pytest

import outmetric as om
from outmetric._cli import main

TINY = ["--max-samples", "24", "--width", "16", "--flow-samples", "8", "--baseline-steps", "40",
        "--no-progress", "--eps", "1e-8"]


def test_demo_writes_plot_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| adapted flow" in printed and "| output-metric descent" in printed
    png = out / "demo.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "demo.json").read_text())["rows"]
    flow = rows[0]
    assert flow["final_cost"] <= 1e-8 * (1 + 1e-6)
    np.testing.assert_allclose(flow["predicted_cost"], 1e-8, rtol=1e-6)
    assert rows[1]["final_cost"] <= 1e-8  # output-metric descent reaches eps


def test_demo_on_user_csv_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    y = np.sin(x[:, 0]) + x[:, 1]
    csv = tmp_path / "data.csv"
    np.savetxt(csv, np.column_stack([x, y]), delimiter=",", header="a,b,c,y", comments="")
    npz = tmp_path / "data.npz"
    np.savez(npz, inputs=x, targets=y)
    for path in (csv, npz):
        data = om.load_dataset(str(path))
        assert data.inputs.shape == (20, 3) and data.targets.shape == (20, 1)
        np.testing.assert_allclose(data.targets.std(), 1.0)
        assert main(["demo", "--data", str(path), "--out", str(tmp_path / path.suffix[1:]),
                     *TINY]) == 0


def test_bundled_dataset():
    data = om.load_dataset()
    assert data.inputs.shape == (442, 10) and data.targets.shape == (442, 1)
    assert os.path.isfile(om.bundled_dataset_path())


def test_bundled_digits():
    data = om.load_digits()
    assert data.inputs.shape == (1797, 64) and data.targets.shape == (1797, 10)
    assert data.inputs.min() == 0.0 and data.inputs.max() == 1.0
    np.testing.assert_array_equal(data.targets.sum(axis=1), 1.0)
    assert np.bincount(data.targets.argmax(axis=1)).tolist()[:3] == [178, 182, 177]


def test_demo_errors_name_the_argument(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--eps", "-1"])
    assert "--eps" in capsys.readouterr().err
