"""Shared plumbing of the `scale_*` benchmarks: machine description, timing, peak memory,
one configuration per subprocess, JSON output.

Nothing here is CPU-specific: timings block on the result (`block_until_ready`), and peak
memory is the device's ``peak_bytes_in_use`` where the backend reports it (GPU, TPU) and the
process's peak resident set (``getrusage``) on CPU. Because a process's peak only grows, each
configuration of a full run executes in a fresh subprocess (`run_isolated`).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:  # run as a script from a source tree
    sys.path.insert(0, ROOT)


def setup_jax(dtype: str):
    """Import jax with x64 as `dtype` needs; return (jax, the numpy dtype)."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jax, jnp.dtype(dtype)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What ran the benchmark: CPU, cores, load, jax version, backend and device kind."""
    import jax

    device = jax.devices()[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1_5_15_min": load,
        "memory_total_bytes": _meminfo("MemTotal"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory() -> dict:
    """Peak memory so far: device ``peak_bytes_in_use`` if reported, and the process's max RSS."""
    import jax

    out = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def peak_bytes(memory: dict) -> int:
    """The number a target is judged on: device peak where known, else process peak RSS."""
    return memory.get("device_peak_bytes", memory["process_peak_rss_bytes"])


def timeit(fn, *args, repeats: int = 3) -> dict:
    """Compile-and-run once (timed as `first_s`), then `repeats` timed runs: median and min."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        out = None  # free the last result first: a run must not pay for two live copies
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    times.sort()
    return {"first_s": first, "median_s": times[len(times) // 2], "min_s": times[0],
            "repeats": repeats, "out": out}


def run_isolated(script: str, config: dict, timeout: float) -> dict:
    """Run ``script --one JSON`` in a fresh process; its last stdout line is the result."""
    cmd = [sys.executable, script, "--one", json.dumps(config)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return dict(config, error=f"exit {proc.returncode}: {tail}")
    result = json.loads(lines[-1])
    result["subprocess_wall_s"] = wall
    return result


def write_json(out_dir: str, name: str, payload: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
        f.write("\n")
    return path


def command_line() -> str:
    return " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def size_parser(description: str, sizes: dict) -> argparse.ArgumentParser:
    """The options every scale benchmark takes: --quick, --only, --dtype, --out (and the
    hidden --one, one measurement in a fresh process, used by `run_isolated`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one process")
    parser.add_argument("--only", nargs="*", help=f"sizes to run, of {sorted(sizes)}")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser


def start(args, run_one, sizes: dict, quick: dict):
    """Run `--one` and return None, or set JAX up and return (machine info, the sizes to run)."""
    if args.one:
        print(json.dumps(run_one(json.loads(args.one)), default=float))
        return None
    setup_jax(args.dtype)
    selected = quick if args.quick else {k: v for k, v in sizes.items()
                                         if not args.only or k in args.only}
    return machine_info(), selected
