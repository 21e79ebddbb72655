"""Shared plumbing of the benchmarks: environment, machine description, result files, logging, statistics.

Every benchmark module exposes ``run(quick: bool = False) -> dict``; it prints its figures and writes them,
with the machine description and the git commit, to ``bench/results/<name>.json`` (``<name>-quick.json``
for the tiny smoke-test sizes, so a smoke run never overwrites real figures). ``TIDPO_BENCH_RESULTS``
redirects the output folder (the smoke test points it at a temporary directory).

The rest of the plumbing lives beside it: bench.preparation (pairs -> reference model -> anchors -> token
weights through tidpo_core's steps), bench.training_runs (timed training through tidpo_core.training),
bench.rounds (interleaved rounds and paired ratios), bench.resources (CPU time, peak RSS).
"""

from __future__ import annotations

import os

from tidpo_core.runtime.offline import apply_offline_defaults

# Before torch/transformers/datasets are imported anywhere: tidpo's offline defaults, then quiet output and
# deterministic thread use for the measurements.
apply_offline_defaults()
for _key, _value in {
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}.items():
    os.environ.setdefault(_key, _value)

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from bench.resources import cpu_seconds  # noqa: E402

THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def setup_threads(threads: int = THREADS) -> None:
    """Every measurement runs on the same number of intra-op threads (2: the machine's core count)."""
    torch.set_num_threads(threads)


setup_threads()


# --- machine and provenance ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "accelerate": _version("accelerate"),
        "deepspeed": _version("deepspeed"),
        "peft": _version("peft"),
        "duckdb": _version("duckdb"),
        "dagster": _version("dagster"),
    }


def git_commit() -> str:
    """The checked-out commit (read-only `git rev-parse HEAD`); 'unknown' outside a git checkout.

    TIDPO_GIT_COMMIT wins: a copy of the tree on another machine can carry a stale .git."""
    if os.environ.get("TIDPO_GIT_COMMIT"):
        return os.environ["TIDPO_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return "unknown"


def results_dir() -> Path:
    path = Path(os.environ.get("TIDPO_BENCH_RESULTS") or DEFAULT_RESULTS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def result_path(name: str, quick: bool) -> Path:
    return results_dir() / f"{name}{'-quick' if quick else ''}.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_results(
    name: str, figures: dict[str, Any], quick: bool, started: float | None = None, path: Path | None = None
) -> dict[str, Any]:
    """Attach provenance to `figures`, write them atomically to `path` (default `<name>.json` in
    :func:`results_dir`) and return the full document."""
    document = {
        "benchmark": name,
        "quick": quick,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": None if started is None else round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds(), 1),
        "commit": git_commit(),
        "machine": machine_info(),
        **figures,
    }
    document = _json_safe(document)
    path = Path(path) if path is not None else result_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    print(f"[{name}] wrote {path}", flush=True)
    return document


def log(name: str, message: str) -> None:
    print(f"[{name}] {message}", flush=True)


# --- small statistics and stage timings -----------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values) if values else float("nan"),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "n": len(values),
    }


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent b of y ~ a * x^b."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else float("nan")


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    """Store the block's wall seconds (to the millisecond) under `key`: one stage of a results document."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(time.perf_counter() - start, 3)


def optional(module: str, name: str) -> Callable[..., Any] | None:
    """A function another engineer is adding (imported lazily); None while it is not there yet."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def main_for(run: Callable[..., dict]) -> None:
    """`python -m bench.bench_x [--quick]`."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the smoke test runs)")
    args = parser.parse_args()
    run(quick=args.quick)
