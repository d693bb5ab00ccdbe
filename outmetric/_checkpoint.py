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

A file at the checkpoint's path that outmetric did not write is never overwritten
(`CheckpointError`). Temporary files are named after the host and process that write them;
those of processes that died (killed mid-write) are removed by the next save or load.
`CheckpointLock` is what `fit` holds on its folder while it runs, so that two runs never write
one checkpoint in turn.
"""

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
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
    """A checkpoint file is missing, unreadable, of another format, or does not match the run;
    or the checkpoint folder cannot be written. `.result`, when not None, holds what the run
    computed (a `FitResult` whose final checkpoint could not be written)."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


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


def _host_tag() -> str:
    """This host's name as it appears in temporary file names (no dots or separators)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux); None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux), to tell a live process from a later one that
    reuses a dead one's pid; None where it cannot be read."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` on this host is running (and, given `start`, is the same one)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    if start is not None and fields and len(fields) > 19 and fields[19] != start:
        return False
    return True


#: ``.{file}.{host}.{pid}.{random}.tmp``: who writes a temporary file.
_TEMP = re.compile(r"^\.(?P<file>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
#: Temporary files of earlier versions (``.{file}.{random}.tmp``), removed once this old.
_STALE_SECONDS = 3600


def clean_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files that writers of checkpoint `path` left when they were killed.

    A temporary file names its writer's host and pid: it is removed when that process no longer
    runs on this host. A file from another host is left alone (its writer cannot be checked), as
    is one of a live process. Unnamed ones (earlier versions) go once an hour old. Returns the
    paths removed.
    """
    path = _resolve(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host = _host_tag()
    for name in names:
        if not (name.startswith(f".{base}.") and name.endswith(".tmp")):
            continue
        full = os.path.join(folder, name)
        match = _TEMP.match(name)
        if match and match["file"] == base:
            if match["host"] != host or _process_alive(int(match["pid"])):
                continue
        else:
            try:
                if time.time() - os.path.getmtime(full) < _STALE_SECONDS:
                    continue
            except OSError:
                continue
        try:
            os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    return removed


def _is_outmetric_checkpoint(path: str) -> bool:
    """Whether `path` is an .npz that outmetric wrote (reads only its `__kind__` entry)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "__kind__" in archive.files and str(archive["__kind__"]) == _KIND
    except Exception:
        return False


def check_overwritable(path: str | os.PathLike) -> None:
    """A `CheckpointError` if a file is at `path` that outmetric did not write."""
    path = _resolve(path)
    if os.path.lexists(path) and not (os.path.isfile(path) and _is_outmetric_checkpoint(path)):
        raise CheckpointError(
            f"{path!r} exists and is not an outmetric checkpoint: refusing to overwrite it. "
            "Move it away, or write the checkpoint somewhere else")


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
    at `path` intact; the temporary file is removed unless the process is killed outright, and
    then by the next save or load. A file at `path` that is not an outmetric checkpoint is
    refused (`CheckpointError`), never overwritten.
    """
    path = _resolve(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    check_overwritable(path)
    clean_temporaries(path)
    arrays = _checkpoint_arrays(params, opt_state, step, costs, extra)
    _write_atomically(path, folder, arrays)
    return path


def check_writable(path: str | os.PathLike, params: PyTree, opt_state: PyTree, num_costs: int,
                   *, extra: Mapping[str, Any] | None = None) -> None:
    """Before a run: write (and remove) a file as large as the checkpoint of `num_costs` steps
    next to `path`, so a folder that cannot take it (read-only, full, a file-size limit) is a
    `CheckpointError` now rather than after all the training."""
    path = _resolve(path)
    folder = os.path.dirname(os.path.abspath(path))
    arrays = _checkpoint_arrays(params, opt_state, 0, np.zeros(num_costs), extra)
    arrays["probe"] = np.zeros(num_costs)  # room for the per-step history saved beside costs
    try:
        os.unlink(_write_temporary(path, folder, arrays))
    except OSError as err:
        raise CheckpointError(
            f"checkpoint folder {folder!r} cannot hold the checkpoint ({err.strerror or err}): "
            "checked before training, nothing was run. Free space, lift the limit, or pass "
            "another checkpoint_dir") from err


def _checkpoint_arrays(params, opt_state, step, costs, extra) -> dict[str, np.ndarray]:
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
    return arrays


def _write_temporary(path: str, folder: str, arrays: dict[str, np.ndarray]) -> str:
    """`arrays` as an ``.npz`` in a fresh temporary file beside `path`, flushed to disk; returns
    its name. Nothing is left behind if the write fails."""
    prefix = f".{os.path.basename(path)}.{_host_tag()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _write_atomically(path: str, folder: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = _write_temporary(path, folder, arrays)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_folder(folder)


def _remove_quietly(path: str) -> None:
    """Remove a temporary file if it is still there (an error on the way out must not hide the
    error being raised)."""
    try:
        os.unlink(path)
    except OSError:
        pass


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
    clean_temporaries(path)
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


# ------------------------------------------------------------------------------- the run's lock


class CheckpointLock:
    """An exclusive lock on a checkpoint, held by `fit` for the whole run.

    The lock is the file ``<checkpoint>.lock``, created with ``O_CREAT | O_EXCL`` (atomic, also on
    NFS v3+) and holding its owner's host, pid and process start time. A second run on the same
    checkpoint, in this process or another, is refused with a `CheckpointError` naming the owner,
    before it reads or writes anything. A lock whose owner died (SIGKILL, power loss) is stale:
    on the same host, its pid no longer runs (or runs a later process), and the next run takes it
    over. A lock from another host cannot be checked and is never taken over; delete the file
    if that run is gone. Taking the lock also removes temporary files that killed writers left.

    Use it as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _resolve(path) + ".lock"
        self.checkpoint = _resolve(path)
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> "CheckpointLock":
        if self.held:
            raise CheckpointError(f"{self.path!r} is already held by this lock object")
        token = uuid.uuid4().hex
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "start": _process_start(os.getpid()), "token": token,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_lock(self.path)
                if owner is _GONE:  # released meanwhile
                    continue
                if _lock_is_live(self.path, owner):
                    raise CheckpointError(_in_use_message(self.checkpoint, self.path, owner))
                _break_stale(self.path, owner)
                continue
            try:
                os.write(fd, record.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._token = token
            clean_temporaries(self.checkpoint)
            return self
        raise CheckpointError(f"could not take the lock {self.path!r}: other runs keep taking "
                              "it; is another fit starting on the same checkpoint_dir?")

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (never another run's)."""
        token, self._token = self._token, None
        if token is None:
            return
        owner = _read_lock(self.path)
        if isinstance(owner, dict) and owner.get("token") == token:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "CheckpointLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_GONE = object()
#: A lock file that is still empty this long after it was made is one whose owner died while
#: creating it (it writes its record right after the atomic create).
_EMPTY_LOCK_SECONDS = 10.0


def _read_lock(path: str):
    """The lock's owner record (a dict), None if unreadable, or `_GONE` if the file is gone."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return _GONE
    except OSError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def _lock_is_live(path: str, owner) -> bool:
    if owner is None:  # empty or garbled: being written just now, or its writer died
        try:
            return time.time() - os.path.getmtime(path) < _EMPTY_LOCK_SECONDS
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return True  # cannot check a process on another host
    try:
        pid = int(owner.get("pid"))
    except (TypeError, ValueError):
        return False
    return _process_alive(pid, owner.get("start"))


def _break_stale(path: str, owner) -> None:
    """Remove a stale lock, unless another run replaced it meanwhile (then put that one back)."""
    aside = f"{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != owner:
        try:  # we took a fresh lock of another run: restore it, unless a third one came
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.unlink(aside)
    except OSError:
        pass


def _in_use_message(checkpoint: str, path: str, owner) -> str:
    who = "another run"
    if isinstance(owner, dict):
        mine = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
        who = ("another fit in this process" if mine else
               f"process {owner.get('pid')} on host {owner.get('host')!r}")
        who += f" (since {owner.get('since')})"
    return (f"checkpoint {checkpoint!r} is in use by {who}, which holds the lock {path!r}: two "
            "runs on one checkpoint_dir would overwrite each other's checkpoints. Wait for that "
            "run to end, or use another checkpoint_dir; if that run is gone (on another host), "
            "delete the lock file")


# ----------------------------------------------------------------- what a checkpoint belongs to


def model_fingerprint(problem, params) -> str:
    """SHA-256 of the model's computation: the jaxpr of the problem's model at the params'
    shapes (`problem.model_jaxpr`: `apply_fn` on one sample, each residual function on one
    point, or the stacked residual function), with its constants.

    Two models of the same parameter shapes that compute different functions differ here; the
    parameter and data values do not enter. Traced from shapes only, so nothing is evaluated.
    An empty string where the model cannot be traced abstractly.
    """

    def spec(a, shape):
        dtype = getattr(a, "dtype", None)
        return jax.ShapeDtypeStruct(shape, np.asarray(a).dtype if dtype is None else dtype)

    params_spec = jax.tree_util.tree_map(lambda a: spec(a, np.shape(a)), params)
    try:
        closed = problem.model_jaxpr(params_spec)
    except Exception:
        return ""
    digest = hashlib.sha256(re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr)).encode())
    for const in closed.consts:
        if getattr(const, "is_fully_addressable", True):
            array = np.asarray(const)
            digest.update(f"{array.shape}|{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


#: What `fit` records about a run, and what a different value means.
_RUN_KEYS = {
    "data_fingerprint": "other data (inputs, targets or loss differ from problem's)",
    "model_fingerprint": "another model (apply_fn computes something else: its jaxpr on one "
                         "sample differs)",
    "mode": None,
}


def check_fingerprint(path: str, extra: Mapping[str, Any], expected: Mapping[str, str]) -> None:
    """Refuse (`CheckpointError`) to resume checkpoint `path` whose recorded data, model or mode
    (`extra`, as `fit` saves it) differ from this run's (`expected`); keys a checkpoint lacks
    (written by an earlier version) are not checked."""
    for key, what in _RUN_KEYS.items():
        stored = extra.get(key)
        if stored is None or key not in expected or not expected[key] or not str(stored):
            continue
        if str(stored) == expected[key]:
            continue
        if key == "mode":
            what = (f"a {stored} run; this run is {expected[key]} (batches "
                    f"{'given' if expected[key] == 'mini-batch' else 'not given'})")
        raise CheckpointError(
            f"checkpoint {path!r} was written for {what}: resuming would mix two runs. Pass "
            "resume=False to start afresh, or another checkpoint_dir")
