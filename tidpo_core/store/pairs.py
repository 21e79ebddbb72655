"""Preference pairs and the quarantine: written together, atomically, from one load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from tidpo_core.data.pairs import LoadResult, PreferencePair, assign_split
from tidpo_core.store import connection
from tidpo_core.store.connection import connect, now, table_digest


@dataclass(frozen=True)
class PairsWriteSummary:
    pairs: int
    train: int
    eval: int
    quarantined: int


def replace_pairs(
    con: duckdb.DuckDBPyConnection, result: LoadResult, eval_fraction: float
) -> PairsWriteSummary:
    """Make the stored pairs and quarantine exactly this load, atomically."""
    loaded_at = now()
    pair_rows = [
        {**pair.to_row(), "split": assign_split(pair.pair_id, eval_fraction), "loaded_at": loaded_at}
        for pair in result.pairs
    ]
    pairs_table = pa.Table.from_pylist(
        pair_rows,
        schema=pa.schema(
            [
                ("pair_id", pa.string()),
                ("prompt", pa.string()),
                ("chosen", pa.string()),
                ("rejected", pa.string()),
                ("source", pa.string()),
                ("meta_json", pa.string()),
                ("split", pa.string()),
                ("loaded_at", pa.timestamp("us")),
            ]
        ),
    )
    quarantine_table = pa.Table.from_pylist(
        [
            {
                "source": q.source,
                "line_1based": q.line_1based,
                "reason": str(q.reason),
                "detail": q.detail,
                "raw": q.raw,
                "loaded_at": loaded_at,
            }
            for q in result.quarantined
        ],
        schema=pa.schema(
            [
                ("source", pa.string()),
                ("line_1based", pa.int64()),
                ("reason", pa.string()),
                ("detail", pa.string()),
                ("raw", pa.string()),
                ("loaded_at", pa.timestamp("us")),
            ]
        ),
    )
    with connection.transaction(con):
        con.execute("DELETE FROM preference_pairs")
        con.register("_pairs_staging", pairs_table)
        con.execute(
            "INSERT INTO preference_pairs SELECT pair_id, prompt, chosen, rejected, source, split, "
            "meta_json, loaded_at FROM _pairs_staging"
        )
        con.unregister("_pairs_staging")
        con.execute("DELETE FROM quarantine")
        con.register("_quarantine_staging", quarantine_table)
        con.execute("INSERT INTO quarantine SELECT * FROM _quarantine_staging")
        con.unregister("_quarantine_staging")
    train = sum(1 for row in pair_rows if row["split"] == "train")
    return PairsWriteSummary(
        pairs=len(pair_rows), train=train, eval=len(pair_rows) - train, quarantined=len(result.quarantined)
    )


def read_pairs(con: duckdb.DuckDBPyConnection, split: str | None = None) -> list[PreferencePair]:
    query = "SELECT pair_id, prompt, chosen, rejected, source, meta_json FROM preference_pairs"
    params: list[Any] = []
    if split is not None:
        query += " WHERE split = ?"
        params.append(split)
    query += " ORDER BY pair_id"
    columns = ["pair_id", "prompt", "chosen", "rejected", "source", "meta_json"]
    return [
        PreferencePair.from_row(dict(zip(columns, row, strict=True)))
        for row in con.execute(query, params).fetchall()
    ]


def read_pairs_at(path: str | Path, split: str | None = None) -> list[PreferencePair]:
    """read_pairs from the DuckDB file at `path`, opened read-only for this read and closed after it."""
    con = connect(path, read_only=True)
    try:
        return read_pairs(con, split)
    finally:
        con.close()


def pairs_digest(con: duckdb.DuckDBPyConnection) -> str:
    """Which pairs are stored and in which split: the lineage key of everything downstream."""
    return table_digest(con, "SELECT pair_id, split FROM preference_pairs")


def pair_count(con: duckdb.DuckDBPyConnection, split: str | None = None) -> int:
    if split is None:
        return con.execute("SELECT count(*) FROM preference_pairs").fetchone()[0]
    return con.execute("SELECT count(*) FROM preference_pairs WHERE split = ?", [split]).fetchone()[0]


def set_eval_split(con: duckdb.DuckDBPyConnection, eval_ids: set[str]) -> None:
    """Exactly these pairs become eval pairs (the others keep their split): for a benchmark that fixes it."""
    with connection.transaction(con):
        con.register("_eval_ids", pa.table({"pair_id": sorted(eval_ids)}))
        con.execute(
            "UPDATE preference_pairs SET split = 'eval' WHERE pair_id IN (SELECT pair_id FROM _eval_ids)"
        )
        con.unregister("_eval_ids")


def first_pairs(con: duckdb.DuckDBPyConnection, limit: int) -> list[tuple[str, str, str, str, str]]:
    """(pair_id, split, prompt, chosen, rejected) of the first pairs by id: a preview."""
    return con.execute(
        "SELECT pair_id, split, prompt, chosen, rejected FROM preference_pairs ORDER BY pair_id LIMIT ?",
        [limit],
    ).fetchall()


def first_quarantined(con: duckdb.DuckDBPyConnection, limit: int) -> list[tuple[str, int, str, str]]:
    """(source, line_1based, reason, detail) of the first quarantined rows: a preview."""
    return con.execute(
        "SELECT source, line_1based, reason, detail FROM quarantine ORDER BY source, line_1based LIMIT ?",
        [limit],
    ).fetchall()


def quarantine_reasons(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return dict(con.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())


@dataclass(frozen=True)
class PairsValidity:
    pairs: int
    empty_text: int
    chosen_equals_rejected: int

    @property
    def valid(self) -> bool:
        return self.pairs > 0 and self.empty_text == 0 and self.chosen_equals_rejected == 0


def pairs_validity(con: duckdb.DuckDBPyConnection) -> PairsValidity:
    empty, identical, total = con.execute(
        """
        SELECT count(*) FILTER (WHERE trim(prompt) = '' OR trim(chosen) = '' OR trim(rejected) = ''),
               count(*) FILTER (WHERE trim(chosen) = trim(rejected)),
               count(*)
        FROM preference_pairs
        """
    ).fetchone()
    return PairsValidity(pairs=total, empty_text=empty, chosen_equals_rejected=identical)


def train_pairs_frame(con: duckdb.DuckDBPyConnection) -> Any:
    """The train split as a pandas frame (for MLflow's dataset lineage)."""
    return con.execute(
        "SELECT pair_id, prompt, chosen, rejected, source FROM preference_pairs WHERE split = 'train' ORDER BY pair_id"
    ).df()
