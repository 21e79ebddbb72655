"""Interleaved rounds and paired ratios: how the benchmarks compare configurations on a drifting machine.

A shared or virtual machine's speed drifts by tens of percent over minutes, so two configurations timed
minutes apart differ by more than the effect being measured. Each round therefore times every
configuration back to back, in alternating order (ABC, CBA, ABC, ...) so that none always runs first or
last, and a configuration is compared with the baseline through its paired ratio: its time over the
baseline's time in the same round. The figure reported, and the one a guard is judged on, is the median
of those per-round ratios, so a single disturbed round cannot flip a guard.

Pure standard library (no torch): a worker process can import it without fixing its thread environment.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def round_order(names: Sequence[T], round_index: int) -> list[T]:
    """`names` in order in even rounds and reversed in odd ones (ABC, CBA, ...)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def interleaved_rounds(
    tasks: Mapping[str, Callable[[], R]], rounds: int, report: Callable[[int, str, R], None] | None = None
) -> dict[str, list[R]]:
    """Every task once per round, in :func:`round_order`; each task's results in round order.

    `report(round_index, name, result)` is called after every task (for progress logs)."""
    results: dict[str, list[R]] = {name: [] for name in tasks}
    for round_index in range(rounds):
        for name in round_order(list(tasks), round_index):
            result = tasks[name]()
            results[name].append(result)
            if report is not None:
                report(round_index, name, result)
    return results


def per_round_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Each round's numerator over the same round's denominator."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def median_paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of one round's ratio: drift between rounds cancels within a round's pair."""
    return statistics.median(per_round_ratios(numerators, denominators))


def paired_ratios(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per configuration: `rounds`, its time over `baseline`'s in each round, and `median`, their median."""
    return {
        name: {
            "rounds": per_round_ratios(values, times[baseline]),
            "median": median_paired_ratio(values, times[baseline]),
        }
        for name, values in times.items()
    }
