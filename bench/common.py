"""Shared plumbing of the benchmarks: environment, machine description, result files, data preparation.

Every benchmark module exposes ``run(quick: bool = False) -> dict``; it prints its figures and writes them,
with the machine description and the git commit, to ``bench/results/<name>.json`` (``<name>-quick.json``
for the tiny smoke-test sizes, so a smoke run never overwrites real figures). ``TIDPO_BENCH_RESULTS``
redirects the output folder (the smoke test points it at a temporary directory).
"""

from __future__ import annotations

import os

# Before torch/transformers/datasets are imported anywhere: offline, quiet, deterministic thread use.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
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
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field, fields  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from tidpo_core.runtime.layout import DataDir  # noqa: E402

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


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children so far.

    On a shared machine, wall time overstates what a benchmark costs; CPU time over the thread count
    estimates its wall time on an otherwise idle machine.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_results(name: str, figures: dict[str, Any], quick: bool, started: float | None = None) -> dict[str, Any]:
    """Attach provenance to `figures`, write `<name>.json` atomically and return the full document."""
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
    path = result_path(name, quick)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    print(f"[{name}] wrote {path}", flush=True)
    return document


def log(name: str, message: str) -> None:
    print(f"[{name}] {message}", flush=True)


# --- small statistics ------------------------------------------------------------------------------------


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


def _status_kib(pid: int | str, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB.

    For this process, Linux's VmHWM (per address space, so it starts afresh at exec). ru_maxrss is the
    fallback; on Linux it also counts the parent's pages a subprocess inherited before its exec, which
    is why child processes are measured with :class:`ChildRssSampler` instead.
    """
    if who == resource.RUSAGE_SELF:
        hwm = _status_kib("self", "VmHWM")
        if hwm is not None:
            return hwm / 1024
    scale = 1024**2 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss / scale


class ChildRssSampler:
    """Samples the peak RSS (VmHWM) of this process's descendants from /proc every `interval` seconds.

    A descendant's own high-water mark is read on every sample, so a peak is missed only if the process
    both reaches it and exits between two samples.
    """

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval = interval
        self.peaks: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        wanted, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in wanted}
            wanted |= frontier
        return sorted(wanted)

    def _sample(self) -> None:
        for pid in self._descendants():
            hwm = _status_kib(pid, "VmHWM")
            if hwm is None:
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm / 1024)
            if pid not in self.names:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        self.names[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace")[:200]
                except OSError:
                    pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ChildRssSampler:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(self.peaks.values(), default=0.0)


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(time.perf_counter() - start, 3)


# --- data preparation through tidpo_core (what the pipeline's assets do, with an explicit split) ---------


@dataclass
class Prepared:
    """A DuckDB file with pairs, anchors and token weights, and the reference model folder beside it."""

    data_dir: Path
    duckdb_path: Path
    reference_path: Path
    weights_fingerprint: str
    anchors_fingerprint: str | None
    max_prompt_tokens: int
    max_response_tokens: int
    n_train: int
    n_eval: int
    parameters: int
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    extra_weights: dict[str, str] = field(default_factory=dict)
    """Other weight tables of the same responses (add_weights): name -> fingerprint."""

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("data_dir", "duckdb_path", "reference_path"):
            out.pop(key)
        return out


# The reference top-k the benchmarks store for `reference_kl: cached` (of a 2,048-token vocabulary).
REFERENCE_KL_TOP_K = 64


def prepare(data_dir: Path, pairs: Sequence[Any], **kwargs: Any) -> Prepared:
    """Pairs -> reference model -> anchors -> token weights (see :func:`prepare_uncached`).

    With TIDPO_BENCH_CACHE set (development only), a preparation with the same pairs and arguments is
    copied from that folder instead of being recomputed; its timings are then those of the run that made
    it, marked as cached.
    """
    import shutil

    cache_root = os.environ.get("TIDPO_BENCH_CACHE")
    if not cache_root:
        return prepare_uncached(data_dir, pairs, **kwargs)
    from tidpo_core.runtime.fingerprint import digest

    key = digest(
        {
            "pairs": [(p.pair_id, p.prompt, p.chosen, p.rejected) for p in pairs],
            "kwargs": {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs.items()},
        }
    )
    cached = Path(cache_root) / key
    stamp = cached / "prepared.json"
    data_dir = Path(data_dir)
    if stamp.exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(cached, data_dir)
        values = json.loads(stamp.read_text())
        values["timings"] = {**values.get("timings", {}), "cached": True}
        return Prepared(data_dir=data_dir, duckdb_path=DataDir.at(data_dir).database, reference_path=DataDir.at(data_dir).reference_model, **values)
    prepared = prepare_uncached(data_dir, pairs, **kwargs)
    shutil.rmtree(cached, ignore_errors=True)
    shutil.copytree(data_dir, cached)
    (cached / "prepared.json").write_text(json.dumps(prepared.summary()))
    return prepared


def prepare_uncached(
    data_dir: Path,
    pairs: Sequence[Any],
    *,
    eval_ids: set[str] | None = None,
    eval_fraction: float = 0.1,
    model_config: Any = None,
    vocab_size: int = 2048,
    sft_steps: int = 200,
    sft_batch_size: int = 16,
    sft_learning_rate: float = 3e-3,
    seed: int = 0,
    anchors: bool = True,
    anchor_new_tokens: int = 64,
    sampling_batch_size: int = 32,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 128,
    weight_batch_size: int = 16,
    weight_lambda: float = 0.7,
    reference_kl_top_k: int = 0,
    model_name_or_path: str = "",
) -> Prepared:
    """Pairs -> reference model (tokenizer + tiny Llama + short SFT, or the checkpoint `model_name_or_path`)
    -> anchors -> token weights.

    The pipeline's own steps (tidpo_core.steps), given the pairs directly so that a benchmark can fix the
    train/eval split exactly: `eval_ids` (if given) decides it; otherwise the stored hash split with
    `eval_fraction` does.
    """
    import dataclasses

    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.data.pairs import LoadResult
    from tidpo_core.models.generation import SamplingSettings
    from tidpo_core.models.modeling import TinyModelConfig
    from tidpo_core.runtime.layout import DataDir
    from tidpo_core.steps import database_at
    from tidpo_core.steps.anchors import sample_anchors
    from tidpo_core.steps.pairs import store_pairs
    from tidpo_core.steps.reference import ReferenceRecipe, build_reference
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    layout = DataDir.at(data_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    open_db = database_at(layout.database)
    timings: dict[str, float] = {}
    with timed(timings, "pairs"):
        ingested = store_pairs(open_db, LoadResult(list(pairs), [], len(pairs)), eval_fraction, eval_ids)
        stored = ingested.stored
    with timed(timings, "reference_model"):
        reference = build_reference(
            open_db,
            ReferenceRecipe(
                model_name_or_path=model_name_or_path, sft_steps=sft_steps, sft_batch_size=sft_batch_size, sft_learning_rate=sft_learning_rate, seed=seed
            ),
            dataclasses.replace(model_config or TinyModelConfig(), vocab_size=vocab_size),
            layout,
            ingested.digest,
            encoding=EncodingSettings(max_prompt_tokens, max_response_tokens),
            progress=False,
        )
    anchors_fingerprint = None
    if anchors:
        with timed(timings, "anchor_responses"):
            sampling = SamplingSettings(
                max_new_tokens=anchor_new_tokens, seed=seed, batch_size=sampling_batch_size, max_prompt_tokens=max_prompt_tokens
            )
            anchors_fingerprint = sample_anchors(open_db, reference.handle, sampling, progress=False).fingerprint
    with timed(timings, "token_weights"):
        weighing = WeighingSettings(
            weight_lambda=weight_lambda,
            batch_size=weight_batch_size,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
            reference_kl_top_k=reference_kl_top_k,
        )
        weights = weigh_tokens(open_db, reference.handle, anchors_fingerprint, weighing, progress=False)
    return Prepared(
        data_dir=layout.root,
        duckdb_path=layout.database,
        reference_path=Path(reference.handle.path),
        weights_fingerprint=weights.fingerprint,
        anchors_fingerprint=anchors_fingerprint,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        n_train=stored.train,
        n_eval=stored.eval,
        parameters=int(reference.parameters or 0),
        timings=timings,
        tokens={"weighted_responses": weights.summary.responses, "weighted_response_tokens": weights.summary.token_rows},
    )


def add_weights(prepared: Prepared, **settings: Any) -> str:
    """Another weights table for `prepared`'s pairs and anchors (another estimator: WeighingSettings fields);
    returns its fingerprint."""
    from tidpo_core.runtime.fingerprint import model_fingerprint
    from tidpo_core.steps import database_at
    from tidpo_core.steps.reference import ReferenceHandle
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    reference = ReferenceHandle(str(prepared.reference_path), model_fingerprint(prepared.reference_path))
    weighing = WeighingSettings(max_prompt_tokens=prepared.max_prompt_tokens, max_response_tokens=prepared.max_response_tokens, **settings)
    return weigh_tokens(database_at(prepared.duckdb_path), reference, prepared.anchors_fingerprint, weighing, progress=False).fingerprint


# --- training through tidpo_core.training ----------------------------------------------------------------------


def train_config(prepared: Prepared, loss_type: str, output_dir: Path, **overrides: Any):
    """A TrainConfig for `prepared`; fields the installed TrainConfig lacks raise a clear error."""
    from tidpo_core.training import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"TrainConfig has no field(s) {sorted(unknown)}")
    values: dict[str, Any] = {
        "duckdb_path": str(prepared.duckdb_path),
        "reference_model_path": str(prepared.reference_path),
        "output_dir": str(output_dir),
        "weights_fingerprint": prepared.weights_fingerprint,
        "anchors_fingerprint": prepared.anchors_fingerprint,
        "loss_type": loss_type,
        "max_prompt_tokens": prepared.max_prompt_tokens,
        "max_response_tokens": prepared.max_response_tokens,
        "checkpoint_every": 0,
        "resume": False,
        "progress": False,
        "mixed_precision": "no",
    }
    values.update(overrides)
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


@dataclass
class TimedRun:
    summary: Any
    step_times: list[float]
    wall: float
    step_cpu_times: list[float] = field(default_factory=list)

    def per_step(self, skip: int = 1) -> dict[str, float]:
        """Median/mean seconds per optimizer step, the first `skip` (warm-up) intervals left out."""
        steps = self.step_times[skip:] if len(self.step_times) > skip + 2 else self.step_times
        cpu = self.step_cpu_times[skip:] if len(self.step_cpu_times) > skip + 2 else self.step_cpu_times
        return {
            "median_s": statistics.median(steps) if steps else float("nan"),
            "mean_s": statistics.fmean(steps) if steps else float("nan"),
            "median_cpu_s": statistics.median(cpu) if cpu else float("nan"),
            "steps": len(self.step_times) + 1,
        }

    @property
    def epoch_cpu_s(self) -> float:
        """Process CPU time (all threads) of the training loop: the step intervals, the first step
        (which has no start stamp) counted at the mean of the others."""
        return epoch_from_intervals(self.step_cpu_times)


def epoch_from_intervals(intervals: Sequence[float]) -> float:
    if not intervals:
        return float("nan")
    return sum(intervals) * (len(intervals) + 1) / len(intervals)


def run_training(config: Any) -> TimedRun:
    """tidpo_core.training.train with a wall and a CPU timestamp per optimizer step."""
    from tidpo_core.training import train

    stamps: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()

    def on_step(step: int, metrics: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    summary = train(config, on_step=on_step)
    wall = time.perf_counter() - start
    # Intervals between consecutive optimizer steps (the first step, which includes warm-up, has no start stamp).
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    cpu_steps = [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    return TimedRun(summary=summary, step_times=steps, wall=wall, step_cpu_times=cpu_steps)


# --- evaluation --------------------------------------------------------------------------------------------


def eval_pairs(prepared: Prepared) -> list[Any]:
    from tidpo_core import store

    con = store.connect(prepared.duckdb_path, read_only=True)
    try:
        return store.read_pairs(con, split="eval")
    finally:
        con.close()


def train_pairs(prepared: Prepared) -> list[Any]:
    from tidpo_core import store

    con = store.connect(prepared.duckdb_path, read_only=True)
    try:
        return store.read_pairs(con, split="train")
    finally:
        con.close()


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
