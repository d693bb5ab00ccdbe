"""Checkpoints: params, optimizer state, step count and cost history in one `.npz` file.

A checkpoint is written atomically: the arrays go to a temporary file in the same folder, which
is flushed to disk and then renamed over the old checkpoint with `os.replace`. A reader (or a run
killed at any moment, even by SIGKILL) therefore sees either the previous complete checkpoint or
the new complete one, never a half-written file.

The file holds plain arrays only (no pickles, so loading an untrusted file runs no code): every
leaf of the params and of the optimizer state, their key paths (`jax.tree_util.keystr`) and
dtypes, the step count, the cost history, a format version and optional extra scalars. The tree
structure itself comes from templates given to `load_checkpoint` (the initial params and
`optimizer.init(params)`), against which the stored key paths, shapes and dtypes are checked.
"""

import os
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

#: Version of the file layout; `load_checkpoint` refuses files from another version.
CHECKPOINT_FORMAT = 1

#: File name that `fit` uses inside its `checkpoint_dir`.
CHECKPOINT_FILE = "checkpoint.npz"

_KIND = "outmetric-checkpoint"
_TREES = ("params", "opt_state")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another format, or does not match the run."""


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns.

    - `params`, `opt_state`: pytrees shaped like the templates (lists of numpy arrays, one per
      leaf, when no template was given).
    - `step`: optimizer steps taken when the checkpoint was written.
    - `costs`: the cost before each of those steps, shape `(step,)`, float64.
    - `extra`: the extra scalars or arrays saved with it (`fit` stores its solve report here).
    """

    params: PyTree
    opt_state: PyTree
    step: int
    costs: np.ndarray
    extra: dict[str, np.ndarray]


def _resolve(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, CHECKPOINT_FILE)
    return path


def _to_numpy(leaf, where: str) -> tuple[np.ndarray, str]:
    """A host copy of one leaf, and its dtype name (non-numpy dtypes are stored as raw bits)."""
    try:
        array = np.asarray(jax.device_get(leaf))
    except Exception as err:  # e.g. a typed PRNG key, or an array spread over several processes
        raise TypeError(f"checkpoint: {where} cannot be saved as an array: {err}") from None
    if array.dtype == object:
        raise TypeError(f"checkpoint: {where} is a {type(leaf).__name__}, not an array")
    name = str(jnp.dtype(array.dtype)) if array.dtype.kind == "V" else array.dtype.str
    if array.dtype.kind == "V":  # bfloat16 and friends: .npz cannot describe them
        array = array.view(f"u{array.dtype.itemsize}")
    return array, name


def save_checkpoint(
    path: str | os.PathLike,
    params: PyTree,
    opt_state: PyTree,
    step: int,
    costs=(),
    *,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint to `path` atomically (temporary file in the same folder, then rename).

    **Arguments:**

    - `path`: the file to write (a folder means ``folder/checkpoint.npz``); its folder must exist.
    - `params`, `opt_state`: pytrees of arrays (or Python numbers).
    - `step`: the number of optimizer steps taken.
    - `costs`: the cost history so far, stored as float64 (exact for float32 and float64 costs).
    - `extra`: optional name → number/array mapping saved alongside.

    **Returns:** the path written. An interruption at any point leaves the previous checkpoint
    at `path` intact; the temporary file is removed unless the process is killed outright.
    """
    path = _resolve(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    arrays: dict[str, np.ndarray] = {
        "__kind__": np.asarray(_KIND),
        "__format__": np.asarray(CHECKPOINT_FORMAT, np.int64),
        "step": np.asarray(int(step), np.int64),
        "costs": np.asarray(costs, np.float64).reshape(-1),
    }
    for name, tree in zip(_TREES, (params, opt_state)):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        paths, dtypes = [], []
        for i, (key, leaf) in enumerate(leaves):
            where = f"{name}{jax.tree_util.keystr(key)}"
            arrays[f"{name}_{i:06d}"], dtype = _to_numpy(leaf, where)
            paths.append(jax.tree_util.keystr(key))
            dtypes.append(dtype)
        arrays[f"__paths__{name}"] = np.asarray(paths, dtype=str).reshape(-1)
        arrays[f"__dtypes__{name}"] = np.asarray(dtypes, dtype=str).reshape(-1)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"extra keys must be identifiers, got {key!r}")
        arrays[f"extra_{key}"] = np.asarray(value)

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _restore_leaf(value: np.ndarray, template, where: str):
    """`value` as a JAX array with the template's shape, dtype, weak type and placement."""
    if not hasattr(template, "dtype"):  # a Python number in the template
        template = jnp.asarray(template)
    if tuple(value.shape) != tuple(np.shape(template)):
        raise CheckpointError(f"checkpoint {where} has shape {value.shape}, the run expects "
                              f"{np.shape(template)}")
    if np.dtype(value.dtype) != np.dtype(template.dtype):
        raise CheckpointError(f"checkpoint {where} has dtype {value.dtype}, the run expects "
                              f"{template.dtype}")
    out = None
    if getattr(template, "weak_type", False) and value.ndim == 0:
        # A weakly typed scalar (a Python number turned array) promotes differently from a
        # strongly typed one; keep it weak so the resumed computation is the same one.
        out = jnp.asarray(value.item())
        if out.dtype != template.dtype or not getattr(out, "weak_type", False):
            out = None
    if out is None:
        out = jnp.asarray(value, dtype=template.dtype)
    sharding = getattr(template, "sharding", None)
    if sharding is not None and isinstance(template, jax.Array):
        out = jax.device_put(out, sharding)
    return out


def load_checkpoint(
    path: str | os.PathLike,
    params: PyTree | None = None,
    opt_state: PyTree | None = None,
) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (or by `fit`).

    **Arguments:**

    - `path`: the file (a folder means ``folder/checkpoint.npz``).
    - `params`, `opt_state`: templates, e.g. the initial params and `optimizer.init(params)`.
      Their key paths, shapes and dtypes must match the stored ones (`CheckpointError`
      otherwise, naming the first difference); the result has their tree structure, dtypes,
      weak types and shardings. Without a template that tree comes back as a list of numpy
      arrays, one per leaf.

    **Returns:** a `Checkpoint`. A missing file is a `FileNotFoundError`; a corrupt file, one of
    another format or one that does not match the templates is a `CheckpointError`.
    """
    path = _resolve(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except Exception as err:
        raise CheckpointError(f"checkpoint {path!r} is not a readable .npz file: {err}") from None
    if str(stored.get("__kind__", "")) != _KIND:
        raise CheckpointError(f"{path!r} is not an outmetric checkpoint")
    version = int(stored["__format__"])
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format version {version}; this version "
                              f"of outmetric reads version {CHECKPOINT_FORMAT}")
    trees = []
    for name, template in zip(_TREES, (params, opt_state)):
        paths = [str(p) for p in stored[f"__paths__{name}"]]
        dtypes = [str(d) for d in stored[f"__dtypes__{name}"]]
        values = []
        for i, dtype in enumerate(dtypes):
            value = stored[f"{name}_{i:06d}"]
            if value.dtype.str != dtype:  # stored as raw bits
                value = value.view(jnp.dtype(dtype))
            values.append(value)
        if template is None:
            trees.append(values)
            continue
        leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        expected = [jax.tree_util.keystr(key) for key, _ in leaves]
        if expected != paths:
            missing = sorted(set(expected) - set(paths))[:3]
            unexpected = sorted(set(paths) - set(expected))[:3]
            raise CheckpointError(
                f"checkpoint {path!r} holds a different {name} tree than this run "
                f"({len(paths)} leaves stored, {len(expected)} expected; run has {missing or '-'} "
                f"not stored, stored {unexpected or '-'} not in run): was it written with "
                f"another model or optimizer?"
            )
        restored = [
            _restore_leaf(value, leaf, f"{name}{key}")
            for value, (key, leaf) in zip(values, [(jax.tree_util.keystr(k), v) for k, v in leaves])
        ]
        trees.append(jax.tree_util.tree_unflatten(treedef, restored))
    extra = {key[len("extra_"):]: value for key, value in stored.items()
             if key.startswith("extra_")}
    costs = np.asarray(stored["costs"], np.float64)
    return Checkpoint(trees[0], trees[1], int(stored["step"]), costs, extra)
