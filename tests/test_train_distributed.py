"""Two-process DDP on CPU (gloo) through `accelerate launch` equals one process with twice the gradient
accumulation, step by step; a NaN on one process stops both, with a checkpoint.

Why the two runs see the same data: accelerate's seedable sampler draws one permutation per epoch from
(seed, epoch) on every process; with 2 processes batch k of that order goes to process k % 2, so
optimizer step s all-reduces batches {2s, 2s+1}. One process with accumulation 2 walks the same
permutation and accumulates batches {2s, 2s+1} into step s. Losses are means over each batch's pairs,
and both DDP (averaging gradients over processes) and accumulation (dividing each loss by 2) average
the two batch gradients: identical updates, up to float summation order. The learning-rate schedule
is stepped once per optimizer step in both (not accelerate's prepared scheduler, which would step
num_processes times).

Launcher: `accelerate launch --cpu --num_processes 2` selects accelerate's simple launcher, which starts
one process unless mpirun is used; `--multi_gpu` uses torchrun, and the engine falls back to CPU/gloo
when no GPU is visible. So the CPU two-process command is `accelerate launch --multi_gpu --num_processes 2`.
"""

import json
import socket
import sys

import pytest
import torch
from train_fixtures import ROOT, build_tiny_data, load_weights, run_engine, single_thread

from tidpo_core.runtime.faults import planted
from tidpo_core.training import complete_checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_2(config_file: str | None = None) -> list[str]:
    """`accelerate launch` with 2 processes: from flags, or from a sample config with the count overridden."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        launch += ["--config_file", str(ROOT / config_file)]
    else:
        launch += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    return [
        *launch,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 24 pairs, batch 2: 12 batches, so 6 on each of 2 processes and 6 steps with accumulation 2.
    with single_thread():
        return build_tiny_data(tmp_path_factory.mktemp("tiny_ddp"), pairs=24)


def _history(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    """An uninterrupted 2-process run, launched from the sample DDP config."""
    run_dir = tmp_path_factory.mktemp("ddp_uninterrupted") / "ddp"
    ddp = tiny.config(run_dir, per_device_batch_size=2, checkpoint_every=3)
    result = run_engine(
        ddp.to_yaml(run_dir.parent / "ddp.yaml"), launcher=launch_2("configs/accelerate/multi_gpu_ddp.yaml")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) [MULTI_CPU]" in result.stderr
    return run_dir


def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(tiny, ddp_run, tmp_path):

    single = tiny.config(tmp_path / "one", per_device_batch_size=2, gradient_accumulation_steps=2)
    result = run_engine(single.to_yaml(tmp_path / "one.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _history(ddp_run), _history(tmp_path / "one")
    assert a["num_processes"] == 2 and b["num_processes"] == 1
    assert a["steps"] == b["steps"] == 6
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["learning_rate"] == y["learning_rate"]
        assert x["num_tokens"] == y["num_tokens"]  # the same batches were seen
        for key in ("loss", "rewards/margins", "logps/chosen", "triplet", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]
    wa, wb = load_weights(ddp_run / "final"), load_weights(tmp_path / "one" / "final")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name
    # DDP checkpoints hold one RNG state file per process.
    ((_, path),) = complete_checkpoints(ddp_run / "checkpoints")
    assert {p.name for p in path.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


def test_a_nan_on_one_process_stops_both_with_a_checkpoint(tiny, tmp_path):
    # The hook poisons the loss on the last process only: the main process must stop too (no hang).
    config = tiny.config(tmp_path / "run", per_device_batch_size=2)
    with planted(nan_at_step=2):
        result = run_engine(config.to_yaml(tmp_path / "run.yaml"), launcher=launch_2(), timeout=180)
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and "optimizer step 2" in result.stderr
    assert "process 1: loss nan" in result.stderr
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_ddp_stopped_by_a_signal_on_one_process_resumes_to_the_uninterrupted_weights(tiny, ddp_run, tmp_path):
    # SIGTERM reaches only the main process here: the stop is collective, so process 1 checkpoints and
    # stops at the same step instead of hanging in the next all-reduce.
    stopped = tiny.config(tmp_path / "run", per_device_batch_size=2, checkpoint_every=3)
    with planted(sigterm_at_step=2):
        result = run_engine(stopped.to_yaml(tmp_path / "run.yaml"), launcher=launch_2(), timeout=180)
    assert result.returncode != 0
    assert "stopped by SIGTERM after optimizer step 2 of 6" in result.stderr
    assert "stopped by a signal on another process after optimizer step 2" in result.stderr
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [2]

    resumed = tiny.config(tmp_path / "run", per_device_batch_size=2, checkpoint_every=3)
    result = run_engine(resumed.to_yaml(tmp_path / "run.yaml"), launcher=launch_2(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    summary, expected = _history(tmp_path / "run"), _history(ddp_run)
    assert summary["steps"] == 6 and summary["steps_this_run"] == 4
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in expected["history"]]
    wa, wb = load_weights(ddp_run / "final"), load_weights(tmp_path / "run" / "final")
    assert all(torch.equal(wa[name], wb[name]) for name in wa)
