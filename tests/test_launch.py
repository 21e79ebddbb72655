"""The launcher: the engine's command line for each launcher, and a failed child's reason."""

import subprocess
import sys
from pathlib import Path

import pytest

from tidpo_core.runtime.launch import (
    ENGINE_MODULE,
    LaunchSettings,
    ProcessFailed,
    TrainingFailed,
    bind_to_parent,
    module_command,
    run_module,
    run_training,
    training_command,
    training_env,
)
from tidpo_core.training import TrainConfig


def _flags(command: list[str]) -> dict[str, str | None]:
    """`--name value` and bare `--name` flags of an accelerate command, up to the engine module."""
    head = command[: command.index("-m", 3)]
    flags: dict[str, str | None] = {}
    for index, word in enumerate(head):
        if word.startswith("--"):
            following = head[index + 1] if index + 1 < len(head) else None
            flags[word] = None if following is None or following.startswith("--") else following
    return flags


def test_python_launcher_runs_the_engine_module_in_one_process():
    command = training_command("run.yaml", LaunchSettings("python"))
    assert command == [sys.executable, "-m", ENGINE_MODULE, "--config", "run.yaml"]


def test_accelerate_on_cpu_one_process_uses_the_cpu_launcher_without_mixed_precision():
    command = training_command("run.yaml", LaunchSettings("accelerate"), gpu_available=False)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-4:] == ["-m", ENGINE_MODULE, "--config", "run.yaml"]
    flags = _flags(command)
    assert flags["--num_processes"] == "1" and "--cpu" in flags and flags["--mixed_precision"] == "no"
    assert "--multi_gpu" not in flags
    assert int(flags["--main_process_port"]) > 0


def test_accelerate_with_several_processes_uses_torchrun_even_without_a_gpu():
    # `--cpu` would make accelerate start ONE process whatever num_processes says.
    flags = _flags(
        training_command("run.yaml", LaunchSettings("accelerate", num_processes=2), gpu_available=False)
    )
    assert flags["--num_processes"] == "2" and "--multi_gpu" in flags and "--cpu" not in flags


def test_accelerate_on_a_gpu_leaves_mixed_precision_to_the_engine():
    flags = _flags(training_command("run.yaml", LaunchSettings("accelerate"), gpu_available=True))
    assert "--mixed_precision" not in flags and "--cpu" not in flags


def test_a_config_file_keeps_its_process_count_unless_one_is_given():
    from_file = _flags(
        training_command("run.yaml", LaunchSettings("accelerate", None, "fsdp.yaml"), gpu_available=True)
    )
    assert from_file["--config_file"] == "fsdp.yaml" and "--num_processes" not in from_file
    overridden = _flags(
        training_command("run.yaml", LaunchSettings("accelerate", 1, "fsdp.yaml"), gpu_available=True)
    )
    assert overridden["--num_processes"] == "1"


def test_two_commands_get_different_rendezvous_ports():
    ports = {
        _flags(training_command("r.yaml", LaunchSettings("accelerate"), gpu_available=False))[
            "--main_process_port"
        ]
        for _ in range(5)
    }
    assert len(ports) > 1


def test_in_process_starts_no_process():
    with pytest.raises(ValueError, match="starts no process"):
        training_command("run.yaml", LaunchSettings("in_process"))


def test_bound_command_still_runs_the_command():
    done = subprocess.run(
        bind_to_parent([sys.executable, "-c", "print('bound')"]), capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "bound"


def test_child_environment_is_offline():
    env = training_env({"PATH": "/bin", "HF_HUB_OFFLINE": "0"})
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"


def test_a_failed_child_raises_with_the_reason_the_engine_recorded(tmp_path: Path):
    config = TrainConfig(
        duckdb_path=str(tmp_path / "none.duckdb"),
        reference_model_path=str(tmp_path / "no_model"),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(TrainingFailed) as failed:
        run_training(config, LaunchSettings("python"))
    assert failed.value.returncode != 0
    assert failed.value.run_dir == tmp_path / "run"
    assert "no_model" in failed.value.reason or "none.duckdb" in failed.value.reason, failed.value.reason
    assert (tmp_path / "run" / "train.yaml").exists()


def test_any_module_launches_with_the_engine_s_flags():
    """The precompute's processes start like the engine's: one launcher, one set of accelerate flags."""
    settings = LaunchSettings("accelerate", num_processes=2)
    command = module_command("tidpo_core.runtime.precompute", ["--plan", "p"], settings, gpu_available=False)
    assert command[-4:] == ["-m", "tidpo_core.runtime.precompute", "--plan", "p"]
    engine = training_command("run.yaml", settings, gpu_available=False)
    assert {k: v for k, v in _flags(command).items() if k != "--main_process_port"} == {
        k: v for k, v in _flags(engine).items() if k != "--main_process_port"
    }
    assert module_command("json.tool", ["--help"], LaunchSettings("python")) == [
        sys.executable,
        "-m",
        "json.tool",
        "--help",
    ]
    with pytest.raises(ValueError, match="starts no process"):
        module_command("json.tool", [], LaunchSettings("in_process"))


def test_run_module_waits_for_the_child_and_reports_its_failure(tmp_path: Path):
    seen: list[dict[str, str]] = []

    def runner(command: list[str], env: dict[str, str]) -> dict[str, str]:
        seen.append(env)
        return {"ran": " ".join(command[-2:])}

    assert run_module("json.tool", ["--help"], LaunchSettings("python"), runner, env={"EXTRA": "1"}) == {
        "ran": "json.tool --help"
    }
    assert seen[0]["EXTRA"] == "1" and seen[0]["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ProcessFailed):
        run_module("json.tool", [str(tmp_path / "missing.json")], LaunchSettings("python"))
