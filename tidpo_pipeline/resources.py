"""Dagster resources: where state lives (data dir, DuckDB, MLflow) and the quality policy."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from tidpo_core import store, tracking

DEFAULT_DATA_DIR = ".tidpo"


def default_data_dir() -> str:
    return os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR)


class TidpoStorage(dg.ConfigurableResource):
    """The one data directory: DuckDB file, MLflow store, model folders, inbox for new data files."""

    data_dir: str = Field(default_factory=default_data_dir, description="Root of all tidpo state")

    @property
    def root(self) -> Path:
        path = Path(self.data_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def duckdb_path(self) -> Path:
        return self.root / "tidpo.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def inbox_dir(self) -> Path:
        path = self.root / "inbox"
        path.mkdir(parents=True, exist_ok=True)
        return path


LOCK_FILE = ".lock"


class DataDirBusyError(RuntimeError):
    """Another process holds the data directory's run lock."""


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]


class DataDirLock:
    """The data directory's run lock: an exclusive `flock` on <data_dir>/.lock.

    DuckDB allows one writing process per file, and a run's steps read what earlier steps wrote, so
    one run at a time owns the data directory. The holder writes its PID, host, Dagster run and start
    time into the file, so a refused run can say who holds it. The kernel drops the lock when the
    holder dies (even by SIGKILL): a crashed run never leaves a stale lock behind.

    Re-entrant within a process (Dagster may set resources up more than once in one process); other
    processes either fail fast (`timeout_s=0`, the default) or wait up to `timeout_s` seconds.
    """

    _held: dict[str, list[Any]] = {}  # lock path -> [fd, depth], per process

    def __init__(self, data_dir: str | Path, holder: dict[str, Any] | None = None, timeout_s: float = 0.0):
        self.data_dir = Path(data_dir).resolve()
        self.path = self.data_dir / LOCK_FILE
        self.holder = holder or {}
        self.timeout_s = timeout_s

    def holder_info(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy_message(self) -> str:
        info = self.holder_info()
        who = f"PID {info.get('pid', '?')} on {info.get('host', '?')}"
        if info.get("run_id"):
            who += f", Dagster run {info['run_id']}"
        if info.get("job"):
            who += f" ({info['job']})"
        if info.get("since"):
            who += f", since {info['since']}"
        waited = f" after waiting {self.timeout_s:g} s" if self.timeout_s > 0 else ""
        return (
            f"data dir {self.data_dir} is in use by another tidpo run ({who}){waited}. DuckDB allows one "
            "writing process, so this run stops before touching anything: run it again when that one has "
            "finished, or set the duckdb resource's lock_timeout_s to wait for it."
        )

    def acquire(self) -> DataDirLock:
        if fcntl is None:
            return self
        key = str(self.path)
        if key in self._held:
            self._held[key][1] += 1
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise DataDirBusyError(self._busy_message()) from None
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            **self.holder,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._held[key] = [fd, 1]
        return self

    def release(self) -> None:
        if fcntl is None:
            return
        entry = self._held.get(str(self.path))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[str(self.path)]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# Run as `python -c BIND_TO_PARENT <parent pid> <command...>`: ask the kernel to SIGKILL this process
# when its parent dies, then become the command. A training process must not outlive the step that
# holds the data dir's lock: if the step is killed, its trainer goes with it instead of writing
# checkpoints beside the re-run's trainer.
_BIND_TO_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent died before the training process started")
os.execv(sys.argv[2], sys.argv[2:])
"""


def bind_to_parent(command: Sequence[str]) -> list[str]:
    """`command`, wrapped so that it dies with the calling process (Linux; elsewhere a plain exec)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _BIND_TO_PARENT, str(os.getpid()), *command]


class TidpoDuckDB(DuckDBResource):
    """dagster-duckdb's resource, plus the tidpo schema on every connection and the data dir's run lock.

    The lock is taken when Dagster sets the resource up and released at teardown: for the whole run
    under the in-process executor (`dagster.materialize`, `make run`), for each step under the
    multiprocess one (`dagster dev`, where the run queue keeps runs one at a time anyway).
    """

    lock_timeout_s: float = Field(
        default=0.0, description="Seconds to wait for another run's lock on the data dir; 0 fails fast"
    )
    _lock: DataDirLock | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.database == ":memory:":
            return
        run = context.run
        holder = {"run_id": run.run_id, "job": run.job_name} if run is not None else {}
        self._lock = DataDirLock(Path(self.database).parent, holder, self.lock_timeout_s).acquire()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        config = {"custom_user_agent": "dagster", **self.connection_config}
        # Opened here rather than through DuckDBResource.get_connection, which retries a locked file
        # for minutes and leaves the connection (and DuckDB's file lock) open when the body raises.
        con = duckdb.connect(self.database, read_only=False, config=config)
        try:
            store.ensure_schema(con)
            yield con
        finally:
            con.close()


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking: sqlite in the data dir by default (the registry needs a database), artifacts
    beside it, never ./mlruns."""

    tracking_uri: str = Field(default="", description="Empty: sqlite:///<data_dir>/mlflow.db")
    data_dir: str = Field(default_factory=default_data_dir)
    experiment: str = tracking.EXPERIMENT
    registered_model: str = tracking.REGISTERED_MODEL

    @property
    def uri(self) -> str:
        return self.tracking_uri or tracking.sqlite_tracking_uri(self.data_dir)

    def experiment_id(self) -> str:
        tracking.check_tracking(self.uri)
        artifacts = None if self.tracking_uri else tracking.artifact_root(self.data_dir)
        return tracking.ensure_experiment(self.uri, artifacts, self.experiment)


class QualityPolicy(dg.ConfigurableResource):
    """Thresholds of the asset checks and of the evaluation gate that guards the champion alias."""

    max_quarantine_share: float = 0.2
    gate_metric: str = "likelihood_win_rate"
    gate_margin: float = 0.0
    weight_mean_tolerance: float = 1e-3


def build_resources(data_dir: str | None = None) -> dict[str, object]:
    data_dir = data_dir or default_data_dir()
    storage = TidpoStorage(data_dir=data_dir)
    return {
        "storage": storage,
        "duckdb": TidpoDuckDB(database=str(Path(data_dir).resolve() / "tidpo.duckdb")),
        "mlflow_tracking": MlflowTracking(data_dir=data_dir),
        "quality": QualityPolicy(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
