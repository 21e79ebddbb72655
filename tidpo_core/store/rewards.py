"""Reward models (the GRPO baseline's Bradley-Terry reward): one row per trained model, with its held-out
accuracy and where MLflow has it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb

from tidpo_core.store import connection
from tidpo_core.store.connection import now

COLUMNS = (
    "fingerprint, reference_fingerprint, pairs_digest, path, accuracy, margin, loss, eval_pairs, train_pairs, "
    "settings_json, mlflow_run_id, registered_version, created_at"
)


@dataclass(frozen=True)
class RewardModelRecord:
    fingerprint: str
    reference_fingerprint: str
    pairs_digest: str
    path: str
    accuracy: float
    """Held-out pair accuracy on the eval split (nan without eval pairs)."""
    margin: float
    loss: float
    eval_pairs: int
    train_pairs: int
    settings: dict[str, Any]
    mlflow_run_id: str | None = None
    registered_version: str | None = None
    created_at: datetime | None = None


def record_reward_model(con: duckdb.DuckDBPyConnection, record: RewardModelRecord) -> None:
    """Insert or replace the row of `record.fingerprint`."""
    with connection.transaction(con):
        con.execute("DELETE FROM reward_models WHERE fingerprint = ?", [record.fingerprint])
        con.execute(
            f"INSERT INTO reward_models ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                record.fingerprint,
                record.reference_fingerprint,
                record.pairs_digest,
                record.path,
                record.accuracy,
                record.margin,
                record.loss,
                record.eval_pairs,
                record.train_pairs,
                json.dumps(record.settings, sort_keys=True),
                record.mlflow_run_id,
                record.registered_version,
                record.created_at or now(),
            ],
        )


def _record(row: tuple[Any, ...]) -> RewardModelRecord:
    values = list(row)
    values[9] = json.loads(values[9]) if values[9] else {}
    return RewardModelRecord(*values)


def reward_model_record(con: duckdb.DuckDBPyConnection, fingerprint: str) -> RewardModelRecord | None:
    row = con.execute(f"SELECT {COLUMNS} FROM reward_models WHERE fingerprint = ?", [fingerprint]).fetchone()
    return None if row is None else _record(row)


def latest_reward_model(
    con: duckdb.DuckDBPyConnection, reference_fingerprint: str | None = None
) -> RewardModelRecord | None:
    """The newest reward model (trained on this reference, if given)."""
    where, params = (
        ("WHERE reference_fingerprint = ?", [reference_fingerprint]) if reference_fingerprint else ("", [])
    )
    row = con.execute(
        f"SELECT {COLUMNS} FROM reward_models {where} ORDER BY created_at DESC LIMIT 1", params
    ).fetchone()
    return None if row is None else _record(row)
