"""The data directory's run lock: one run at a time owns a data dir (DuckDB allows one writing process per
file, and a run's steps read what its earlier steps wrote). Plain POSIX file locks, no Dagster: the Dagster
resource that opens DuckDB takes it, and so could any other runner."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tidpo_core.runtime.layout import LOCK_FILE, RUNS_DIR


class DataDirBusyError(RuntimeError):
    """Another run holds the data directory."""


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]


def _start_time(pid: int) -> str | None:
    """A process's start time (Linux), to tell a live process from a later one that reused its PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _start_time(pid) in (None, started)


class DataDirLock:
    """The data directory's run lock: one Dagster run at a time owns <data_dir>.

    DuckDB allows one writing process per file, and a run's steps read what its earlier steps wrote, so
    two runs must not interleave. Each process working for a run holds a shared `flock` on
    <data_dir>/.lock.d/<run_id>.lock, so the steps of one run (which the multiprocess executor runs
    side by side) share it, while a step of another run fails fast, or waits up to `timeout_s`, with a
    message naming the holder's run, PID and host. The kernel drops a flock when its process dies, even
    by SIGKILL, so a crashed run leaves no stale lock. Under the multiprocess executor the run also
    counts as alive while its run process (the parent of the step processes) lives, which covers the
    moments between two steps.

    Re-entrant within a process: Dagster may set resources up more than once in one process.
    """

    _held: dict[str, list[Any]] = {}  # data dir -> [run id, fd, depth], per process

    def __init__(self, data_dir: str | Path, holder: dict[str, Any] | None = None, timeout_s: float = 0.0):
        self.data_dir = Path(data_dir).resolve()
        self.holder = dict(holder or {})
        self.run_id = str(self.holder.get("run_id") or f"pid-{os.getpid()}")
        self.timeout_s = timeout_s

    @property
    def _runs(self) -> Path:
        return self.data_dir / RUNS_DIR

    def _run_file(self, run_id: str) -> Path:
        return self._runs / ("".join(c if c.isalnum() or c in "-_" else "_" for c in run_id) + ".lock")

    @contextmanager
    def _mutex(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held only around a few file operations
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _alive(self, path: Path, info: dict[str, Any]) -> bool:
        """Whether the run of a run file is still going (call with the mutex held)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # one of its processes holds it
        finally:
            os.close(fd)
        if info.get("host") not in (None, socket.gethostname()):
            return True  # another machine's run: its processes cannot be checked from here
        run_pid = info.get("run_pid")
        return bool(run_pid) and _process_alive(int(run_pid), info.get("run_pid_started"))

    def holders(self) -> list[dict[str, Any]]:
        """The runs holding the data dir now (this process's own run included)."""
        if fcntl is None or not self._runs.exists():
            return []
        with self._mutex():
            return [self._read(p) for p in sorted(self._runs.glob("*.lock")) if self._alive(p, self._read(p))]

    def holder_info(self) -> dict[str, Any]:
        held = self.holders()
        return held[0] if held else {}

    def _busy_message(self, info: dict[str, Any]) -> str:
        who = f"Dagster run {info.get('run_id', '?')}"
        if info.get("job"):
            who += f" ({info['job']})"
        who += f", PID {info.get('pid', '?')} on {info.get('host', '?')}"
        if info.get("run_pid"):
            who += f", run process PID {info['run_pid']}"
        if info.get("since"):
            who += f", since {info['since']}"
        waited = f" after waiting {self.timeout_s:g} s" if self.timeout_s > 0 else ""
        return (
            f"data dir {self.data_dir} is in use by another tidpo run ({who}){waited}. DuckDB allows one "
            "writing process and a run's steps build on each other, so this run stops before touching "
            "anything: run it again when that one has finished, or set the duckdb resource's "
            "lock_timeout_s to wait for it."
        )

    def _try_acquire(self) -> dict[str, Any] | None:
        """Take the hold, or return the info of the run that has it."""
        with self._mutex():
            self._runs.mkdir(exist_ok=True)
            mine = self._run_file(self.run_id)
            for path in self._runs.glob("*.lock"):
                if path == mine:
                    continue
                info = self._read(path)
                if self._alive(path, info):
                    return info
                path.unlink(missing_ok=True)  # a finished or crashed run's file
            fd = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_size == 0:
                parent = multiprocessing.parent_process()  # the run process of a multiprocess executor
                info = {
                    **self.holder,
                    "run_id": self.run_id,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.now(UTC).isoformat(timespec="seconds"),
                    "run_pid": parent.pid if parent is not None else None,
                    "run_pid_started": _start_time(parent.pid) if parent is not None and parent.pid else None,
                }
                os.pwrite(fd, json.dumps(info).encode(), 0)
            self._held[str(self.data_dir)] = [self.run_id, fd, 1]
            return None

    def acquire(self) -> DataDirLock:
        if fcntl is None:
            return self
        held = self._held.get(str(self.data_dir))
        if held is not None:
            if held[0] != self.run_id:
                raise DataDirBusyError(
                    self._busy_message({"run_id": held[0], "pid": os.getpid(), "host": socket.gethostname()})
                )
            held[2] += 1
            return self
        deadline = time.monotonic() + self.timeout_s
        while True:
            busy = self._try_acquire()
            if busy is None:
                return self
            if time.monotonic() >= deadline:
                raise DataDirBusyError(self._busy_message(busy))
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))

    def release(self) -> None:
        if fcntl is None:
            return
        held = self._held.get(str(self.data_dir))
        if held is None or held[0] != self.run_id:
            return
        held[2] -= 1
        if held[2] > 0:
            return
        del self._held[str(self.data_dir)]
        fd = held[1]
        with self._mutex():
            path = self._run_file(self.run_id)
            info = self._read(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            # The last process of an in-process run removes its file; a multiprocess run's file stays
            # while its run process lives (the next run removes it once that process is gone).
            if not info.get("run_pid") and not self._alive(path, {}):
                path.unlink(missing_ok=True)

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
