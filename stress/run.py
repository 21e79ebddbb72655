"""`make stress`: what real data and real machines do to a scheduled retraining pipeline.

* bad input: thousands of generated rows in hundreds of files (malformed JSON, wrong types, missing and
  extra keys, empty texts, chosen == rejected, invalid UTF-8, NUL bytes, 1 MB texts, duplicates, mixed
  formats), files that are not data at all, and the hypothesis property tests with many examples;
* crashes: the Dagster run's step process is killed with SIGKILL inside a DuckDB transaction and between
  chunks of anchor generation and of weight computation, during training and during model
  registration; the re-run must end exactly where an uninterrupted run ends, with no partial or
  duplicated rows, and the same again through `dagster job execute` (multiprocess executor);
* concurrency: several materializations of the job at once against one data dir;
* registry safety: a gate failure never moves `champion`; a NaN run registers nothing; a weaker
  challenger that beats its reference but not the champion never takes the alias, a stronger one does;
* dependencies down and safe defaults;
* the slow tests: `pytest -m slow` (the benchmark harnesses, DDP stopped by a signal), kept out of `make
  test` so that it fits CI's budget.

Every run here is a real subprocess (`python -m stress.run worker ...` runs one `dagster.materialize` of
the asset graph) on a temporary data dir. The table printed at the end is also written to
stress/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidpo_core.runtime.layout import DATABASE_FILE

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "stress" / "results.json"
MARK = "TIDPO-MARK"
RESULT = "TIDPO-RESULT"
BUSY = "is in use by another tidpo run"

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

TINY_MODEL = {
    "vocab_size": 400,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "sft_steps": 30,
    "sft_batch_size": 8,
}
# The policy of a resumed training run is compared with the uninterrupted one's to this tolerance; the
# measured difference is reported (float32 round-off on CPU, not a lost or repeated step: one optimizer
# step at these learning rates moves weights by about 1e-3).
POLICY_TOLERANCE = 1e-4
ANCHOR_BATCH = 8
WEIGHT_CHUNK = 96  # responses per token_weights shard (6 batches of 16)


def stress_config(pairs: int = 160, steps: int = 24, **policy: Any) -> dict[str, Any]:
    """A small whole-graph config whose anchor and weight steps take several chunks each."""
    return {
        "ops": {
            "preference_pairs": {"config": {"synthetic_pairs": pairs, "eval_fraction": 0.2}},
            "reference_model": {"config": TINY_MODEL},
            "anchor_responses": {"config": {"max_new_tokens": 12, "batch_size": ANCHOR_BATCH}},
            "token_weights": {"config": {"max_response_tokens": 64, "batch_size": 16, "batches_per_shard": WEIGHT_CHUNK // 16}},
            "tidpo_policy": {
                "config": {
                    "max_steps": steps,
                    "per_device_batch_size": 4,
                    "learning_rate": 2e-3,
                    "warmup_steps": 1,
                    "checkpoint_every": 4,
                    **policy,
                }
            },
            "evaluation": {"config": {"heatmap_pairs": 0, "sample_prompts": 8, "max_new_tokens": 16}},
        }
    }


# =====================================================================================================
# The worker: one dagster.materialize in this process, with optional instrumentation
# =====================================================================================================


def _mark(text: str) -> None:
    print(f"{MARK} {text}", flush=True)


def _install_marks(pause_after_chunk: float, pause_in: set[str], pause_in_s: float, pause_after_register: float = 0.0) -> None:
    """Print a line when a chunk commits (and when a chosen writer is inside its transaction), so the
    parent can kill at a known point; optionally hold there for a while."""
    from tidpo_core import store
    from tidpo_core.runtime import tracking

    current: dict[str, str | None] = {"what": None}
    original_transaction = store.transaction

    @contextlib.contextmanager
    def transaction(con):  # type: ignore[no-untyped-def]
        with original_transaction(con):
            yield con
            what = current["what"]
            if what in pause_in:
                _mark(f"in-transaction {what}")
                time.sleep(pause_in_s)

    # Every store writer calls connection.transaction at call time: one patch reaches them all.
    import tidpo_core.store.connection

    tidpo_core.store.connection.transaction = transaction  # type: ignore[assignment]

    def wrap(name: str, what: str) -> None:
        original = getattr(store, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            current["what"] = what
            try:
                count = original(*args, **kwargs)
            finally:
                current["what"] = None
            _mark(f"committed {what} {count}")
            if pause_after_chunk:
                time.sleep(pause_after_chunk)
            return count

        setattr(store, name, wrapped)

    # The steps load every precompute shard in one transaction (tidpo_core.runtime.precompute).
    wrap("load_anchor_shards", "anchors")
    wrap("load_weight_shards", "weights")
    original_log = tracking.log_transformers_model

    def log_model(*args: Any, **kwargs: Any) -> Any:
        _mark("registering")
        info = original_log(*args, **kwargs)
        _mark("registered")
        time.sleep(pause_after_register)  # hold before the MLflow run is marked finished
        return info

    tracking.log_transformers_model = log_model  # type: ignore[assignment]


def _nan_pipes_client(step: int) -> Any:
    """A Pipes client that plants a NaN loss at `step` in the training process's environment."""
    import dagster as dg

    from tidpo_core.runtime.faults import Faults

    class NanInjectingPipesClient(dg.PipesSubprocessClient):
        def run(self, *, env=None, **kwargs):  # type: ignore[no-untyped-def, override]
            return super().run(env={**(env or {}), **Faults(nan_at_step=step).as_env()}, **kwargs)

    return NanInjectingPipesClient()


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.run worker")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config", required=True, help="run config as JSON")
    parser.add_argument("--select", default="all", help="comma-separated asset keys, or all")
    parser.add_argument("--marks", action="store_true")
    parser.add_argument("--pause-after-chunk", type=float, default=0.0)
    parser.add_argument("--pause-in", default="", help="anchors,weights: hold inside that transaction")
    parser.add_argument("--pause-in-s", type=float, default=30.0)
    parser.add_argument("--pause-after-register", type=float, default=0.0)
    parser.add_argument("--lock-wait", type=float, default=0.0)
    parser.add_argument("--gate-margin", type=float, default=None)
    parser.add_argument("--nan-at-step", type=int, default=None)
    parser.add_argument("--tracking-uri", default="")
    args = parser.parse_args(argv)

    import dagster as dg

    from tidpo_pipeline.checks import ALL_CHECKS
    from tidpo_pipeline.definitions import ASSETS
    from tidpo_pipeline.resources import MlflowTracking, QualityPolicy, TidpoDuckDB, build_resources

    if args.marks or args.pause_in:
        pause_in = set(filter(None, args.pause_in.split(",")))
        _install_marks(args.pause_after_chunk, pause_in, args.pause_in_s, args.pause_after_register)
    resources = build_resources(args.data_dir)
    if args.lock_wait:
        resources["duckdb"] = TidpoDuckDB(
            database=str(Path(args.data_dir).resolve() / DATABASE_FILE), lock_timeout_s=args.lock_wait
        )
    if args.gate_margin is not None:
        resources["quality"] = QualityPolicy(gate_margin=args.gate_margin)
    if args.nan_at_step is not None:
        resources["pipes_subprocess_client"] = _nan_pipes_client(args.nan_at_step)
    if args.tracking_uri:
        resources["mlflow_tracking"] = MlflowTracking(data_dir=args.data_dir, tracking_uri=args.tracking_uri)
    selection = None if args.select == "all" else args.select.split(",")
    run_config = json.loads(args.config)
    if selection is not None:  # config of unselected assets is an error to Dagster
        run_config["ops"] = {k: v for k, v in run_config.get("ops", {}).items() if k in selection}
    _mark(f"started pid {os.getpid()}")
    started = time.perf_counter()
    result = dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=resources,
        run_config=run_config,
        selection=selection,
        raise_on_error=False,
    )
    errors = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        messages = []
        while error is not None:  # the error and what caused it, messages only
            messages.append(f"{error.cls_name}: {error.message.strip()}"[:1500])
            error = error.cause or error.context
        if messages:
            errors.append(" <- ".join(messages))
    checks = {c.check_name: bool(c.passed) for c in result.get_asset_check_evaluations()}
    print(
        f"{RESULT} "
        + json.dumps(
            {"success": result.success, "errors": errors, "checks": checks, "seconds": time.perf_counter() - started}
        ),
        flush=True,
    )
    return 0 if result.success else 1


# =====================================================================================================
# Parent side: spawning, watching and killing workers
# =====================================================================================================


class Worker:
    """A worker subprocess whose stdout lines are collected by a thread; stderr goes to a log file."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = log_path.open("w")
        self.popen = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: a stuck run can be cleaned up whole
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started = time.monotonic()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, needle: str, timeout: float, occurrence: int = 1) -> str | None:
        """The n-th stdout line containing `needle`; None if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        seen = found = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    found += needle in line
                    if found == occurrence:
                        return line
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def kill(self) -> None:
        """SIGKILL the worker process itself (the run's step process), not its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def finish(self, timeout: float = 900) -> dict[str, Any]:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return {"success": False, "errors": [f"timed out after {timeout} s"], "checks": {}}
        self._reader.join(timeout=10)
        self._log.close()
        for line in reversed(self.lines):
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
        return {"success": False, "errors": [f"exit {self.popen.returncode} without a result: {tail}"], "checks": {}}

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def spawn(data_dir: Path, config: dict[str, Any], logs: Path, name: str, select: str = "all", **options: Any) -> Worker:
    command = [sys.executable, "-m", "stress.run", "worker", "--data-dir", str(data_dir), "--config", json.dumps(config)]
    command += ["--select", select]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value not in (None, False):
            command += [flag, str(value)]
    logs.mkdir(parents=True, exist_ok=True)
    return Worker(command, logs / f"{name}.log")


def run_worker(data_dir: Path, config: dict[str, Any], logs: Path, name: str, **options: Any) -> dict[str, Any]:
    return spawn(data_dir, config, logs, name, **options).finish()


# =====================================================================================================
# Inspecting a data dir
# =====================================================================================================


@contextlib.contextmanager
def read_db(data_dir: Path) -> Iterator[Any]:
    from tidpo_core import store

    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        yield con
    finally:
        con.close()


def db_contents(data_dir: Path) -> dict[str, Any]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.contents(con)


def integrity_problems(data_dir: Path) -> dict[str, int]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.integrity_problems(con)


def table_counts(data_dir: Path) -> dict[str, int]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.table_counts(con)


def registry(data_dir: Path) -> dict[str, Any]:
    from tidpo_core.runtime import tracking

    uri = tracking.sqlite_tracking_uri(data_dir)
    versions = []
    with contextlib.suppress(Exception):
        for v in tracking.model_versions(uri):
            versions.append({"version": int(v.version), "run_id": v.run_id, "status": v.status, "tags": dict(v.tags)})
    info = tracking.champion(uri)
    runs = [(r.info.run_id, r.info.run_name, r.info.status) for r in tracking.experiment_runs(uri)]
    return {
        "versions": sorted(versions, key=lambda v: v["version"]),
        "champion": info.version if info else None,
        "runs": runs,
    }


def trainer_pids(data_dir: Path) -> list[int]:
    """Live training processes whose command names a file under this data dir."""
    needle = str(data_dir.resolve()).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if b"tidpo_core.training" in cmdline and needle in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def final_model(data_dir: Path) -> dict[str, Any]:
    """The weights of the newest trained policy folder (models/policy/<run>/final)."""
    from safetensors.torch import load_file

    finals = sorted((data_dir / "models" / "policy").glob("*/final/model.safetensors"), key=lambda p: p.stat().st_mtime)
    return load_file(finals[-1]) if finals else {}


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if set(a) != set(b) or not a:
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def weights_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for key in a:
        if a[key][0] != b[key][0]:
            return float("inf")
        for x, y in zip(a[key][1] + a[key][2], b[key][1] + b[key][2], strict=True):
            worst = max(worst, abs(x - y))
    return worst


def metrics_diff(a: list[tuple], b: list[tuple]) -> float:
    left, right = {(m, k): v for m, k, v in a}, {(m, k): v for m, k, v in b}
    if set(left) != set(right):
        return float("inf")
    return max((abs(left[k] - right[k]) for k in left if left[k] == left[k] and right[k] == right[k]), default=0.0)


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


# =====================================================================================================
# Scenario: bad input
# =====================================================================================================

WORDS = "the a answer question model cat paris burn water help please why how two".split()


MB_TEXT = "x" * 1_000_000


def _text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.002:
        return MB_TEXT
    if kind < 0.80:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    return rng.choice(["", "   ", "\n\t", "\u3000", "a\x00b", "\ud800x", "ünïcødé ✓ 你好", "\ufeff", "\r\n"])


def _wrong(rng: random.Random) -> Any:
    return rng.choice([None, 3, 2.5, True, [1, 2], {"k": "v"}, []])


def _row(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.55:  # explicit, maybe with missing / wrong / extra keys, maybe chosen == rejected
        row: dict[str, Any] = {}
        for key in ("prompt", "chosen", "rejected"):
            r = rng.random()
            if r < 0.85:
                row[key] = _text(rng)
            elif r < 0.93:
                row[key] = _wrong(rng)
        if rng.random() < 0.08 and "chosen" in row:
            row["rejected"] = row["chosen"]
        for _ in range(rng.randint(0, 2)):
            row[rng.choice(["id", "score", "meta", "lang", "extra"])] = rng.choice([1, "x", [1, 2], {"a": 1}, None])
        return row
    if kind < 0.75:  # conversational
        shared = [{"role": "user", "content": _text(rng)}]
        row = {
            "chosen": shared + [{"role": "assistant", "content": _text(rng)}],
            "rejected": shared + [{"role": rng.choice(["assistant", "user"]), "content": rng.choice([_text(rng), 5])}],
        }
        if rng.random() < 0.3:
            row["prompt"] = rng.choice([_text(rng), shared])
        return row
    if kind < 0.9:  # Anthropic HH transcripts
        human = _text(rng)
        return {
            "chosen": f"\n\nHuman: {human}\n\nAssistant: {_text(rng)}",
            "rejected": f"\n\nHuman: {rng.choice([human, 'other'])}\n\nAssistant: {_text(rng)}",
        }
    return rng.choice([42, "a string", [1, 2], None])


def _line(rng: random.Random, row: Any) -> bytes:
    data = json.dumps(row, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.06 and len(data) > 2:
        return data[: rng.randint(1, len(data) - 1)]  # truncated
    if r < 0.10 and len(data) > 2:
        at = rng.randint(1, len(data) - 1)
        return data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x00"]) + data[at:]
    return data


def _fuzz_file(rng: random.Random, directory: Path, index: int) -> tuple[Path, int]:
    """A file of mixed, partly broken rows; returns it and the number of rows it holds."""
    fmt = rng.choice(["jsonl", "jsonl", "jsonl.gz", "json", "csv"])
    rows = [_row(rng) for _ in range(rng.randint(5, 80))]
    if rows and rng.random() < 0.5:
        rows += rng.sample(rows, k=min(len(rows), rng.randint(1, 5)))  # duplicated pairs
    path = directory / f"fuzz_{index:04d}.{fmt}"
    if fmt == "json":
        clean = [r for r in rows if not _has_surrogate(r)]
        path.write_text(json.dumps(clean))
        return path, len(clean)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["prompt", "chosen", "rejected"])
        records = []
        for row in rows:
            if isinstance(row, dict):
                record = [row.get(k) if isinstance(row.get(k), str) else json.dumps(row.get(k)) for k in ("prompt", "chosen", "rejected")]
            else:
                record = [json.dumps(row)]
            records.append(record)
        writer.writerows(records)
        path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
        return path, len(records)
    lines = [_line(rng, row) for row in rows]
    if rng.random() < 0.2:
        lines.insert(rng.randint(0, len(lines)), b"   ")
    body = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)
    return path, sum(1 for line in lines if line.strip())


def _has_surrogate(value: Any) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in json.dumps(value, ensure_ascii=False))


def junk_files(directory: Path) -> list[Path]:
    rng = random.Random(7)
    files = {
        "binary.jsonl": bytes(rng.randrange(256) for _ in range(4096)) + b"\x00" * 64,
        "truncated.jsonl.gz": gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 500)[:80],
        "not_gzip.jsonl.gz": b"plain text named like gzip",
        "image.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(512)),
        "utf16.csv": "prompt,chosen,rejected\np,a,b\n".encode("utf-16"),
        "broken.parquet": b"PAR1" + bytes(rng.randrange(256) for _ in range(256)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return [directory / name for name in files]


def scenario_bad_input(work: Path, report: dict[str, Any], files: int = 300, property_examples: int = 300) -> None:
    from tidpo_core.data.files import load_preferences
    from tidpo_core.data.pairs import DataFileError

    print(f"\n== bad input: {files} generated files, junk files, property tests ({property_examples} examples each)")
    rng = random.Random(1234)
    fuzz_dir = work / "fuzz"
    fuzz_dir.mkdir(parents=True)
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    crashes, lost, refused_with_data = [], 0, 0
    for i in range(files):
        path, expected = _fuzz_file(rng, fuzz_dir, i)
        try:
            result = load_preferences(path)
        except DataFileError:
            tally["files_refused"] += 1
            refused_with_data += 1  # a generated file always holds some decodable rows
            continue
        except Exception as exc:  # noqa: BLE001 - a crash is what this counts
            crashes.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        tally["rows_read"] += result.rows_read
        tally["accepted"] += result.accepted
        tally["quarantined"] += len(result.quarantined)
        lost += expected - result.accepted - len(result.quarantined)
        reasons.update(result.reason_counts())
    junk_named = 0
    junk = junk_files(work / "junk")
    for path in junk:
        try:
            load_preferences(path)
        except DataFileError as exc:
            junk_named += path.name in str(exc)
    pipeline = _bad_input_pipeline(work, fuzz_dir, junk[1])
    examples = None
    prop = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data_properties.py"],
        cwd=ROOT,
        env={**os.environ, "TIDPO_PROPERTY_EXAMPLES": str(property_examples)},
        capture_output=True,
        text=True,
    )
    examples = property_examples
    report["bad_input"] = {
        "files_tried": files,
        "junk_files_tried": len(junk),
        "rows_read": tally["rows_read"],
        "rows_accepted": tally["accepted"],
        "rows_quarantined": tally["quarantined"],
        "quarantine_reasons": dict(sorted(reasons.items())),
        "rows_lost": lost,
        "crashes": crashes,
        "files_with_data_refused": refused_with_data,
        "junk_files_refused_naming_the_file": junk_named,
        "property_tests_passed": prop.returncode == 0,
        "property_examples_per_test": examples,
        "property_output_tail": prop.stdout[-600:] if prop.returncode else "",
        **pipeline,
    }
    print(json.dumps({k: v for k, v in report["bad_input"].items() if k != "quarantine_reasons"}, indent=1))


def _bad_input_pipeline(work: Path, fuzz_dir: Path, junk: Path) -> dict[str, Any]:
    """Messy files in the inbox: the asset stores what is good, the check reports the quarantine share;
    a junk file in the inbox fails the asset naming it and leaves the stored rows unchanged."""
    import dagster as dg

    from tidpo_pipeline.checks import ALL_CHECKS
    from tidpo_pipeline.definitions import ASSETS
    from tidpo_pipeline.resources import build_resources

    data_dir = work / "inbox_run"
    inbox = data_dir / "inbox"
    inbox.mkdir(parents=True)
    for path in sorted(fuzz_dir.iterdir())[:40]:
        shutil.copy(path, inbox / path.name)
    config = {
        "ops": {"preference_pairs": {"config": {"synthetic_pairs": 50}}},
        # The junk file's failure is expected: keep its traceback out of the report.
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }

    def materialize() -> Any:
        return dg.materialize(
            [*ASSETS, *ALL_CHECKS],
            resources=build_resources(str(data_dir)),
            run_config=config,
            selection=["preference_pairs"],
            raise_on_error=False,
        )

    result = materialize()
    meta = result.asset_materializations_for_node("preference_pairs")[0].metadata
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "quarantine_share_below_limit")
    before = db_contents(data_dir)
    shutil.copy(junk, inbox / junk.name)
    failed = materialize()
    message = "".join(
        e.event_specific_data.error.to_string() for e in failed.all_events if getattr(e.event_specific_data, "error", None)
    )
    return {
        "inbox_run_success": result.success,
        "inbox_rows_read": meta["rows_read"].value,
        "inbox_quarantine_share_metadata": round(meta["quarantine_share"].value, 4),
        "inbox_quarantine_share_check": round(check.metadata["quarantine_share"].value, 4),
        "junk_in_inbox_fails_asset_naming_file": (not failed.success) and junk.name in message,
        "junk_in_inbox_stored_rows_unchanged": db_contents(data_dir) == before,
    }


# =====================================================================================================
# Scenario: crashes
# =====================================================================================================


@dataclass
class CrashOutcome:
    point: str
    killed: bool
    detail: dict[str, Any] = field(default_factory=dict)


def _kill_at_mark(
    data_dir: Path, logs: Path, name: str, needle: str, config: dict, delay: float = 0.0, occurrence: int = 1, **opts: Any
) -> CrashOutcome:
    worker = spawn(data_dir, config, logs, name, marks=True, **opts)
    line = worker.wait_line(needle, timeout=600, occurrence=occurrence)
    if line is None:
        result = worker.finish()
        return CrashOutcome(name, False, {"error": f"no '{needle}' mark", "result": result})
    if delay:
        time.sleep(delay)
    worker.kill()
    return CrashOutcome(name, True, {"mark": line.removeprefix(MARK).strip(), "at_s": round(worker.elapsed, 1)})


def _kill_when(data_dir: Path, logs: Path, name: str, predicate: Callable[[], bool], config: dict, **opts: Any) -> CrashOutcome:
    worker = spawn(data_dir, config, logs, name, marks=True, **opts)
    if not wait_for(lambda: predicate() or worker.popen.poll() is not None, timeout=600, every=0.05) or worker.popen.poll() is not None:
        return CrashOutcome(name, False, {"error": "condition never met", "result": worker.finish()})
    worker.kill()
    return CrashOutcome(name, True, {"at_s": round(worker.elapsed, 1)})


def _checkpoints(data_dir: Path) -> list[Path]:
    return list((data_dir / "models" / "policy").glob("*/checkpoints/step_*/COMPLETE.json"))


def compare_to_baseline(data_dir: Path, baseline: dict[str, Any], baseline_model: dict[str, Any]) -> dict[str, Any]:
    got = db_contents(data_dir)
    problems = integrity_problems(data_dir)
    pairs_lost = len(set(baseline["pairs"]) - set(got["pairs"]))
    anchors_lost = len(set(baseline["anchors"]) - set(got["anchors"]))
    weights_lost = len(set(baseline["weights"]) - set(got["weights"]))
    return {
        "pairs_equal": got["pairs"] == baseline["pairs"],
        "anchors_equal": got["anchors"] == baseline["anchors"],
        "weights_max_abs_diff": weights_diff(got["weights"], baseline["weights"]),
        "policy_max_abs_diff": max_abs_diff(final_model(data_dir), baseline_model),
        "metrics_max_abs_diff": metrics_diff(got["metrics"], baseline["metrics"]),
        "rows_lost": pairs_lost + anchors_lost + weights_lost,
        "rows_extra": (len(got["pairs"]) - len(baseline["pairs"]) + pairs_lost)
        + (len(got["anchors"]) - len(baseline["anchors"]) + anchors_lost)
        + (len(got["weights"]) - len(baseline["weights"]) + weights_lost),
        "integrity_problems": {k: v for k, v in problems.items() if v},
    }


def scenario_crashes(work: Path, report: dict[str, Any], cli: bool = True) -> tuple[Path, dict, dict]:
    logs = work / "logs"
    config = stress_config()
    print("\n== crashes: uninterrupted baseline run")
    baseline_dir = work / "baseline"
    started = time.monotonic()
    base = run_worker(baseline_dir, config, logs, "baseline")
    if not base["success"]:
        raise SystemExit(f"baseline run failed: {base['errors'][-1:]}")
    baseline_seconds = time.monotonic() - started
    baseline = db_contents(baseline_dir)
    baseline_model = final_model(baseline_dir)
    counts = table_counts(baseline_dir)
    print(f"   baseline: {counts} in {baseline_seconds:.0f} s")

    data_dir = work / "crash"
    outcomes: list[CrashOutcome] = []

    def after(outcome: CrashOutcome, expect: Callable[[dict[str, int]], bool]) -> None:
        wait_for(lambda: not trainer_pids(data_dir), timeout=5)  # a trainer must die with its step at once
        outcome.detail["counts_after"] = table_counts(data_dir)
        outcome.detail["integrity_problems"] = {k: v for k, v in integrity_problems(data_dir).items() if v}
        outcome.detail["trainers_left"] = len(trainer_pids(data_dir))
        outcome.detail["state_as_expected"] = bool(expect(outcome.detail["counts_after"]))
        outcomes.append(outcome)
        print(f"   {outcome.point}: killed={outcome.killed} {outcome.detail}")

    print("== crashes: SIGKILL of the run's step process at chosen points, then re-runs")
    train_pairs = counts["anchors"]
    # 1. inside the anchors' load transaction (all shards at once): no anchor row; the shard files stay
    after(
        _kill_at_mark(data_dir, logs, "kill_in_anchor_load", "in-transaction anchors", config, pause_in="anchors", pause_in_s=1.0),
        lambda c: c["anchors"] == 0 and c["pairs"] == len(baseline["pairs"]),
    )
    # 2. inside the token weights' load transaction, likewise
    after(
        _kill_at_mark(data_dir, logs, "kill_in_weight_load", "in-transaction weights", config, pause_in="weights", pause_in_s=1.0),
        lambda c: c["anchors"] == train_pairs and c["weight_responses"] == 0,
    )
    # 3. during training, once a checkpoint is complete: the trainer must die with its step
    after(
        _kill_when(data_dir, logs, "kill_during_training", lambda: bool(_checkpoints(data_dir)) and bool(trainer_pids(data_dir)), config),
        lambda c: c["weight_responses"] == counts["weight_responses"],
    )
    outcomes[-1].detail["registered_versions_after"] = len(registry(data_dir)["versions"])
    # 4. during model registration (after training finished): the re-run must not register twice
    after(
        _kill_at_mark(data_dir, logs, "kill_during_registration", "registering", config, delay=1.5),
        lambda c: c["weight_responses"] == counts["weight_responses"],
    )
    # 5. right after registration, before the MLflow run is marked finished: the re-run resumes the
    #    same MLflow run and must reuse its version, not register a second one
    after(
        _kill_at_mark(data_dir, logs, "kill_after_registration", "registered", config, pause_after_register=30),
        lambda c: c["weight_responses"] == counts["weight_responses"],
    )
    outcomes[-1].detail["registered_versions_after"] = len(registry(data_dir)["versions"])
    print("== crashes: final re-run")
    final = run_worker(data_dir, config, logs, "crash_recovered")
    comparison = compare_to_baseline(data_dir, baseline, baseline_model)
    reg = registry(data_dir)
    recovered = final["success"] and comparison["rows_lost"] == 0 and comparison["rows_extra"] == 0
    print(f"   recovered: success={final['success']} {comparison} registry={len(reg['versions'])} versions, champion {reg['champion']}")

    cli_result: dict[str, Any] = {"skipped": True}
    if cli:
        cli_result = _cli_crash(work, config, baseline, baseline_model)

    report["crashes"] = {
        "baseline_seconds": round(baseline_seconds, 1),
        "baseline_counts": counts,
        "injected": sum(o.killed for o in outcomes) + cli_result.get("killed", 0),
        "kill_points": [{"point": o.point, "killed": o.killed, **o.detail} for o in outcomes],
        "recovered_run_success": final["success"],
        "recovered_equals_uninterrupted": recovered
        and comparison["pairs_equal"]
        and comparison["anchors_equal"]
        and comparison["weights_max_abs_diff"] == 0.0
        and comparison["policy_max_abs_diff"] <= POLICY_TOLERANCE,
        "comparison": comparison,
        "registry_after_recovery": {"versions": len(reg["versions"]), "champion": reg["champion"]},
        # Each kill point starts a new materialization once the previous one finished, so several versions
        # are expected; what must not happen is one MLflow run registering twice (a resumed run re-registering).
        "no_mlflow_run_registered_twice": len(reg["versions"]) == len({v["run_id"] for v in reg["versions"]}),
        "versions_sharing_an_mlflow_run": len(reg["versions"]) - len({v["run_id"] for v in reg["versions"]}),
        "cli": cli_result,
    }
    return baseline_dir, baseline, baseline_model


def _parent_pid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().split(") ", 1)[1].split()[1])


def _cli_crash(work: Path, config: dict[str, Any], baseline: dict, baseline_model: dict) -> dict[str, Any]:
    """The same crash through `dagster job execute` (multiprocess executor: each step its own process):
    SIGKILL the training step's process, then execute the job again."""
    print("== crashes: `dagster job execute` (multiprocess executor), SIGKILL of the training step process")
    home = work / "cli_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data_dir = work / "cli_data"
    config_path = work / "cli_config.json"
    config_path.write_text(json.dumps(config))
    env = {"DAGSTER_HOME": str(home), "TIDPO_DATA_DIR": str(data_dir)}
    dagster = str(Path(sys.executable).parent / "dagster")
    command = [dagster, "job", "execute", "-m", "tidpo_pipeline.definitions", "-j", "tidpo_training", "-c", str(config_path)]
    first = Worker(command, work / "logs" / "cli_killed.log", env=env)
    killed_pid = None
    if wait_for(lambda: bool(_checkpoints(data_dir)) or first.popen.poll() is not None, timeout=600, every=0.05):
        trainers = trainer_pids(data_dir)
        with contextlib.suppress(OSError, IndexError):
            # The training step's process (a child of the CLI's run process) is the trainer's parent.
            step = _parent_pid(trainers[0])
            if step != first.popen.pid:
                os.kill(step, signal.SIGKILL)
                killed_pid = step
    with contextlib.suppress(subprocess.TimeoutExpired):
        first.popen.wait(timeout=120)
    if first.popen.poll() is None:
        first.kill_group()
    first._log.close()
    trainers_left = wait_for(lambda: not trainer_pids(data_dir), timeout=10)
    # The re-run materializes the interrupted asset and what follows it; the upstream assets' outputs
    # come from the first run through the instance's IO manager, as in a re-execution from the UI.
    rerun_config = work / "cli_rerun_config.json"
    rerun_config.write_text(json.dumps({"ops": {k: config["ops"][k] for k in ("tidpo_policy", "evaluation")}}))
    rerun = [dagster, "asset", "materialize", "-m", "tidpo_pipeline.definitions", "--select", "tidpo_policy*", "-c", str(rerun_config)]
    second = Worker(rerun, work / "logs" / "cli_recovered.log", env=env)
    second.popen.wait(timeout=900)
    second._log.close()
    comparison = compare_to_baseline(data_dir, baseline, baseline_model)
    outcome = {
        "killed": int(killed_pid is not None),
        "first_exit_code": first.popen.returncode,
        "trainer_died_with_step": trainers_left,
        "rerun_exit_code": second.popen.returncode,
        "comparison": comparison,
        "recovered_equals_uninterrupted": second.popen.returncode == 0
        and comparison["rows_lost"] == 0
        and comparison["rows_extra"] == 0
        and comparison["policy_max_abs_diff"] <= POLICY_TOLERANCE,
    }
    print(f"   {outcome}")
    return outcome


# =====================================================================================================
# Scenario: concurrency
# =====================================================================================================


def _is_busy(result: dict[str, Any]) -> bool:
    return any(BUSY in e for e in result["errors"])


def _stores_readable(data_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["integrity_problems"] = {k: v for k, v in integrity_problems(data_dir).items() if v}
        out["counts"] = table_counts(data_dir)
        out["duckdb_readable"] = True
    except Exception as exc:  # noqa: BLE001
        out["duckdb_readable"] = f"{type(exc).__name__}: {exc}"
    try:
        reg = registry(data_dir)
        out["mlflow_readable"] = True
        run_status = {r[0]: r[2] for r in reg["runs"]}
        out["versions"] = len(reg["versions"])
        out["versions_with_unfinished_run"] = sum(1 for v in reg["versions"] if run_status.get(v["run_id"]) != "FINISHED")
        out["champion"] = reg["champion"]
    except Exception as exc:  # noqa: BLE001
        out["mlflow_readable"] = f"{type(exc).__name__}: {exc}"
    return out


def scenario_concurrency(work: Path, report: dict[str, Any], baseline: dict | None, baseline_model: dict | None) -> None:
    logs = work / "logs"
    config = stress_config()
    print("\n== concurrency: two whole-job runs at once on one fresh data dir (fail-fast lock)")
    data_dir = work / "concurrent"
    pair = [spawn(data_dir, config, logs, f"concurrent_job_{i}") for i in range(2)]
    results = [w.finish() for w in pair]
    fail_seconds = [round(r.get("seconds", 0), 2) for r in results if not r["success"]]
    job_pair = {
        "succeeded": sum(r["success"] for r in results),
        "failed_fast_with_busy_message": sum(_is_busy(r) for r in results),
        "other_failures": [r["errors"][-1][-400:] for r in results if not r["success"] and not _is_busy(r)],
        "busy_failure_seconds": fail_seconds,
        "busy_message": next((e.splitlines()[0][-400:] for r in results for e in r["errors"] if BUSY in e), ""),
        **_stores_readable(data_dir),
    }
    if baseline is not None and baseline_model is not None:
        job_pair["comparison_to_uninterrupted"] = compare_to_baseline(data_dir, baseline, baseline_model)
    print(f"   {job_pair}")

    print("== concurrency: three preference_pairs runs at once, two rounds")
    rounds = []
    many_dir = work / "concurrent_many"
    for r in range(2):
        group = [spawn(many_dir, config, logs, f"many_{r}_{i}", select="preference_pairs") for i in range(3)]
        outs = [w.finish() for w in group]
        rounds.append(
            {
                "succeeded": sum(o["success"] for o in outs),
                "busy": sum(_is_busy(o) for o in outs),
                "other_failures": sum(1 for o in outs if not o["success"] and not _is_busy(o)),
            }
        )
    many = {"rounds": rounds, **_stores_readable(many_dir)}
    print(f"   {many}")

    print("== concurrency: two runs with lock_timeout_s set (they serialize)")
    serial_dir = work / "serialized"
    waiting = [spawn(serial_dir, config, logs, f"serial_{i}", select="preference_pairs,reference_model", lock_wait=600) for i in range(2)]
    serial_results = [w.finish() for w in waiting]
    serialized = {"succeeded": sum(r["success"] for r in serial_results), **_stores_readable(serial_dir)}
    print(f"   {serialized}")

    print("== concurrency: a reader holds the DuckDB file open while a run starts")
    reader_dir = work / "reader"
    run_worker(reader_dir, config, logs, "reader_setup", select="preference_pairs")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, duckdb; c = duckdb.connect(sys.argv[1], read_only=True); print('open', flush=True); time.sleep(12)", str(reader_dir / DATABASE_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    holder.stdout.readline()
    with_reader = run_worker(reader_dir, config, logs, "reader_run", select="preference_pairs")
    holder.wait()
    reader = {"run_succeeded_after_reader_let_go": with_reader["success"], **_stores_readable(reader_dir)}
    print(f"   {reader}")

    print("== concurrency: two `dagster asset materialize` (multiprocess executor) at once")
    home = work / "cli_concurrent_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    cli_dir = work / "cli_concurrent"
    env = {"DAGSTER_HOME": str(home), "TIDPO_DATA_DIR": str(cli_dir)}
    dagster = str(Path(sys.executable).parent / "dagster")
    cli_config = work / "cli_concurrent.json"
    cli_config.write_text(json.dumps({"ops": {"preference_pairs": config["ops"]["preference_pairs"]}}))
    command = [dagster, "asset", "materialize", "-m", "tidpo_pipeline.definitions", "--select", "preference_pairs", "-c", str(cli_config)]
    # Dagster creates its sqlite tables on first use, and two first uses at once race on them (a
    # Dagster matter, not tidpo's): set the instance up once, as a first `make run` would.
    subprocess.run([dagster, "instance", "migrate"], env={**os.environ, **env}, cwd=ROOT, capture_output=True, check=True)
    procs = [Worker(command, logs / f"cli_concurrent_{i}.log", env=env) for i in range(2)]
    codes = []
    for p in procs:
        p.popen.wait(timeout=600)
        p._log.close()
        codes.append(p.popen.returncode)
    busy = sum(BUSY in p.log_path.read_text() for p in procs)
    cli = {"exit_codes": codes, "succeeded": codes.count(0), "busy_messages": busy, **_stores_readable(cli_dir)}
    print(f"   {cli}")

    report["concurrency"] = {
        "runs_tried": 2 + 6 + 2 + 1 + 2,
        "whole_job_pair": job_pair,
        "three_at_once": many,
        "serialized_with_lock_timeout": serialized,
        "reader_holding_file": reader,
        "cli_multiprocess_pair": cli,
    }


# =====================================================================================================
# Scenario: registry safety
# =====================================================================================================


def scenario_registry(data_dir: Path, report: dict[str, Any]) -> None:
    logs = data_dir.parent / "logs"
    before = registry(data_dir)
    print(f"\n== registry: start with {len(before['versions'])} version(s), champion {before['champion']}")
    gate = run_worker(data_dir, stress_config(seed=1), logs, "gate_failure", gate_margin=10.0)
    after_gate = registry(data_dir)
    new_versions = [v for v in after_gate["versions"] if v["version"] not in {x["version"] for x in before["versions"]}]
    gate_out = {
        "run_success": gate["success"],
        "gate_check_passed": gate["checks"].get("evaluation_gate"),
        "new_versions": len(new_versions),
        "new_version_tags": [v["tags"] for v in new_versions],
        "champion_before": before["champion"],
        "champion_after": after_gate["champion"],
        "champion_unchanged": after_gate["champion"] == before["champion"],
    }
    print(f"   gate failure: {gate_out}")
    nan = run_worker(data_dir, stress_config(seed=2), logs, "nan_run", nan_at_step=3)
    after_nan = registry(data_dir)
    nan_out = {
        "run_success": nan["success"],
        "error_mentions_non_finite": any("non-finite" in e.lower() or "nan" in e.lower() for e in nan["errors"]),
        "new_versions": len(after_nan["versions"]) - len(after_gate["versions"]),
        "champion_unchanged": after_nan["champion"] == after_gate["champion"],
        "failed_mlflow_runs": sum(1 for r in after_nan["runs"] if r[2] == "FAILED"),
        "trainers_left": len(trainer_pids(data_dir)),
    }
    print(f"   NaN run: {nan_out}")
    report["registry"] = {"gate_failure": gate_out, "nan_run": nan_out, **_challengers(data_dir, logs, after_nan)}


def _challengers(data_dir: Path, logs: Path, before: dict[str, Any]) -> dict[str, Any]:
    """Scheduled retraining against a good champion: a weaker challenger (a twelfth of the steps) that
    still beats its reference never takes the alias; a stronger one (four times the steps) does."""
    outcomes: dict[str, Any] = {}
    current = before
    for name, steps, seed in (("weaker_challenger", 2, 4), ("stronger_challenger", 96, 5)):
        result = run_worker(data_dir, stress_config(steps=steps, seed=seed), logs, name)
        after = registry(data_dir)
        new = [v for v in after["versions"] if v["version"] not in {x["version"] for x in current["versions"]}]
        verdict = new[-1]["tags"].get("gate_verdict", "") if new else ""
        outcomes[name] = {
            "steps": steps,
            "run_success": result["success"],
            "new_versions": len(new),
            "beats_reference": verdict.startswith("reference: passed"),
            "compared_with": new[-1]["tags"].get("compared_with") if new else None,
            "verdict": verdict,
            "champion_before": current["champion"],
            "champion_after": after["champion"],
            "took_the_alias": bool(new) and after["champion"] == str(new[-1]["version"]),
        }
        print(f"   {name}: {outcomes[name]}")
        current = after
    return outcomes


# =====================================================================================================
# Scenario: dependencies down, safe defaults
# =====================================================================================================


def scenario_dependencies(work: Path, report: dict[str, Any]) -> None:
    print("\n== dependencies down")
    logs = work / "logs"
    config = stress_config()
    out: dict[str, Any] = {}
    data_dir = work / "deps"
    # Each worker has its own ephemeral Dagster instance, so upstream assets are selected too.
    down = run_worker(data_dir, config, logs, "mlflow_down", select="preference_pairs,reference_model", tracking_uri="http://127.0.0.1:9")
    out["mlflow_unreachable"] = {
        "failed": not down["success"],
        "seconds": round(down.get("seconds", 0), 1),
        "clear_message": any("not reachable" in e for e in down["errors"]),
        "no_model_built": not (data_dir / "models" / "reference").exists(),
    }
    missing_config = json.loads(json.dumps(config))
    missing_config["ops"]["reference_model"]["config"] = {"model_name_or_path": "/nonexistent/model-dir"}
    missing = run_worker(data_dir, missing_config, logs, "missing_model", select="preference_pairs,reference_model")
    out["missing_model_path"] = {
        "failed": not missing["success"],
        "seconds": round(missing.get("seconds", 0), 1),
        "clear_message": any("/nonexistent/model-dir" in e for e in missing["errors"]),
        "no_mlflow_run": not any(r[1] == "reference_model" for r in registry(data_dir)["runs"]),
    }
    print(f"   {out}")
    report["dependencies"] = out


def scenario_safe_defaults(report: dict[str, Any], data_dir: Path | None) -> None:
    print("\n== safe defaults")
    import inspect

    from tidpo_core.data.files import is_data_file, load_preferences
    from tidpo_core.data.pairs import DataFileError
    from tidpo_core.evaluation import benchmarks
    from tidpo_core.models import modeling
    from tidpo_pipeline import assets, evaluation_assets

    makefile = (ROOT / "Makefile").read_text()
    ui = next((line for line in makefile.splitlines() if "dagster dev" in line), "")
    out: dict[str, Any] = {
        "webserver_binds_localhost": "-h 127.0.0.1" in ui and "0.0.0.0" not in makefile,
        "trust_remote_code_default_off": assets.ReferenceModelConfig().trust_remote_code is False
        and inspect.signature(modeling.load_model_and_tokenizer).parameters["trust_remote_code"].default is False,
        "code_execution_default_off": benchmarks.BenchmarkOptions().allow_code_execution is False
        and evaluation_assets.EvaluationConfig().allow_code_execution is False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        refused = 0
        for name in ("rows.pkl", "rows.pt", "rows.bin", "rows.pickle"):
            path = Path(tmp) / name
            path.write_bytes(b"\x80\x04N.")  # pickle of None: must never be unpickled
            with contextlib.suppress(DataFileError):
                load_preferences(path)
                continue
            refused += not is_data_file(path)
        out["pickle_files_refused_and_not_picked_up_from_inbox"] = refused == 4
    if data_dir is not None:
        models = [p for p in (data_dir / "models").rglob("*") if p.is_file() and "checkpoints" not in p.parts]
        artifacts = [p for p in (data_dir / "mlartifacts").rglob("*") if p.is_file()] if (data_dir / "mlartifacts").exists() else []
        pickled = [str(p.relative_to(data_dir)) for p in models + artifacts if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
        out["model_weight_files_safetensors"] = sum(p.suffix == ".safetensors" for p in models + artifacts)
        out["pickled_files_in_model_folders"] = pickled
    print(f"   {out}")
    report["safe_defaults"] = out


# =====================================================================================================
# Report
# =====================================================================================================


def scenario_slow_tests(report: dict[str, Any]) -> None:
    """The tests marked `slow`, which `make test` leaves out."""
    started = time.monotonic()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", "--timeout", "900", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last_line = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    report["slow_tests"] = {
        "passed": tests.returncode == 0,
        "summary": last_line,
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": tests.stdout[-2000:] if tests.returncode else "",
    }
    print(f"slow tests: {last_line}")


def summary_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    bad = report.get("bad_input")
    if bad:
        rows += [
            ("input files tried (generated + junk)", f"{bad['files_tried']} + {bad['junk_files_tried']}"),
            ("property-test examples", f"{bad['property_examples_per_test']} per test, passed: {bad['property_tests_passed']}"),
            ("rows read", bad["rows_read"]),
            ("rows accepted", bad["rows_accepted"]),
            ("rows quarantined", bad["rows_quarantined"]),
            ("loader crashes on a row", len(bad["crashes"])),
            ("junk files refused, naming the file", f"{bad['junk_files_refused_naming_the_file']} / {bad['junk_files_tried']}"),
            ("quarantine share (asset metadata / check)", f"{bad['inbox_quarantine_share_metadata']} / {bad['inbox_quarantine_share_check']}"),
        ]
    crash = report.get("crashes")
    if crash:
        recovered = sum(1 for k in crash["kill_points"] if k["killed"] and k["state_as_expected"] and not k["integrity_problems"])
        rows += [
            ("crashes injected (SIGKILL)", crash["injected"]),
            ("crash states clean (whole chunks, no partial rows)", f"{recovered} / {len(crash['kill_points'])}"),
            ("recovered run equals uninterrupted run", crash["recovered_equals_uninterrupted"]),
            ("recovered via dagster CLI (multiprocess)", crash["cli"].get("recovered_equals_uninterrupted", "skipped")),
            ("MLflow runs that registered a model twice", crash["versions_sharing_an_mlflow_run"]),
            ("trainer processes left after a kill", sum(k.get("trainers_left", 0) for k in crash["kill_points"])),
        ]
    conc = report.get("concurrency")
    if conc:
        pair = conc["whole_job_pair"]
        rows += [
            ("concurrent runs tried", conc["runs_tried"]),
            ("concurrent job pair: succeeded / failed fast (busy)", f"{pair['succeeded']} / {pair['failed_fast_with_busy_message']} in {pair['busy_failure_seconds']} s"),
            ("stores readable after concurrency", all(
                v.get("duckdb_readable") is True and v.get("mlflow_readable") is True
                for v in (pair, conc["three_at_once"], conc["serialized_with_lock_timeout"], conc["reader_holding_file"], conc["cli_multiprocess_pair"])
            )),
        ]
    reg = report.get("registry")
    if reg:
        rows += [
            ("gate failure: champion unchanged", reg["gate_failure"]["champion_unchanged"]),
            ("NaN run: versions registered", reg["nan_run"]["new_versions"]),
            ("NaN run: failure names the non-finite loss", reg["nan_run"]["error_mentions_non_finite"]),
        ]
        if "weaker_challenger" in reg:
            weak, strong = reg["weaker_challenger"], reg["stronger_challenger"]
            rows += [
                ("weaker challenger (beats its reference): took the alias", f"{weak['took_the_alias']} (beats reference: {weak['beats_reference']})"),
                ("stronger challenger: took the alias", strong["took_the_alias"]),
            ]
    deps = report.get("dependencies")
    if deps:
        rows += [
            ("MLflow unreachable: fails in (s)", deps["mlflow_unreachable"]["seconds"]),
            ("missing model path: fails in (s)", deps["missing_model_path"]["seconds"]),
        ]
    slow = report.get("slow_tests")
    if slow:
        rows.append(("slow tests (pytest -m slow)", slow["summary"]))
    rows.append(("rows lost", report.get("rows_lost", 0)))
    return rows


def rows_lost(report: dict[str, Any]) -> int:
    lost = report.get("bad_input", {}).get("rows_lost", 0)
    crash = report.get("crashes")
    if crash:
        lost += crash["comparison"]["rows_lost"]
        lost += crash["cli"].get("comparison", {}).get("rows_lost", 0)
    conc = report.get("concurrency", {}).get("whole_job_pair", {}).get("comparison_to_uninterrupted")
    if conc:
        lost += conc["rows_lost"]
    return lost


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(r[0]) for r in rows)
    print("\n| check" + " " * (width - 5) + " | result |")
    print("|" + "-" * (width + 2) + "|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="bad_input,crashes,concurrency,registry,dependencies,safe_defaults,slow_tests")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    parser.add_argument("--no-cli", action="store_true", help="skip the `dagster job execute` crash")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--property-examples", type=int, default=200)
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="tidpo-stress-"))
    print(f"work dir {work}")
    report: dict[str, Any] = {}
    started = time.monotonic()
    baseline_dir = baseline = baseline_model = None
    try:
        if "bad_input" in only:
            scenario_bad_input(work, report, files=args.files, property_examples=args.property_examples)
        if "crashes" in only:
            baseline_dir, baseline, baseline_model = scenario_crashes(work, report, cli=not args.no_cli)
        if "concurrency" in only:
            scenario_concurrency(work, report, baseline, baseline_model)
        if "registry" in only:
            if baseline_dir is None:
                baseline_dir = work / "registry"
                run_worker(baseline_dir, stress_config(), work / "logs", "registry_setup")
            scenario_registry(baseline_dir, report)
        if "dependencies" in only:
            scenario_dependencies(work, report)
        if "safe_defaults" in only:
            scenario_safe_defaults(report, baseline_dir)
        if "slow_tests" in only:
            scenario_slow_tests(report)
    finally:
        report["rows_lost"] = rows_lost(report) if report else 0
        report["seconds"] = round(time.monotonic() - started, 1)
        report["table"] = [[name, value] for name, value in summary_rows(report)]
        RESULTS_PATH.write_text(json.dumps(report, indent=1, default=str) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(summary_rows(report))
    print(f"\n{report['seconds'] / 60:.1f} min; results in {RESULTS_PATH.relative_to(ROOT)}")
    return 0 if ok(report) else 1


def ok(report: dict[str, Any]) -> bool:
    """Whether every guarantee held."""
    good = report.get("rows_lost", 0) == 0
    if "slow_tests" in report:
        good &= report["slow_tests"]["passed"]
    bad = report.get("bad_input")
    if bad:
        good &= not bad["crashes"] and bad["property_tests_passed"] and bad["junk_files_refused_naming_the_file"] == bad["junk_files_tried"]
        good &= bad["junk_in_inbox_fails_asset_naming_file"] and bad["junk_in_inbox_stored_rows_unchanged"]
    crash = report.get("crashes")
    if crash:
        good &= crash["recovered_equals_uninterrupted"] and crash["no_mlflow_run_registered_twice"]
        good &= all(k["killed"] and k["state_as_expected"] and not k["integrity_problems"] and not k["trainers_left"] for k in crash["kill_points"])
    conc = report.get("concurrency")
    if conc:
        pair, cli = conc["whole_job_pair"], conc["cli_multiprocess_pair"]
        good &= pair["succeeded"] >= 1 and not pair["other_failures"]
        good &= pair["succeeded"] + pair["failed_fast_with_busy_message"] == 2
        good &= all(r["other_failures"] == 0 for r in conc["three_at_once"]["rounds"])
        good &= conc["serialized_with_lock_timeout"]["succeeded"] == 2
        good &= conc["reader_holding_file"]["run_succeeded_after_reader_let_go"]
        good &= cli["succeeded"] >= 1 and cli["succeeded"] + cli["busy_messages"] == 2
        for part in (pair, conc["three_at_once"], conc["serialized_with_lock_timeout"], conc["reader_holding_file"], cli):
            good &= part.get("duckdb_readable") is True and part.get("mlflow_readable") is True
            good &= not part.get("integrity_problems") and not part.get("versions_with_unfinished_run")
    reg = report.get("registry")
    if reg:
        good &= reg["gate_failure"]["champion_unchanged"] and reg["nan_run"]["new_versions"] == 0
        good &= reg["nan_run"]["error_mentions_non_finite"]
        if "weaker_challenger" in reg:
            # The weaker one must beat its reference (else the scenario tested nothing) and still be refused.
            weak, strong = reg["weaker_challenger"], reg["stronger_challenger"]
            good &= weak["beats_reference"] and not weak["took_the_alias"] and weak["champion_after"] == weak["champion_before"]
            good &= strong["took_the_alias"]
    deps = report.get("dependencies")
    if deps:
        for part in deps.values():
            good &= part["failed"] and part["clear_message"] and part["seconds"] < 60
    safe = report.get("safe_defaults")
    if safe:
        good &= all(v for k, v in safe.items() if k not in ("model_weight_files_safetensors", "pickled_files_in_model_folders"))
        good &= not safe.get("pickled_files_in_model_folders")
    return bool(good)


if __name__ == "__main__":
    sys.exit(main())
