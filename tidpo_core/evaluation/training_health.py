"""Whether a training run was healthy: every logged step finite, and the signal it trains for (the reward
margin, or GRPO's mean reward) grew from the first quarter of the run to the last."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingHealth:
    passed: bool
    steps: int
    all_finite: bool
    mean_margin_first_window: float
    mean_margin_last_window: float
    mean_loss_first_window: float
    mean_loss_last_window: float
    signal: str = "rewards/margins"
    """What had to grow: the reward margin (pair losses) or GRPO's mean reward (`reward`)."""


def training_health(history: Sequence[dict[str, float]]) -> TrainingHealth:
    """Healthy: every step's loss and reward margin is finite, and the reward margin grew.

    The margin, not the loss, is what must improve: with the sequential KL inside beta (TDPO2) the loss
    of a well-learning run can rise, because SeqKL(y_l) grows as the policy moves away from the rejected
    answer. The margin (beta times the weighted chosen-minus-rejected log-ratio, TRL's rewards/margins)
    grows under every loss tidpo trains. Quarter-length windows: single steps are too noisy to compare.

    A GRPO run (its history has TRL's GRPOTrainer metrics, no margin) must raise its mean sampled reward
    (`reward`) instead; a step that re-uses the previous step's completions (grpo_num_iterations > 1)
    samples nothing and logs a NaN reward, which is left out rather than counted as non-finite.
    """
    grpo = (
        bool(history)
        and not any("rewards/margins" in h for h in history)
        and any("reward" in h for h in history)
    )
    signal = "reward" if grpo else "rewards/margins"
    losses = [float(h["loss"]) for h in history]
    margins = [float(h[signal]) for h in history if signal in h]
    if grpo:
        margins = [m for m in margins if not math.isnan(m)]
    finite = bool(losses) and bool(margins) and all(math.isfinite(x) for x in losses + margins)
    window = max(1, len(losses) // 4)

    def window_mean(values: list[float], last: bool) -> float:
        if not values:
            return float("nan")
        part = values[-window:] if last else values[:window]
        return sum(part) / len(part)

    first_margin, last_margin = window_mean(margins, False), window_mean(margins, True)
    return TrainingHealth(
        passed=bool(finite and last_margin > first_margin),
        steps=len(losses),
        all_finite=finite,
        mean_margin_first_window=first_margin,
        mean_margin_last_window=last_margin,
        mean_loss_first_window=window_mean(losses, False),
        mean_loss_last_window=window_mean(losses, True),
        signal=signal,
    )
