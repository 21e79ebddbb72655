"""The gates that decide whether a trained policy (the challenger) takes the champion alias: it must beat
its reference (`gate_decision`) and be no worse than the current champion (`not_worse_than_champion`),
both judged on the same held-out metrics (`promotion_decision`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    description: str


def _require_gate_metrics(names: tuple[str | None, ...], *tables: dict[str, float]) -> None:
    for name in names:
        if name is not None and any(name not in table for table in tables):
            raise KeyError(f"gate metric {name!r} is not among the evaluation metrics {sorted(tables[0])}")


def gate_decision(
    policy: dict[str, float],
    reference: dict[str, float],
    metric: str,
    margin: float,
    tiebreak: str | None = "reward_margin",
) -> GateDecision:
    """The evaluation gate: the trained policy must beat the reference on `metric` by more than `margin`.

    Strictly: a policy no better than its reference must not take the champion alias. Count metrics
    such as the likelihood win rate tie often on a small eval split (3 of 8 pairs either way); on an
    exact tie, the policy passes only if it is strictly better on `tiebreak` (default: the held-out
    reward margin, which is 0 for the reference itself). None: a tie fails.
    """
    _require_gate_metrics((metric, tiebreak), policy, reference)
    trained, baseline = policy[metric], reference[metric]
    described = f"{metric} {trained:.4f} vs reference {baseline:.4f} + margin {margin}"
    if not np.isfinite(trained):
        return GateDecision(False, f"failed: {described} (not finite)")
    if trained > baseline + margin:
        return GateDecision(True, f"passed: {described}")
    if tiebreak is None or trained != baseline + margin:
        return GateDecision(False, f"failed: {described} (must be greater)")
    better = bool(np.isfinite(policy[tiebreak]) and policy[tiebreak] > reference[tiebreak])
    return GateDecision(
        better,
        f"{'passed' if better else 'failed'}: {described} is a tie; tie-break {tiebreak} "
        f"{policy[tiebreak]:.4f} vs reference {reference[tiebreak]:.4f} (must be greater)",
    )


def not_worse_than_champion(
    challenger: dict[str, float],
    champion: dict[str, float],
    metric: str,
    margin: float = 0.0,
    tiebreak: str | None = "reward_margin",
) -> GateDecision:
    """The retraining gate's second half: the challenger may trail the current champion on `metric` by
    less than `margin` (0: it must be at least as good). On an exact tie at the boundary it must be at
    least as good on `tiebreak` (None: a tie passes)."""
    _require_gate_metrics((metric, tiebreak), challenger, champion)
    new, current = challenger[metric], champion[metric]
    described = f"{metric} {new:.4f} vs champion {current:.4f} - margin {margin}"
    if not np.isfinite(new):
        return GateDecision(False, f"failed: {described} (not finite)")
    if new > current - margin:
        return GateDecision(True, f"passed: {described}")
    if new < current - margin:
        return GateDecision(False, f"failed: {described} (worse than the champion)")
    if tiebreak is None:
        return GateDecision(True, f"passed: {described} is a tie")
    kept = bool(np.isfinite(challenger[tiebreak]) and challenger[tiebreak] >= champion[tiebreak])
    return GateDecision(
        kept,
        f"{'passed' if kept else 'failed'}: {described} is a tie; tie-break {tiebreak} "
        f"{challenger[tiebreak]:.4f} vs champion {champion[tiebreak]:.4f} (must not be smaller)",
    )


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a challenger takes the champion alias: it must beat its reference and be no worse than
    the current champion (when there is one), judged on the same held-out pairs."""

    passed: bool
    description: str
    versus_reference: GateDecision
    versus_champion: GateDecision | None
    champion_version: str | None

    @property
    def compared_with(self) -> str:
        return (
            "reference" if self.champion_version is None else f"reference, champion v{self.champion_version}"
        )


def promotion_decision(
    challenger: dict[str, float],
    reference: dict[str, float],
    champion: dict[str, float] | None,
    metric: str,
    margin: float = 0.0,
    tiebreak: str | None = "reward_margin",
    champion_margin: float = 0.0,
    champion_version: str | None = None,
) -> PromotionDecision:
    versus_reference = gate_decision(challenger, reference, metric, margin, tiebreak)
    if champion is None:
        return PromotionDecision(
            versus_reference.passed,
            f"{versus_reference.description}; no champion yet",
            versus_reference,
            None,
            None,
        )
    versus_champion = not_worse_than_champion(challenger, champion, metric, champion_margin, tiebreak)
    passed = versus_reference.passed and versus_champion.passed
    return PromotionDecision(
        passed,
        f"reference: {versus_reference.description}; champion v{champion_version}: {versus_champion.description}",
        versus_reference,
        versus_champion,
        champion_version,
    )
