"""Training through tidpo_core.training for the benchmarks: a TrainConfig for prepared data, and a run
timed per optimizer step (wall and process CPU time)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.preparation import Prepared


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
    """An epoch's seconds from its step intervals: the first step, which has no start stamp, counted at
    the mean of the others."""
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
