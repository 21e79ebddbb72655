"""The sandbox that runs model-written code (HumanEval): each program in its own limited subprocess."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: Literal["passed", "failed", "timeout"]
    detail: str = ""


def run_python_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` in a fresh `python -I -S` subprocess; passed means it exited 0 within the limits.

    The child gets an empty temporary working directory, a minimal environment, no stdin, its own
    process group (killed whole on timeout), and rlimits on address space, CPU time, file size and
    core dumps. This contains accidents and runaway code; it is not a security boundary against
    hostile code (no network or filesystem isolation beyond that): run untrusted models' code in a
    container.
    """
    with tempfile.TemporaryDirectory(prefix="tidpo-sandbox-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(program, encoding="utf-8")
        memory = int(memory_mb) * 1024 * 1024
        cpu = max(1, math.ceil(timeout_s)) + 1

        def limit() -> None:  # runs in the child between fork and exec
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(script)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limit if os.name == "posix" else None,  # noqa: PLW1509 - needed for the rlimits
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.communicate()
            return SandboxResult(False, "timeout", f"no result within {timeout_s} s")
    if process.returncode == 0:
        return SandboxResult(True, "passed")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] if stderr else []
    return SandboxResult(False, "failed", tail[0][:300] if tail else f"exit code {process.returncode}")
