"""The grid's trade-offs: the judged win rate at matched KL (one line through every run) and the pictures of
win rate against KL and, for the rejudged answers, against answer length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import common


def win_rate_frontier(table: dict[str, Any]) -> dict[str, Any]:
    """The win rate at matched KL: one least-squares line of judged win rate on KL to the reference through
    every run of every method, and per method its runs' mean distance above that line (mean, std over
    seeds). A method that wins only by moving further from the reference sits on the line."""
    points = _seed_points(table, "kl_to_reference", "judged_win_rate")
    pooled = [xy for method_points in points.values() for xy in method_points]
    if len(pooled) < 3 or len({x for x, _ in pooled}) < 2:
        return {}
    xs, ys = zip(*pooled, strict=True)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pooled) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    above = {
        method: common.mean_std([y - (intercept + slope * x) for x, y in method_points])
        for method, method_points in points.items()
    }
    return {"slope_per_nat": slope, "intercept": intercept, "above_the_line": above}


def _seed_points(table: dict[str, Any], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """Per method, the (x, y) of each seed (the cells list their seeds in one order)."""
    return {
        method: list(zip(row[x]["seeds"], row[y]["seeds"], strict=True))
        for method, row in table.items()
        if x in row and y in row
    }


def save_tradeoffs(figures: dict[str, Any], path: Path) -> Path | None:
    """The grid's trade-offs, one dot per seed: judged win rate against KL to the reference (the DPO paper's
    frontier), and with the rejudged answers, the win rate at equal lengths against answer length."""
    from tidpo_core.evaluation.plots import TradeoffPanel, save_tradeoff_png

    panels = [
        TradeoffPanel(
            "KL to the reference, nats per answer",
            "judged win rate over the reference",
            _seed_points(figures.get("methods", {}), "kl_to_reference", "judged_win_rate"),
            level=0.5,
        ),
        TradeoffPanel(
            "mean answer length, tokens",
            "judged win rate at equal lengths",
            _seed_points(
                figures.get("rejudged", {}).get("methods", {}),
                "mean_length",
                "judged_win_rate_length_controlled",
            ),
            level=0.5,
        ),
    ]
    panels = [p for p in panels if p.points]
    if not panels:
        return None
    return save_tradeoff_png(
        panels, path, title=f"{figures.get('setup', {}).get('model', '')}: one dot per seed"
    )
