"""What the later stages record: contrastive model folders, evaluation metrics and pairs, the champion
alias's history, method comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from tidpo_core.store import connection
from tidpo_core.store.connection import now


def record_contrastive_models(
    con: duckdb.DuckDBPyConnection,
    fingerprint: str,
    reference_fingerprint: str,
    paths: Sequence[str],
    recipe: dict[str, Any],
) -> None:
    positive, negative = (str(p) for p in paths)
    with connection.transaction(con):
        con.execute("DELETE FROM contrastive_models WHERE fingerprint = ?", [fingerprint])
        con.execute(
            "INSERT INTO contrastive_models VALUES (?, ?, ?, ?, ?, ?)",
            [
                fingerprint,
                reference_fingerprint,
                positive,
                negative,
                json.dumps(recipe, sort_keys=True),
                now(),
            ],
        )


def latest_contrastive_models(
    con: duckdb.DuckDBPyConnection, reference_fingerprint: str
) -> tuple[str, str] | None:
    """Paths (positive, negative) of the newest contrastive pair trained for this reference, if any."""
    row = con.execute(
        "SELECT positive_path, negative_path FROM contrastive_models WHERE reference_fingerprint = ? "
        "ORDER BY created_at DESC LIMIT 1",
        [reference_fingerprint],
    ).fetchone()
    return None if row is None else (row[0], row[1])


def write_metrics(
    con: duckdb.DuckDBPyConnection, mlflow_run_id: str, metrics_by_model: dict[str, dict[str, float]]
) -> int:
    created_at = now()
    rows = [
        (mlflow_run_id, model, metric, float(value), created_at)
        for model, metrics in metrics_by_model.items()
        for metric, value in metrics.items()
    ]
    with connection.transaction(con):
        con.execute("DELETE FROM evaluation_metrics WHERE mlflow_run_id = ?", [mlflow_run_id])
        con.executemany("INSERT INTO evaluation_metrics VALUES (?, ?, ?, ?, ?)", rows)
    return len(rows)


def record_evaluation_pairs(
    con: duckdb.DuckDBPyConnection, mlflow_run_id: str, pair_ids: Sequence[str]
) -> None:
    """The held-out pairs a version was judged on, so a later challenger can say how many it shares."""
    with connection.transaction(con):
        con.execute("DELETE FROM evaluation_pairs WHERE mlflow_run_id = ?", [mlflow_run_id])
        con.executemany("INSERT INTO evaluation_pairs VALUES (?, ?)", [(mlflow_run_id, p) for p in pair_ids])


def shared_evaluation_pairs(
    con: duckdb.DuckDBPyConnection, mlflow_run_id: str, pair_ids: Sequence[str]
) -> tuple[int, int]:
    """(shared, new): how many of `pair_ids` the run `mlflow_run_id` was also judged on, and how many not."""
    earlier = {
        row[0]
        for row in con.execute(
            "SELECT pair_id FROM evaluation_pairs WHERE mlflow_run_id = ?", [mlflow_run_id]
        ).fetchall()
    }
    shared = sum(1 for p in pair_ids if p in earlier)
    return shared, len(pair_ids) - shared


@dataclass(frozen=True)
class ChampionEvent:
    registered_model: str
    version: str
    event: str
    previous_champion: str | None
    compared_with: str | None
    reason: str
    recorded_at: datetime | None = None


def record_champion_event(con: duckdb.DuckDBPyConnection, event: ChampionEvent) -> None:
    con.execute(
        "INSERT INTO champion_history VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            event.registered_model,
            event.version,
            event.event,
            event.previous_champion,
            event.compared_with,
            event.reason,
            event.recorded_at or now(),
        ],
    )


def champion_history(con: duckdb.DuckDBPyConnection, registered_model: str) -> list[ChampionEvent]:
    rows = con.execute(
        "SELECT registered_model, version, event, previous_champion, compared_with, reason, recorded_at FROM champion_history "
        "WHERE registered_model = ? ORDER BY recorded_at, rowid",
        [registered_model],
    ).fetchall()
    return [ChampionEvent(*row) for row in rows]


def replace_comparison(
    con: duckdb.DuckDBPyConnection,
    comparison_id: str,
    aggregated: Sequence[tuple[Any, ...]],
    per_seed: Sequence[tuple[Any, ...]],
) -> None:
    """Replace one comparison's rows, in one transaction: `aggregated` rows of method_comparison
    (comparison_id, mlflow_run_id, method, metric, mean, std, n, seed_values, created_at) and `per_seed`
    rows of method_comparison_runs (comparison_id, method, seed, metric, value, created_at)."""
    with connection.transaction(con):
        con.execute("DELETE FROM method_comparison WHERE comparison_id = ?", [comparison_id])
        con.execute("DELETE FROM method_comparison_runs WHERE comparison_id = ?", [comparison_id])
        if aggregated:
            con.executemany("INSERT INTO method_comparison VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", aggregated)
        if per_seed:
            con.executemany("INSERT INTO method_comparison_runs VALUES (?, ?, ?, ?, ?, ?)", per_seed)
