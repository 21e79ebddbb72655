"""Data-parallel precompute (anchors, token weights): a plan of shards, computed by one or N processes
through the training launcher, each finished shard a Parquet file; the step loads them into DuckDB.

- The plan: the pending work items sorted by key, cut into shards of whole batches, so that a batch holds
  the same items whatever the process count (and every result, float noise included, is the same).
  Rank r of N computes shards r, r + N, ... that have no file yet.
- Every process, the single in-process one included, writes each finished shard atomically (a temporary
  name, fsync, rename): a file with a shard's name is whole, a temporary file is what a killed process
  left and is never read. Processes never open the DuckDB file (DuckDB has one writer: the step).
- The plan lives under the data dir, keyed by the fingerprint of what is computed: a re-run after a crash
  finds the same plan (same pending items, same settings) and keeps the finished shards.
- After every process exited 0, the step checks that each planned shard file is there and readable with
  its planned row count, loads them all in one transaction (tidpo_core.store) and removes the folder.

As a process: ``python -m tidpo_core.runtime.precompute --plan <folder> --attempt <id>``, under `accelerate launch`
or alone; the rank and world size come from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE), defaulting to one process. Rank 0 reports progress to Dagster through Pipes when
Dagster launched it, and prints nothing otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.faults import Faults
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.launch import Launcher, LaunchSettings, ProcessFailed, ProcessRunner, run_module
from tidpo_core.runtime.layout import ShardDir

PRECOMPUTE_MODULE = "tidpo_core.runtime.precompute"
# The module of each kind of precompute; it defines `shard_worker(task) -> ShardWorker`.
WORKER_MODULES = {"anchors": "tidpo_core.steps.anchors", "weights": "tidpo_core.steps.weights"}
# Parquet key-value metadata of a shard file: which launch wrote it, with how many processes.
ATTEMPT_KEY = b"tidpo_attempt"
WORLD_SIZE_KEY = b"tidpo_world_size"


@dataclass(frozen=True)
class PrecomputeSettings:
    """How a precompute step runs: where its processes come from and how its work is cut."""

    launcher: Launcher = "in_process"
    """`in_process`: compute in the step's own process; `python`: one child process; `accelerate`:
    `accelerate launch` with the process count / config file below (data parallel: each process takes
    its share of the shards)."""
    num_processes: int | None = None
    """With `accelerate`: how many processes. None: the config file's count, or 1 without a file."""
    accelerate_config_file: str = ""
    """With `accelerate`: an accelerate config (multi-GPU, multi-node); empty: flags for one machine."""
    batches_per_shard: int = 8
    """Batches per shard: the unit a process computes and writes, and the most a crash loses. Shards are
    whole batches, so the results do not depend on the process count."""

    @property
    def launch(self) -> LaunchSettings:
        return LaunchSettings(self.launcher, self.num_processes, self.accelerate_config_file)


@dataclass(frozen=True)
class ShardPlan:
    """What the processes compute: written once per folder as plan.json, read by every process."""

    kind: str
    fingerprint: str
    task: dict[str, Any]
    """What the kind's worker needs (model paths, settings); JSON."""
    items: int
    shard_size: int
    items_digest: str
    """The pending items' keys: a plan for other items is another plan."""

    @property
    def shards(self) -> int:
        return -(-self.items // self.shard_size)

    def rows(self, index: int) -> int:
        return min(self.shard_size, self.items - index * self.shard_size)

    @classmethod
    def read(cls, folder: ShardDir) -> ShardPlan:
        return cls(**json.loads(folder.plan.read_text()))


@dataclass(frozen=True)
class ShardWorker:
    """A kind's computation with its models loaded once per process: items (a slice of the plan's items
    table) to result rows (one per item, in any order)."""

    compute: Callable[[pa.Table, bool], pa.Table]
    """(items, progress) -> rows."""
    models: tuple[Any, ...]
    """The torch models it runs (their size decides the thread count)."""


@dataclass(frozen=True)
class ShardOutcome:
    planned: int
    reused: int
    """Shards a previous, interrupted launch had finished."""
    computed: int
    processes: int
    """The process count of the launch that computed shards (0: it computed none)."""
    files: list[Path]
    folder: ShardDir


class PrecomputeFailed(RuntimeError):
    """A precompute process exited non-zero; the finished shards stay for the re-run."""


def shard_size(batch_size: int, batches_per_shard: int) -> int:
    if batch_size < 1 or batches_per_shard < 1:
        raise UserInputError(
            f"batch_size and batches_per_shard must be >= 1, got {batch_size} and {batches_per_shard}"
        )
    return batch_size * batches_per_shard


def make_plan(
    kind: str, fingerprint: str, task: Mapping[str, Any], keys: Sequence[Any], size: int
) -> ShardPlan:
    # The task as it reads back from plan.json (tuples become lists), so a plan compares equal to its file.
    return ShardPlan(
        kind, fingerprint, json.loads(json.dumps(dict(task))), len(keys), size, digest(list(keys), 32)
    )


def shards_for_rank(shards: int, rank: int, world_size: int) -> list[int]:
    """Rank r of N takes shards r, r + N, ...: every shard once, the ranks' shares within one of each other."""
    return list(range(rank, shards, world_size))


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, data: bytes, temporary: Path) -> None:
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _parquet_bytes(table: pa.Table, metadata: Mapping[bytes, bytes] | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def prepare_folder(folder: ShardDir, plan: ShardPlan, items: pa.Table) -> bool:
    """Make `folder` hold `plan` and its items; True when it already did (its finished shards are kept).

    A folder with another plan (the pending items or the settings changed since the crash) is emptied.
    Temporary files of killed processes are removed either way: no process of this data dir runs now.
    """
    if len(items) != plan.items:
        raise ValueError(f"plan of {plan.items} items given {len(items)} items")
    if folder.plan.exists():
        try:
            if ShardPlan.read(folder) == plan and folder.items.exists():
                for leftover in folder.temporaries():
                    leftover.unlink(missing_ok=True)
                return True
        except (ValueError, TypeError):  # an unreadable plan is replaced like a stale one
            pass
    shutil.rmtree(folder.root, ignore_errors=True)
    folder.root.mkdir(parents=True)
    _write_atomically(folder.items, _parquet_bytes(items), folder.root / ".items.tmp")
    # The plan last: its presence says the folder is complete.
    _write_atomically(
        folder.plan, json.dumps(dataclasses.asdict(plan), sort_keys=True).encode(), folder.root / ".plan.tmp"
    )
    return False


def finished_shards(folder: ShardDir, plan: ShardPlan) -> list[int]:
    return [index for index in range(plan.shards) if folder.shard(index).exists()]


def check_shards(folder: ShardDir, plan: ShardPlan) -> list[Path]:
    """Every planned shard's file, each checked readable with its planned row count; a missing or
    unreadable one is an error naming it (nothing has been loaded yet)."""
    files = []
    for index in range(plan.shards):
        path = folder.shard(index)
        if not path.exists():
            raise UserInputError(
                f"{plan.kind} precompute: shard file {path} is missing; nothing was loaded. Re-run to compute it.",
                shard=str(path),
            )
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise UserInputError(
                f"{plan.kind} precompute: shard file {path} is unreadable ({exc}); nothing was loaded. "
                "Delete it and re-run to compute it again.",
                shard=str(path),
            ) from None
        if rows != plan.rows(index):
            raise UserInputError(
                f"{plan.kind} precompute: shard file {path} holds {rows} rows, the plan {plan.rows(index)}; nothing "
                "was loaded. Delete it and re-run to compute it again.",
                shard=str(path),
            )
        files.append(path)
    return files


def _writers(files: Sequence[Path]) -> list[tuple[str, int]]:
    """(attempt, world size) that wrote each file (from its Parquet metadata)."""
    out = []
    for path in files:
        metadata = pq.ParquetFile(path).schema_arrow.metadata or {}
        out.append((metadata.get(ATTEMPT_KEY, b"").decode(), int(metadata.get(WORLD_SIZE_KEY, b"0"))))
    return out


def worker_for(plan: ShardPlan, device: str | None = None) -> ShardWorker:
    """The kind's worker with its models loaded (and moved to `device`; None: where they load, the CPU)."""
    if plan.kind not in WORKER_MODULES:
        raise ValueError(f"unknown precompute kind {plan.kind!r}; expected one of {sorted(WORKER_MODULES)}")
    worker = importlib.import_module(WORKER_MODULES[plan.kind]).shard_worker(plan.task)
    if device is not None:
        for model in worker.models:
            model.to(device)
    return worker


def rank_device(local_rank: int) -> str | None:
    """A launched process's device: its own GPU (by local rank) when GPUs are visible; None (the CPU) otherwise."""
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else None


ShardDone = Callable[[int, int, int], None]
"""Called after each shard this process wrote: (shard index, rows, shards finished in the folder)."""


def compute_shards(
    folder: ShardDir,
    rank: int,
    world_size: int,
    attempt: str,
    *,
    device: str | None = None,
    progress: bool = False,
    on_shard: ShardDone | None = None,
    faults: Faults | None = None,
) -> int:
    """Compute this rank's shards that have no file yet; returns how many it wrote. The models load only
    when there is work, on `device` (None: the CPU)."""
    plan = ShardPlan.read(folder)
    todo = [
        index for index in shards_for_rank(plan.shards, rank, world_size) if not folder.shard(index).exists()
    ]
    if not todo:
        return 0
    faults = Faults.from_env() if faults is None else faults
    kill_after = faults.kill_after_shards if faults.kill_rank in (None, rank) else None
    items = pq.read_table(folder.items)
    worker = worker_for(plan, device)
    metadata = {ATTEMPT_KEY: attempt.encode(), WORLD_SIZE_KEY: str(world_size).encode()}
    written = 0
    for index in todo:
        rows = worker.compute(items.slice(index * plan.shard_size, plan.rows(index)), progress)
        if len(rows) != plan.rows(index):
            raise RuntimeError(f"shard {index}: {len(rows)} result rows for {plan.rows(index)} items")
        data = _parquet_bytes(rows, metadata)
        temporary = folder.temporary(index, f"{os.getpid()}")
        if kill_after is not None and written == kill_after:
            _die_mid_write(temporary, data)
        _write_atomically(folder.shard(index), data, temporary)
        written += 1
        if on_shard is not None:
            on_shard(index, len(rows), len(finished_shards(folder, plan)))
    return written


def _die_mid_write(temporary: Path, data: bytes) -> None:
    """The planted crash (faults.kill_after_shards): half the shard on disk, then SIGKILL."""
    with open(temporary, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def run_sharded(
    folder: ShardDir,
    plan: ShardPlan,
    items: pa.Table,
    settings: PrecomputeSettings,
    *,
    run_process: ProcessRunner | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ShardOutcome:
    """Plan (or find the plan of an interrupted launch), compute the missing shards with the settings'
    launcher, and check every shard file. Loading them is the caller's (the store owns the tables)."""
    say = log or (lambda message: None)
    if prepare_folder(folder, plan, items):
        say(
            f"{plan.kind}: resuming the plan in {folder.root}: {len(finished_shards(folder, plan))} of {plan.shards} shards finished"
        )
    attempt = uuid.uuid4().hex
    if settings.launcher == "in_process":

        def shard_done(index: int, rows: int, finished: int) -> None:
            say(f"{plan.kind}: shard {index} written ({rows} rows); {finished}/{plan.shards} shards finished")

        compute_shards(folder, 0, 1, attempt, progress=progress, on_shard=shard_done)
    else:
        try:
            run_module(
                PRECOMPUTE_MODULE,
                ["--plan", str(folder.root), "--attempt", attempt],
                settings.launch,
                run_process,
            )
        except ProcessFailed as exc:
            finished = len(finished_shards(folder, plan))
            raise PrecomputeFailed(
                f"{plan.kind} precompute: a process failed ({exc.args[0]}); {finished} of {plan.shards} shards are "
                f"finished and kept in {folder.root}: re-run to compute the rest. Nothing was loaded."
            ) from exc
    files = check_shards(folder, plan)
    writers = _writers(files)
    computed = [size for written_by, size in writers if written_by == attempt]
    return ShardOutcome(
        plan.shards, len(files) - len(computed), len(computed), max(computed, default=0), files, folder
    )


def remove_folder(folder: ShardDir) -> None:
    """After the load: the shards are in DuckDB; the folder (and the precompute/<kind> above it, if empty) goes."""
    shutil.rmtree(folder.root, ignore_errors=True)
    for parent in (folder.root.parent, folder.root.parent.parent):
        try:
            parent.rmdir()
        except OSError:  # not empty: another fingerprint's plan is waiting there
            break


def data_dir_of(con: Any) -> Path:
    """The folder of the DuckDB file `con` has open: the data dir, for callers that give no layout."""
    row = con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    if row is None or not row[0]:
        raise ValueError(
            "a sharded precompute needs a DuckDB file (its data dir holds the shards); got an in-memory database"
        )
    return Path(row[0]).resolve().parent


# --- the process --------------------------------------------------------------------------------------


def rank_from_env(environ: Mapping[str, str]) -> tuple[int, int, int, int]:
    """(rank, world size, rank on this machine, processes on this machine) as torchrun / accelerate set
    them; one process without."""
    world = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    return (
        rank,
        world,
        int(environ.get("LOCAL_RANK", str(rank))),
        int(environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


class PipesProgress:
    """Rank 0's progress reports to Dagster Pipes, when Dagster launched the process; silent otherwise."""

    def __init__(self, rank: int, plan: ShardPlan):
        self.plan = plan
        self._context_manager = None
        self._pipes = None
        if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._context_manager = open_dagster_pipes()
            self._pipes = self._context_manager.__enter__()

    def shard_done(self, index: int, rows: int, finished: int) -> None:
        if self._pipes is None:
            return
        self._pipes.log.info(
            f"{self.plan.kind}: shard {index} written ({rows} rows); {finished}/{self.plan.shards} shards finished"
        )
        self._pipes.report_custom_message(
            {
                "kind": self.plan.kind,
                "shard": index,
                "rows": rows,
                "shards_finished": finished,
                "shards": self.plan.shards,
            }
        )

    def close(self, exc: BaseException | None = None) -> None:
        if self._context_manager is None:
            return
        context_manager, self._context_manager, self._pipes = self._context_manager, None, None
        if exc is None:
            context_manager.__exit__(None, None, None)
        else:
            context_manager.__exit__(type(exc), exc, exc.__traceback__)


def _no_progress_bars() -> None:
    """A process's output is its shards and its Pipes messages: no library progress bar per model load
    and per process on the terminal (the in-process step keeps them, as before)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compute this process's shards of a precompute plan (anchors, token weights)."
    )
    parser.add_argument(
        "--plan", required=True, help="the plan's folder (<data dir>/precompute/<kind>/<fingerprint>)"
    )
    parser.add_argument(
        "--attempt", default="", help="an id of this launch, recorded in each shard it writes"
    )
    args = parser.parse_args(argv)
    folder = ShardDir(Path(args.plan))
    rank, world_size, local_rank, _ = rank_from_env(os.environ)
    _no_progress_bars()
    reporter = PipesProgress(rank, ShardPlan.read(folder))
    try:
        compute_shards(
            folder,
            rank,
            world_size,
            args.attempt,
            device=rank_device(local_rank),
            on_shard=reporter.shard_done,
        )
    except BaseException as exc:
        reporter.close(exc)
        raise
    reporter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
