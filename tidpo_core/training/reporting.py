"""Where a run's results go: the summary it returns, step metrics (MLflow, Dagster Pipes), log lines."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidpo_core.training.config import TrainConfig


@dataclass
class TrainSummary:
    steps: int
    epochs_completed: int
    final_model_path: str
    first_loss: float
    last_loss: float
    resumed_from: str | None
    tokens_per_second: float
    seconds: float
    history: list[dict[str, float]]
    steps_this_run: int = 0
    num_processes: int = 1
    distributed_type: str = "NO"
    mixed_precision: str = "no"
    trainable_parameters: int = 0
    total_parameters: int = 0
    peak_rss_mb: float = 0.0
    torch_threads: int = 0
    """Intra-op threads the run's policy gave it (tidpo_core.runtime.threads): the most it used; fewer while other
    processes kept the CPUs busy."""
    timings: dict[str, float] = field(default_factory=dict)


class Reporter:
    """Where step metrics go: MLflow (main process only), Dagster Pipes when launched by Dagster."""

    def __init__(self, config: TrainConfig, is_main: bool):
        self.is_main = is_main
        self._pipes = None
        self._pipes_cm = None
        self._mlflow = None
        if not is_main:
            return
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self._pipes = self._pipes_cm.__enter__()
        if config.mlflow_tracking_uri and config.mlflow_run_id:
            from tidpo_core.runtime.tracking import AsyncMetricLogger

            self._mlflow = AsyncMetricLogger(config.mlflow_tracking_uri, config.mlflow_run_id)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self._pipes is not None:
            self._pipes.log.info(message)
        print(message, file=sys.stderr, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self._mlflow is not None:
            self._mlflow.log(step, values)

    def flush(self) -> None:
        """Wait until every logged metric is stored (before the process reports success or failure)."""
        if self._mlflow is not None:
            self._mlflow.flush()

    def custom(self, payload: dict[str, Any]) -> None:
        if self._pipes is not None:
            self._pipes.report_custom_message(payload)

    def close(self, summary: dict[str, Any] | None, exc: BaseException | None = None) -> None:
        """Report the materialization (success) or the exception (failure) and close the Pipes session."""
        try:
            self.flush()
        except Exception as flush_error:  # a tracking hiccup must not hide the run's own outcome
            self.log(f"warning: could not flush MLflow metrics: {flush_error}")
        if self._pipes is None or self._pipes_cm is None:
            return
        if summary is not None and exc is None:
            self._pipes.report_asset_materialization(
                metadata={
                    "steps": summary["steps"],
                    "steps_this_run": summary["steps_this_run"],
                    "first_loss": summary["first_loss"],
                    "last_loss": summary["last_loss"],
                    "tokens_per_second": summary["tokens_per_second"],
                    "num_processes": summary["num_processes"],
                    "distributed_type": summary["distributed_type"],
                    "mixed_precision": summary["mixed_precision"],
                    "trainable_parameters": summary["trainable_parameters"],
                    "peak_rss_mb": summary["peak_rss_mb"],
                    "final_model_path": {"raw_value": summary["final_model_path"], "type": "path"},
                    "resumed_from": str(summary["resumed_from"]),
                }
            )
        cm, self._pipes, self._pipes_cm = self._pipes_cm, None, None
        if exc is None:
            cm.__exit__(None, None, None)
        else:
            cm.__exit__(type(exc), exc, exc.__traceback__)


def _peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux's VmHWM (the high-water mark of this process image) first: getrusage's ru_maxrss survives
    exec, so a training process started by a large parent (a Dagster run, a benchmark holding a model)
    reported at least the parent's size at fork.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024**2 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
