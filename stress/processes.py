"""The parent side of a stress run: spawning worker subprocesses, watching their output, killing them,
and finding the training processes they leave."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stress.config import RESULT, ROOT


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

    def close_log(self) -> None:
        self._log.close()

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
        return {
            "success": False,
            "errors": [f"exit {self.popen.returncode} without a result: {tail}"],
            "checks": {},
        }

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def spawn(
    data_dir: Path, config: dict[str, Any], logs: Path, name: str, select: str = "all", **options: Any
) -> Worker:
    """`python -m stress.run worker` on `data_dir`; each option becomes its --flag (True: the bare flag)."""
    command = [
        sys.executable,
        "-m",
        "stress.run",
        "worker",
        "--data-dir",
        str(data_dir),
        "--config",
        json.dumps(config),
    ]
    command += ["--select", select]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value not in (None, False):
            command += [flag, str(value)]
    logs.mkdir(parents=True, exist_ok=True)
    return Worker(command, logs / f"{name}.log")


def run_worker(
    data_dir: Path, config: dict[str, Any], logs: Path, name: str, **options: Any
) -> dict[str, Any]:
    return spawn(data_dir, config, logs, name, **options).finish()


def dagster_cli(home: Path, data_dir: Path) -> tuple[str, dict[str, str]]:
    """The `dagster` executable beside this Python, and the environment of a CLI run on `data_dir` with an
    instance of its own in `home` (a copy of dagster_home/dagster.yaml)."""
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "TIDPO_DATA_DIR": str(data_dir)}
    return str(Path(sys.executable).parent / "dagster"), env


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


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


def parent_pid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().split(") ", 1)[1].split()[1])
