"""Which method leads on each metric of a comparison table, and whether its lead exceeds the seeds' spread.

Shared by the benchmarks that compare methods over seeds (bench_grpo, bench_real) and by the table's
renderers, so a results file is judged again by today's rule whenever it is rendered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Metrics = Mapping[str, tuple[str, bool]]
"""Per metric: its label and whether higher is better."""


def verdicts(table: Mapping[str, Mapping[str, Any]], metrics: Metrics) -> dict[str, Any]:
    """Per metric of `metrics`: the best method's mean, the runner-up's, and whether the gap exceeds the two
    spreads together (the seeds' standard deviations), else "within the spread". `table` is
    {method: {metric: {"mean", "std", ...}}}; the row "reference" is not a method and is left out."""
    out: dict[str, Any] = {}
    for metric, (label, higher) in metrics.items():
        scored = [
            (m, row[metric])
            for m, row in table.items()
            if m != "reference" and isinstance(row.get(metric), Mapping)
        ]
        scored = [(m, v) for m, v in scored if v.get("mean") is not None and math.isfinite(v["mean"])]
        if len(scored) < 2:
            continue
        scored.sort(key=lambda mv: mv[1]["mean"], reverse=higher)
        (best, b), (second, s) = scored[0], scored[1]
        gap = abs(b["mean"] - s["mean"])
        tied = [m for m, v in scored if math.isclose(v["mean"], b["mean"], abs_tol=1e-9)]
        separated = gap > b["std"] + s["std"]
        out[metric] = {
            "label": label,
            "higher_is_better": higher,
            "best": best,
            "runner_up": second,
            "tied": tied,
            "best_mean": b["mean"],
            "best_std": b["std"],
            "runner_up_mean": s["mean"],
            "runner_up_std": s["std"],
            "separated": separated,
            "sentence": f"{label}: {best} {b['mean']:.3f} ± {b['std']:.3f} vs {second} {s['mean']:.3f} ± {s['std']:.3f}"
            + ("" if separated else " (within the spread)"),
        }
    return out


def winner(verdict: Mapping[str, Any]) -> str:
    """The verdict in a table cell: a tie, a clear best, or a best within the runner-up's spread."""
    if len(verdict.get("tied", [])) > 1:
        return "tie: " + " = ".join(verdict["tied"])
    if verdict["separated"]:
        return f"best: {verdict['best']}"
    return f"best: {verdict['best']}, within the spread of {verdict['runner_up']}"
