"""Starting the training engine and the sharded precompute: in this process, as one child process, or
through `accelerate launch`.

The one place that knows a module's command line under each launcher, accelerate's flags, the
rendezvous port, how a child is bound to its parent and what the engine reads from its run folder. The
Dagster assets hand the commands and environment built here to Dagster Pipes; the method comparison and
scripts call :func:`run_training`, the precompute steps :func:`run_module`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tidpo_core.runtime.layout import RunDir
from tidpo_core.runtime.offline import offline_child_environment
from tidpo_core.runtime.threads import thread_environment

Launcher = Literal["in_process", "python", "accelerate"]
ENGINE_MODULE = "tidpo_core.training"

ProcessRunner = Callable[[list[str], dict[str, str]], dict[str, Any]]
"""Runs a command with an environment and returns what the process reported (metadata); raises
ProcessFailed when it exits non-zero. `run_subprocess` without Dagster, Dagster Pipes in the assets."""


@dataclass(frozen=True)
class LaunchSettings:
    launcher: Launcher = "python"
    """`in_process`: call the engine here (no process start-up; one process only); `python`: one child
    process; `accelerate`: `accelerate launch` with the config file and process count below."""
    num_processes: int | None = None
    """With `accelerate`: how many processes. None: the config file's count, or 1 without a file."""
    accelerate_config_file: str = ""
    """With `accelerate`: an accelerate config (FSDP, DeepSpeed, multi-node); empty: flags for one machine."""


class ProcessFailed(RuntimeError):
    """A launched training process exited non-zero (what a process runner raises)."""


class TrainingFailed(RuntimeError):
    """The training process exited non-zero; the message is the reason it recorded."""

    def __init__(
        self, reason: str, run_dir: Path, returncode: int | None = None, mlflow_run_id: str | None = None
    ):
        super().__init__(reason)
        self.reason = reason
        self.run_dir = run_dir
        self.returncode = returncode
        self.mlflow_run_id = mlflow_run_id


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerate_prefix(settings: LaunchSettings, gpu_available: bool | None = None) -> list[str]:
    """`python -m accelerate.commands.launch ...` up to the script: what the settings ask for."""
    gpu = _gpu_available() if gpu_available is None else gpu_available
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config_file:
        launch += ["--config_file", settings.accelerate_config_file]
        if settings.num_processes is not None:
            launch += ["--num_processes", str(settings.num_processes)]
        return [*launch, "--main_process_port", str(free_port())]
    processes = settings.num_processes or 1
    launch += ["--num_processes", str(processes), "--num_machines", "1", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]  # two runs at once must not share 29500
    if not gpu:
        launch += ["--mixed_precision", "no"]
    if processes > 1:
        # torchrun; the engine falls back to CPU + gloo itself when no GPU is visible (`--cpu` would make
        # accelerate start a single process whatever num_processes says).
        launch += ["--multi_gpu"]
    elif not gpu:
        launch += ["--cpu"]
    return launch


def module_command(
    module: str, arguments: Sequence[str], settings: LaunchSettings, gpu_available: bool | None = None
) -> list[str]:
    """`python -m module arguments...` under the settings' launcher (one child, or accelerate's processes)."""
    invocation = ["-m", module, *arguments]
    if settings.launcher == "accelerate":
        return [*accelerate_prefix(settings, gpu_available), *invocation]
    if settings.launcher == "python":
        return [sys.executable, *invocation]
    raise ValueError(f"launcher {settings.launcher!r} starts no process")


def training_command(
    config_path: str | Path, settings: LaunchSettings, gpu_available: bool | None = None
) -> list[str]:
    """The engine's command line for a TrainConfig YAML file."""
    return module_command(ENGINE_MODULE, ["--config", str(config_path)], settings, gpu_available)


def run_module(
    module: str,
    arguments: Sequence[str],
    settings: LaunchSettings,
    run_process: ProcessRunner | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Launch `module` with `arguments` as the settings say (bound to this process, offline, under the
    thread plan) and wait for it; returns what `run_process` (default: a plain subprocess) reports."""
    command = bind_to_parent(module_command(module, arguments, settings))
    return (run_process or run_subprocess)(command, {**training_env(), **(env or {})})


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


def training_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: no hub access, no MLflow telemetry, and the thread plan's variables
    (OpenMP reads them when torch loads; the child sizes torch's threads for its model once loaded)."""
    env = thread_environment(None, os.environ if base is None else base)
    return offline_child_environment(env)


def process_command(config: Any, settings: LaunchSettings) -> list[str]:
    """Write `config` (a TrainConfig) into its run folder and return the bound command that trains it."""
    path = config.to_yaml(RunDir(Path(config.output_dir)).train_config)
    return bind_to_parent(training_command(path, settings))


def failure_reason(run_dir: str | Path) -> str:
    failure = RunDir(Path(run_dir)).failure
    return failure.read_text() if failure.exists() else "no reason recorded; see the training process's log"


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads(RunDir(Path(run_dir)).summary.read_text())


def run_training(
    config: Any, settings: LaunchSettings = LaunchSettings(launcher="in_process")
) -> dict[str, Any]:
    """Train `config` (a TrainConfig) and return its summary (what summary.json holds).

    A child process's failure raises TrainingFailed with the reason the engine recorded; in process, the
    engine's own exception propagates.
    """
    if settings.launcher == "in_process":
        from tidpo_core.training import train

        return asdict(train(config))
    try:
        run_subprocess(process_command(config, settings), training_env())
    except ProcessFailed as exc:
        raise TrainingFailed(failure_reason(config.output_dir), Path(config.output_dir), exc.args[1]) from exc
    return read_summary(config.output_dir)


def run_subprocess(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """A process runner without Dagster: the child's output goes to this process's; reports nothing."""
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise ProcessFailed(f"{command[0]} exited {done.returncode}", done.returncode)
    return {}
