"""How a run stops early: a non-finite loss, or SIGTERM/SIGINT turned into a stop at a step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
from accelerate import Accelerator


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a step was NaN/inf; the last good state is checkpointed."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT (preemption, a cluster's time limit, Terminate in the Dagster UI) stopped the run
    at an optimizer-step boundary, after a checkpoint; a re-run resumes from it."""


# Exit status of a run stopped by a signal after checkpointing (128 + SIGTERM, the shell convention).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next optimizer step instead of dying mid-step.

    Schedulers (SLURM, Kubernetes) and Dagster's run termination send SIGTERM with a grace period; the
    engine uses it to checkpoint. Handlers are installed only in the main thread (Python's rule) and
    restored on exit; a second signal while stopping falls through to the previous handler.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            previous = self._previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum

    def should_stop(self, accelerator: Accelerator) -> bool:
        """Collective: every process stops at the same step if any one of them was signalled."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)
