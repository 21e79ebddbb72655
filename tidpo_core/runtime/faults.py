"""Planted faults for the reliability tests: a crash, a preemption signal or a NaN loss at a chosen step,
or a precompute process killed in the middle of writing a shard.

They are not settings: the training engine and the precompute processes read them from the environment variable TIDPO_FAULTS (JSON),
which a test sets around an in-process run or a launched process, and which nobody sets in production.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

FAULTS_ENV = "TIDPO_FAULTS"


@dataclass(frozen=True)
class Faults:
    nan_at_step: int | None = None
    """Make the loss of this optimizer step non-finite on the last process (exercises the NaN guard)."""
    kill_at_step: int | None = None
    """SIGKILL the training process(es) right after this optimizer step (simulates a crash)."""
    sigterm_at_step: int | None = None
    """Send SIGTERM to the main process right after this optimizer step (simulates preemption)."""
    kill_after_shards: int | None = None
    """A precompute process SIGKILLs itself after writing this many shards, with the next shard's
    temporary file half written (simulates a crash mid-shard)."""
    kill_rank: int | None = None
    """Which precompute process kill_after_shards hits (its rank); None: every process."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        raw = (os.environ if environ is None else environ).get(FAULTS_ENV, "")
        if not raw:
            return cls()
        values = json.loads(raw)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{FAULTS_ENV} names unknown faults {sorted(unknown)}")
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        return {FAULTS_ENV: json.dumps({k: v for k, v in asdict(self).items() if v is not None})}


@contextmanager
def planted(**faults: int) -> Iterator[Faults]:
    """Set TIDPO_FAULTS for the duration: in-process runs and every process started meanwhile see it."""
    plan = Faults(**faults)
    previous = os.environ.get(FAULTS_ENV)
    os.environ.update(plan.as_env())
    try:
        yield plan
    finally:
        if previous is None:
            os.environ.pop(FAULTS_ENV, None)
        else:
            os.environ[FAULTS_ENV] = previous
