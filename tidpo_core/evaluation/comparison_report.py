"""The method comparison's reports: the markdown table (metrics as rows, methods as columns), the CSVs
of the aggregated and per-seed values, the DuckDB rows, and the training curves averaged over seeds."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from tidpo_core import store
from tidpo_core.evaluation.comparison import ComparisonResult, ComparisonRun
from tidpo_core.evaluation.metrics import CURVE_METRICS

# The rows of the summary table, in order; every other metric is kept in the CSV and DuckDB.
TABLE_METRICS: tuple[str, ...] = (
    "reward_accuracy",
    "reward_margin",
    "likelihood_win_rate",
    "normalized_likelihood_win_rate",
    "kl_to_reference",
    "kl_to_reference_stderr",
    "distinct_1",
    "distinct_2",
    "mean_length",
    "precision_at_k_attribution",
    "precision_at_k_prior",
    "precision_at_k_hybrid",
    "precision_at_k_hybrid_start",
    "precision_at_k_hybrid_middle",
    "precision_at_k_hybrid_end",
    "precision_at_k_hybrid_attribution_no_eos",
    "precision_at_k_hybrid_surprisal",
    "precision_at_k_hybrid_surprisal_no_eos",
    "precision_at_k_uniform",
    "critical_phrase_chosen_rate",
    "critical_phrase_rejected_rate",
    "critical_phrase_neither_rate",
    "reward_model_score",
    "judged_win_rate",
    "judged_win_rate_stderr",
    "judged_win_rate_length_controlled",
    "truthfulqa_mc1",
    "truthfulqa_mc2",
    "train_seconds",
)
# What the bar chart shows.
PLOT_METRICS: tuple[str, ...] = (
    "reward_accuracy",
    "reward_margin",
    "likelihood_win_rate",
    "kl_to_reference",
    "distinct_2",
    "precision_at_k_attribution",
    "critical_phrase_chosen_rate",
    "critical_phrase_neither_rate",
    "reward_model_score",
    "judged_win_rate",
    "judged_win_rate_length_controlled",
    "train_seconds",
)


def table_metrics(table: Sequence[Mapping[str, Any]], preferred: Sequence[str] = TABLE_METRICS) -> list[str]:
    """The preferred metrics present in the table, then any benchmark scores, in a stable order."""
    present = {k[: -len("_mean")] for row in table for k in row if k.endswith("_mean")}
    extra = sorted(m for m in present if m.startswith(("truthfulqa", "ifeval_", "humaneval")))
    return [m for m in preferred if m in present] + extra


def _cell(mean: Any, std: Any) -> str:
    mean, std = float(mean), float(std)
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def comparison_markdown(table: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Metrics as rows, methods as columns, each cell mean ± sample std over seeds."""
    if not table:
        return "_no runs_"
    metrics = list(metrics) if metrics is not None else table_metrics(table)
    methods = [str(r["method"]) for r in table]
    header = (
        "| metric | "
        + " | ".join(f"{m} (n={r['seeds']})" for m, r in zip(methods, table, strict=True))
        + " |"
    )
    lines = [header, "|" + "---|" * (len(methods) + 1)]
    for metric in metrics:
        cells = [
            _cell(r.get(f"{metric}_mean", float("nan")), r.get(f"{metric}_std", float("nan"))) for r in table
        ]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison_csv(result: ComparisonResult, path: str | Path) -> Path:
    """One row per method: seeds, then <metric>_mean and <metric>_std for every metric."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in result.table for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in result.table:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def write_runs_csv(result: ComparisonResult, path: str | Path) -> Path:
    """The per-seed values behind the table: method, seed, metric, value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "metric", "value"])
        for run in result.runs:
            for metric, value in run.metrics.items():
                writer.writerow([run.method, run.seed, metric, value])
    return path


def write_comparison_table(
    con: duckdb.DuckDBPyConnection,
    comparison_id: str,
    result: ComparisonResult,
    mlflow_run_id: str | None = None,
) -> int:
    """Replace this comparison's rows in DuckDB (aggregated and per seed, see store.replace_comparison);
    returns the aggregated row count."""
    now = store.now()
    by_method: dict[str, list[ComparisonRun]] = {}
    for run in result.runs:
        by_method.setdefault(run.method, []).append(run)
    aggregated = []
    for row in result.table:
        method = str(row["method"])
        for key in row:
            if not key.endswith("_mean"):
                continue
            metric = key[: -len("_mean")]
            values = {str(r.seed): r.metrics.get(metric) for r in by_method.get(method, [])}
            aggregated.append(
                (
                    comparison_id,
                    mlflow_run_id,
                    method,
                    metric,
                    float(row[key]),
                    float(row[f"{metric}_std"]),
                    int(row["seeds"]),
                    json.dumps(values),
                    now,
                )
            )
    per_seed = [
        (comparison_id, run.method, int(run.seed), metric, float(value), now)
        for run in result.runs
        for metric, value in run.metrics.items()
    ]
    store.replace_comparison(con, comparison_id, aggregated, per_seed)
    return len(aggregated)


def training_curves(
    result: ComparisonResult, metrics: Sequence[str] = CURVE_METRICS
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per method, each curve metric averaged over seeds at every step all seeds reached."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    by_method: dict[str, list[ComparisonRun]] = {}
    for run in result.runs:
        if run.history:
            by_method.setdefault(run.method, []).append(run)
    for method, group in by_method.items():
        series[method] = {}
        for metric in metrics:
            per_step: dict[int, list[float]] = {}
            for run in group:
                for entry in run.history:
                    if metric in entry and math.isfinite(float(entry[metric])):
                        per_step.setdefault(int(entry["step"]), []).append(float(entry[metric]))
            series[method][metric] = [
                (step, float(np.mean(values)))
                for step, values in sorted(per_step.items())
                if len(values) == len(group)
            ]
    return series


def tradeoff_points(
    runs: Sequence[ComparisonRun], x_metric: str, y_metric: str
) -> dict[str, list[tuple[float, float]]]:
    """Per method, one (x, y) point per run that measured both metrics (the reference row has no win rate
    over itself, so a win-rate trade-off leaves it out)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        x, y = run.metrics.get(x_metric), run.metrics.get(y_metric)
        if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y)):
            points.setdefault(run.method, []).append((float(x), float(y)))
    return points
