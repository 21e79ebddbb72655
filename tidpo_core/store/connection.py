"""Opening the DuckDB file, its schema (every table tidpo keeps), transactions."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from tidpo_core.runtime.layout import DATABASE_FILE

__all__ = ["DATABASE_FILE", "SCHEMA", "connect", "ensure_schema", "now", "table_digest", "transaction"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS preference_pairs (
    pair_id VARCHAR PRIMARY KEY,
    prompt VARCHAR NOT NULL,
    chosen VARCHAR NOT NULL,
    rejected VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    meta_json VARCHAR,
    loaded_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS quarantine (
    source VARCHAR,
    line_1based BIGINT,
    reason VARCHAR,
    detail VARCHAR,
    raw VARCHAR,
    loaded_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS anchor_responses (
    pair_id VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,
    anchor VARCHAR NOT NULL,
    generation_json VARCHAR,
    created_at TIMESTAMP,
    PRIMARY KEY (pair_id, fingerprint)
);
CREATE TABLE IF NOT EXISTS token_weights (
    fingerprint VARCHAR NOT NULL,
    pair_id VARCHAR NOT NULL,
    side VARCHAR NOT NULL,
    text_digest VARCHAR NOT NULL,
    position INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    attribution FLOAT NOT NULL,
    prior FLOAT NOT NULL,
    weight FLOAT NOT NULL,
    reference_logp FLOAT NOT NULL,
    reference_topk_ids INTEGER[],
    reference_topk_logp FLOAT[],
    PRIMARY KEY (fingerprint, pair_id, side, position)
);
-- Files written before the reference top-k cache existed.
ALTER TABLE token_weights ADD COLUMN IF NOT EXISTS reference_topk_ids INTEGER[];
ALTER TABLE token_weights ADD COLUMN IF NOT EXISTS reference_topk_logp FLOAT[];
CREATE TABLE IF NOT EXISTS contrastive_models (
    fingerprint VARCHAR PRIMARY KEY,
    reference_fingerprint VARCHAR NOT NULL,
    positive_path VARCHAR NOT NULL,
    negative_path VARCHAR NOT NULL,
    recipe_json VARCHAR,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS reward_models (
    fingerprint VARCHAR PRIMARY KEY,    -- pairs digest + reference fingerprint + training settings
    reference_fingerprint VARCHAR NOT NULL,
    pairs_digest VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    accuracy DOUBLE,                    -- held-out pair accuracy (eval split; a tie counts half)
    margin DOUBLE,                      -- held-out mean r(chosen) - r(rejected)
    loss DOUBLE,                        -- held-out Bradley-Terry loss
    eval_pairs INTEGER NOT NULL,
    train_pairs INTEGER NOT NULL,
    settings_json VARCHAR,
    mlflow_run_id VARCHAR,
    registered_version VARCHAR,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS evaluation_pairs (
    mlflow_run_id VARCHAR NOT NULL,     -- the evaluated version's training run
    pair_id VARCHAR NOT NULL,
    PRIMARY KEY (mlflow_run_id, pair_id)
);
CREATE TABLE IF NOT EXISTS champion_history (
    registered_model VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    event VARCHAR NOT NULL,             -- promoted | refused | rollback
    previous_champion VARCHAR,          -- the version that held the alias before (NULL: none)
    compared_with VARCHAR,
    reason VARCHAR,
    recorded_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS evaluation_metrics (
    mlflow_run_id VARCHAR,
    model VARCHAR,
    metric VARCHAR,
    value DOUBLE,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS method_comparison (
    comparison_id VARCHAR NOT NULL,
    mlflow_run_id VARCHAR,
    method VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    mean DOUBLE,
    std DOUBLE,
    n INTEGER,
    seed_values VARCHAR,
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS method_comparison_runs (
    comparison_id VARCHAR NOT NULL,
    method VARCHAR NOT NULL,
    seed INTEGER NOT NULL,
    metric VARCHAR NOT NULL,
    value DOUBLE,
    created_at TIMESTAMP
);
"""


def connect(path: str | Path, read_only: bool = False, wait_s: float = 60.0) -> duckdb.DuckDBPyConnection:
    """Open the data set's DuckDB file and make sure every table exists.

    DuckDB lets one process write a file, or several read it, never both: while another process has
    the file open in a conflicting mode (a pipeline step writing a chunk, a notebook reading), this
    waits up to `wait_s` seconds for it to let go instead of failing at once.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if not read_only:
        ensure_schema(con)
    return con


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)
    _number_quarantine_from_one(con)


def _number_quarantine_from_one(con: duckdb.DuckDBPyConnection) -> None:
    """Stores made before 2026-12 numbered quarantined rows from 0 (`row_number`); editors count from 1."""
    columns = {
        row[0]
        for row in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'quarantine'"
        ).fetchall()
    }
    if "row_number" in columns:
        with transaction(con):
            con.execute("ALTER TABLE quarantine RENAME COLUMN row_number TO line_1based")
            con.execute("UPDATE quarantine SET line_1based = line_1based + 1")


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def table_digest(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> str:
    """A content digest of a query result, order-independent; used for lineage and change detection."""
    row = con.execute(
        f"SELECT count(*), coalesce(bit_xor(hash(t)), 0) FROM ({query}) t", list(params)
    ).fetchone()
    assert row is not None
    return f"{row[0]}-{int(row[1]) & 0xFFFFFFFFFFFFFFFF:016x}"
