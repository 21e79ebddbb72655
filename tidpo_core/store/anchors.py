"""Anchor responses: one sampled response per train pair, under the sampling settings' fingerprint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from tidpo_core.store import connection
from tidpo_core.store.connection import now


def missing_anchor_pair_ids(
    con: duckdb.DuckDBPyConnection, fingerprint: str, split: str = "train"
) -> list[str]:
    rows = con.execute(
        """
        SELECT p.pair_id FROM preference_pairs p
        LEFT JOIN anchor_responses a ON a.pair_id = p.pair_id AND a.fingerprint = ?
        WHERE p.split = ? AND a.pair_id IS NULL ORDER BY p.pair_id
        """,
        [fingerprint, split],
    ).fetchall()
    return [r[0] for r in rows]


def insert_anchors(
    con: duckdb.DuckDBPyConnection, fingerprint: str, anchors: dict[str, str], generation: dict[str, Any]
) -> int:
    if not anchors:
        return 0
    table = pa.table(
        {
            "pair_id": list(anchors),
            "fingerprint": [fingerprint] * len(anchors),
            "anchor": list(anchors.values()),
            "generation_json": [json.dumps(generation, sort_keys=True)] * len(anchors),
            "created_at": pa.array([now()] * len(anchors), pa.timestamp("us")),
        }
    )
    with connection.transaction(con):
        con.register("_anchor_staging", table)
        con.execute("INSERT OR REPLACE INTO anchor_responses SELECT * FROM _anchor_staging")
        con.unregister("_anchor_staging")
    return len(anchors)


def anchor_shard_table(pair_ids: Sequence[str], anchors: Sequence[str]) -> pa.Table:
    """One shard of sampled anchors as load_anchor_shards reads it: (pair_id, anchor)."""
    return pa.table(
        {"pair_id": pa.array(list(pair_ids), pa.string()), "anchor": pa.array(list(anchors), pa.string())}
    )


def load_anchor_shards(
    con: duckdb.DuckDBPyConnection, fingerprint: str, files: Sequence[Path], generation: dict[str, Any]
) -> int:
    """Every shard file's anchors (anchor_shard_table's columns) into the table, in one transaction;
    returns the rows loaded. The files are read here, by DuckDB: a file it cannot read fails the whole
    load, naming the file."""
    if not files:
        return 0
    paths = [str(f) for f in files]
    with connection.transaction(con):
        loaded = con.execute(
            "INSERT OR REPLACE INTO anchor_responses SELECT pair_id, ?, anchor, ?, ? FROM read_parquet(?)",
            [fingerprint, json.dumps(generation, sort_keys=True), now(), paths],
        ).fetchone()[0]
    return int(loaded)


def read_anchors(con: duckdb.DuckDBPyConnection, fingerprint: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT pair_id, anchor FROM anchor_responses WHERE fingerprint = ?", [fingerprint]
    ).fetchall()
    return dict(rows)


def anchor_count(con: duckdb.DuckDBPyConnection, fingerprint: str) -> int:
    return con.execute(
        "SELECT count(*) FROM anchor_responses WHERE fingerprint = ?", [fingerprint]
    ).fetchone()[0]


def first_anchors(con: duckdb.DuckDBPyConnection, fingerprint: str, limit: int) -> list[tuple[str, str, str]]:
    """(pair_id, prompt, anchor) of the first anchors by pair id: a preview."""
    return con.execute(
        "SELECT a.pair_id, p.prompt, a.anchor FROM anchor_responses a JOIN preference_pairs p USING (pair_id) "
        "WHERE a.fingerprint = ? ORDER BY a.pair_id LIMIT ?",
        [fingerprint, limit],
    ).fetchall()


def train_pairs_without_anchor(con: duckdb.DuckDBPyConnection, fingerprint: str) -> int:
    return len(missing_anchor_pair_ids(con, fingerprint))
