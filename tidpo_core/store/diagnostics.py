"""Whole-store views for diagnostics and the reliability checks: counts, integrity, contents."""

from __future__ import annotations

from typing import Any

import duckdb


def table_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return {
        "pairs": con.execute("SELECT count(*) FROM preference_pairs").fetchone()[0],
        "anchors": con.execute("SELECT count(*) FROM anchor_responses").fetchone()[0],
        "weight_responses": con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT fingerprint, pair_id, side FROM token_weights)"
        ).fetchone()[0],
    }


def integrity_problems(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows that should not exist: duplicates, responses with holes in their token positions, orphans."""

    def count(sql: str) -> int:
        return con.execute(sql).fetchone()[0]

    return {
        "duplicate_pairs": count("SELECT count(*) - count(DISTINCT pair_id) FROM preference_pairs"),
        "duplicate_anchors": count(
            "SELECT count(*) - count(DISTINCT (pair_id, fingerprint)) FROM anchor_responses"
        ),
        "duplicate_weight_rows": count(
            "SELECT count(*) - count(DISTINCT (fingerprint, pair_id, side, position)) FROM token_weights"
        ),
        "partial_responses": count(
            "SELECT count(*) FROM (SELECT count(*) AS n, min(position) AS lo, max(position) AS hi "
            "FROM token_weights GROUP BY fingerprint, pair_id, side) WHERE lo <> 0 OR hi <> n - 1"
        ),
        "orphan_anchors": count(
            "SELECT count(*) FROM anchor_responses a WHERE NOT EXISTS "
            "(SELECT 1 FROM preference_pairs p WHERE p.pair_id = a.pair_id)"
        ),
        "duplicate_metrics": count(
            "SELECT count(*) - count(DISTINCT (mlflow_run_id, model, metric)) FROM evaluation_metrics"
        ),
    }


def contents(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Everything stored, keyed by content (fingerprints are content hashes, so two data dirs compare)."""
    pairs = {
        r[0]: tuple(r[1:])
        for r in con.execute(
            "SELECT pair_id, prompt, chosen, rejected, split FROM preference_pairs"
        ).fetchall()
    }
    quarantine = con.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    anchors = {
        (r[0], r[1]): r[2]
        for r in con.execute("SELECT fingerprint, pair_id, anchor FROM anchor_responses").fetchall()
    }
    weights = {
        (r[0], r[1], r[2]): (tuple(r[3]), tuple(r[4]), tuple(r[5]))
        for r in con.execute(
            "SELECT fingerprint, pair_id, side, list(token_id ORDER BY position), list(weight ORDER BY position), "
            "list(reference_logp ORDER BY position) FROM token_weights GROUP BY ALL"
        ).fetchall()
    }
    metrics = con.execute("SELECT model, metric, value FROM evaluation_metrics").fetchall()
    return {
        "pairs": pairs,
        "quarantine": quarantine,
        "anchors": anchors,
        "weights": weights,
        "metrics": metrics,
    }
