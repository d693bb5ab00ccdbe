"""Loading regression data: the bundled dataset, CSV and NPZ files."""

import importlib.resources
import os
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """Standardised regression data: `inputs` `(N, d)`, `targets` `(N, Q)`, and its `name`."""

    inputs: np.ndarray
    targets: np.ndarray
    name: str


def bundled_dataset_path() -> str:
    """Path of the bundled dataset (diabetes progression, 442 × 10; see `outmetric/data`)."""
    return str(importlib.resources.files("outmetric") / "data" / "diabetes.csv")


def load_digits() -> Dataset:
    """The handwritten digits of scikit-learn, bundled (1,797 8×8 images, 10 classes).

    `inputs` `(1797, 64)`: pixel counts 0..16 divided by 16; `targets` `(1797, 10)`: one-hot
    labels (the label of sample j is ``targets[j].argmax()``). The data is E. Alpaydin and
    C. Kaynak's UCI optical-recognition test set as distributed with scikit-learn
    (BSD-3-Clause; ``outmetric/data/README.md``), in its order.
    """
    path = importlib.resources.files("outmetric") / "data" / "digits.csv.gz"
    with importlib.resources.as_file(path) as file:
        table = np.loadtxt(file, delimiter=",", ndmin=2)
    labels = table[:, -1].astype(int)
    return Dataset(table[:, :-1] / 16.0, np.eye(10)[labels], "digits")


def _standardise(a: np.ndarray) -> np.ndarray:
    std = a.std(axis=0)
    return (a - a.mean(axis=0)) / np.where(std > 0, std, 1.0)


def load_dataset(path: str | None = None, *, num_targets: int = 1,
                 standardise: bool = True) -> Dataset:
    """Load a regression dataset; default: the bundled diabetes data.

    **Arguments:**

    - `path`: a `.csv` file (comma-separated, optional header row; the last `num_targets`
      columns are the targets) or a `.npz` file with arrays `inputs` and `targets` (or `X` and
      `y`). None loads the bundled dataset.
    - `num_targets`: how many trailing CSV columns are targets.
    - `standardise`: rescale every input and target column to mean 0 and variance 1.

    Raises `FileNotFoundError` for a missing file and `ValueError` (naming `path`) for an
    unreadable, empty or non-finite one.
    """
    path = bundled_dataset_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path) as archive:
            keys = set(archive.files)
            pair = ("inputs", "targets") if {"inputs", "targets"} <= keys else ("X", "y")
            if not set(pair) <= keys:
                raise ValueError(f"{path!r} must hold arrays 'inputs' and 'targets' (or 'X', 'y'); "
                                 f"found {sorted(keys)}")
            inputs = np.asarray(archive[pair[0]], float)
            targets = np.asarray(archive[pair[1]], float)
    elif ext in (".csv", ".txt"):
        if not isinstance(num_targets, int) or num_targets < 1:
            raise ValueError(f"num_targets must be a positive integer, got {num_targets!r}")
        with open(path) as f:
            first = f.readline()
        try:
            [float(v) for v in first.split(",")]
            skip = 0
        except ValueError:
            skip = 1
        try:
            table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        except ValueError as err:
            raise ValueError(f"could not read {path!r} as numeric CSV: {err}") from None
        if table.shape[1] <= num_targets:
            raise ValueError(f"{path!r} has {table.shape[1]} columns; need inputs and "
                             f"{num_targets} target column(s)")
        inputs, targets = table[:, :-num_targets], table[:, -num_targets:]
    else:
        raise ValueError(f"path must end in .csv or .npz, got {path!r}")
    if inputs.ndim == 1:
        inputs = inputs[:, None]
    if targets.ndim == 1:
        targets = targets[:, None]
    if len(inputs) == 0:
        raise ValueError(f"{path!r} holds no samples")
    if len(inputs) != len(targets):
        raise ValueError(f"{path!r}: inputs and targets have different numbers of samples "
                         f"({len(inputs)} and {len(targets)})")
    if not (np.all(np.isfinite(inputs)) and np.all(np.isfinite(targets))):
        raise ValueError(f"{path!r} contains NaN or inf values")
    if standardise:
        inputs, targets = _standardise(inputs), _standardise(targets)
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(inputs, targets, name)
