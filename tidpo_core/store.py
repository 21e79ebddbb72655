"""DuckDB storage for pairs, quarantine, anchors, token weights and evaluation metrics.

Every writer replaces or appends its rows inside one transaction, so a crash mid-write leaves the
previous state intact and re-running a step never duplicates rows. Functions take an open DuckDB
connection; opening and locking the file is the caller's business (Dagster's DuckDBResource, or
`connect` below for scripts and the training process).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidpo_core.data import LoadResult, PreferencePair, assign_split

# The data directory's DuckDB file: named here only.
DATABASE_FILE = "tidpo.duckdb"

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
"""

SIDES = ("chosen", "rejected", "anchor")


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
    columns = {row[0] for row in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'quarantine'").fetchall()}
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


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# --- pairs and quarantine -------------------------------------------------------------------------


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
    now = _now()
    pair_rows = [
        {**pair.to_row(), "split": assign_split(pair.pair_id, eval_fraction), "loaded_at": now}
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
                "loaded_at": now,
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
    with transaction(con):
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
    return [PreferencePair.from_row(dict(zip(columns, row, strict=True))) for row in con.execute(query, params).fetchall()]


def table_digest(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> str:
    """A content digest of a query result, order-independent; used for lineage and change detection."""
    row = con.execute(f"SELECT count(*), coalesce(bit_xor(hash(t)), 0) FROM ({query}) t", list(params)).fetchone()
    assert row is not None
    return f"{row[0]}-{int(row[1]) & 0xFFFFFFFFFFFFFFFF:016x}"


# --- anchors ----------------------------------------------------------------------------------------


def missing_anchor_pair_ids(con: duckdb.DuckDBPyConnection, fingerprint: str, split: str = "train") -> list[str]:
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
            "created_at": pa.array([_now()] * len(anchors), pa.timestamp("us")),
        }
    )
    with transaction(con):
        con.register("_anchor_staging", table)
        con.execute("INSERT OR REPLACE INTO anchor_responses SELECT * FROM _anchor_staging")
        con.unregister("_anchor_staging")
    return len(anchors)


def read_anchors(con: duckdb.DuckDBPyConnection, fingerprint: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT pair_id, anchor FROM anchor_responses WHERE fingerprint = ?", [fingerprint]
    ).fetchall()
    return dict(rows)


# --- token weights ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightRequest:
    """One response whose token weights are wanted: identified by pair, side and text digest."""

    pair_id: str
    side: str
    text_digest: str


def existing_weight_keys(con: duckdb.DuckDBPyConnection, fingerprint: str) -> set[tuple[str, str, str]]:
    rows = con.execute(
        "SELECT DISTINCT pair_id, side, text_digest FROM token_weights WHERE fingerprint = ?", [fingerprint]
    ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def write_token_weights(con: duckdb.DuckDBPyConnection, fingerprint: str, rows: Iterable[dict[str, Any]]) -> int:
    """Replace the weights of every (pair, side) present in `rows`, in one transaction.

    Each row is one response: pair_id, side, text_digest and equal-length lists token_ids,
    attribution, prior, weight, reference_logp; optionally reference_topk_ids and reference_topk_logp,
    [tokens, k] arrays (the reference's top-k next-token distribution; NULL where absent).
    """
    topk_ids: list[np.ndarray] = []
    topk_logp: list[np.ndarray] = []
    topk_lengths: list[np.ndarray] = []
    columns: dict[str, list[Any]] = {
        k: []
        for k in (
            "pair_id",
            "side",
            "text_digest",
            "position",
            "token_id",
            "attribution",
            "prior",
            "weight",
            "reference_logp",
        )
    }
    keys: list[tuple[str, str]] = []
    for row in rows:
        n = len(row["token_ids"])
        keys.append((row["pair_id"], row["side"]))
        columns["pair_id"].extend([row["pair_id"]] * n)
        columns["side"].extend([row["side"]] * n)
        columns["text_digest"].extend([row["text_digest"]] * n)
        columns["position"].extend(range(n))
        for name, key in (
            ("token_id", "token_ids"),
            ("attribution", "attribution"),
            ("prior", "prior"),
            ("weight", "weight"),
            ("reference_logp", "reference_logp"),
        ):
            values = list(map(float, row[key])) if name != "token_id" else list(map(int, row[key]))
            if len(values) != n:
                raise ValueError(f"{key} has {len(values)} values for {n} tokens ({row['pair_id']}/{row['side']})")
            columns[name].extend(values)
        ids, logp = row.get("reference_topk_ids"), row.get("reference_topk_logp")
        if ids is None:
            topk_lengths.append(np.full(n, -1, dtype=np.int64))
        else:
            ids, logp = np.asarray(ids, dtype=np.int32), np.asarray(logp, dtype=np.float32)
            if ids.ndim != 2 or ids.shape[0] != n or logp.shape != ids.shape:
                raise ValueError(
                    f"reference top-k of {row['pair_id']}/{row['side']} must be two [{n}, k] arrays, "
                    f"got {ids.shape} and {logp.shape}"
                )
            topk_ids.append(ids.reshape(-1))
            topk_logp.append(logp.reshape(-1))
            topk_lengths.append(np.full(n, ids.shape[1], dtype=np.int64))
    if not keys:
        return 0
    # One list per token row, built from flat values and offsets (NULL for rows without a cache).
    lengths = np.concatenate(topk_lengths)
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))]).astype(np.int32))
    null = pa.array(lengths < 0)
    flat_ids = pa.array(np.concatenate(topk_ids) if topk_ids else np.zeros(0, np.int32))
    flat_logp = pa.array(np.concatenate(topk_logp) if topk_logp else np.zeros(0, np.float32))
    table = pa.table(
        {
            "fingerprint": [fingerprint] * len(columns["pair_id"]),
            **{k: v for k, v in columns.items() if k not in ("attribution", "prior", "weight", "reference_logp")},
            **{k: pa.array(columns[k], pa.float32()) for k in ("attribution", "prior", "weight", "reference_logp")},
            "reference_topk_ids": pa.ListArray.from_arrays(offsets, flat_ids, mask=null),
            "reference_topk_logp": pa.ListArray.from_arrays(offsets, flat_logp, mask=null),
        }
    )
    key_table = pa.table({"pair_id": [k[0] for k in keys], "side": [k[1] for k in keys]})
    with transaction(con):
        con.register("_weight_keys", key_table)
        con.execute(
            "DELETE FROM token_weights WHERE fingerprint = ? AND (pair_id, side) IN "
            "(SELECT (pair_id, side) FROM _weight_keys)",
            [fingerprint],
        )
        con.unregister("_weight_keys")
        con.register("_weight_staging", table)
        con.execute(
            "INSERT INTO token_weights SELECT fingerprint, pair_id, side, text_digest, position, token_id, "
            "attribution, prior, weight, reference_logp, reference_topk_ids, reference_topk_logp FROM _weight_staging"
        )
        con.unregister("_weight_staging")
    return len(keys)


@dataclass(frozen=True)
class StoredWeights:
    """One response's stored rows in position order, as numpy arrays (int32 ids, float32 values)."""

    token_ids: np.ndarray
    attribution: np.ndarray
    prior: np.ndarray
    weight: np.ndarray
    reference_logp: np.ndarray
    reference_topk_ids: np.ndarray | None = None
    """[tokens, k] int32, when read with_reference_topk and stored."""
    reference_topk_logp: np.ndarray | None = None


def _weight_rows(
    con: duckdb.DuckDBPyConnection,
    query: str,
    fingerprint: str,
    pair_ids: Sequence[str] | None,
    pair_id_range: tuple[str, str] | None,
    tail: str,
) -> pa.Table:
    """`query` (token_weights rows of one fingerprint) narrowed to the pairs asked for, as Arrow."""
    params: list[Any] = [fingerprint]
    if pair_ids is not None:
        con.register("_wanted_pairs", pa.table({"pair_id": list(pair_ids)}))
        query += " AND pair_id IN (SELECT pair_id FROM _wanted_pairs)"
    if pair_id_range is not None:
        query += " AND pair_id BETWEEN ? AND ?"
        params += list(pair_id_range)
    try:
        with warnings.catch_warnings():
            # DuckDB suggests con.sql(...) to save a copy, but a parameterised con.sql leaves the result
            # pending on the connection; the copy of one chunk of rows is the cheaper problem.
            warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
            return con.execute(query + tail, params).to_arrow_table()
    finally:
        if pair_ids is not None:
            con.unregister("_wanted_pairs")


def read_token_weights(
    con: duckdb.DuckDBPyConnection,
    fingerprint: str,
    pair_ids: Sequence[str] | None = None,
    *,
    pair_id_range: tuple[str, str] | None = None,
    with_reference_topk: bool = False,
) -> dict[tuple[str, str], StoredWeights]:
    """All weights of a fingerprint in one query, grouped per (pair_id, side) in position order.

    `pair_ids` keeps only those pairs; `pair_id_range` (first, last), inclusive, keeps a range of ids,
    which DuckDB filters far faster than a list (a chunked reader walks sorted ids range by range).

    Fetched as Arrow and sliced into numpy views: turning millions of values into Python floats was
    most of the cost of the read and of the training process's memory.

    `with_reference_topk` also attaches the reference top-k cache of the chosen and rejected sides
    (what SeqKL needs; see _attach_reference_topk).
    """
    query = """
        SELECT pair_id, side,
               list(token_id ORDER BY position), list(attribution ORDER BY position),
               list(prior ORDER BY position), list(weight ORDER BY position),
               list(reference_logp ORDER BY position)
        FROM token_weights WHERE fingerprint = ?
    """
    table = _weight_rows(con, query, fingerprint, pair_ids, pair_id_range, " GROUP BY pair_id, side")
    keys = list(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    columns = []
    for index in range(2, 7):
        lists = table.column(index).combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy(zero_copy_only=False)
        columns.append([values[offsets[i] : offsets[i + 1]] for i in range(len(keys))])
    weights = {key: StoredWeights(*(column[i] for column in columns)) for i, key in enumerate(keys)}
    if with_reference_topk:
        _attach_reference_topk(con, fingerprint, weights, pair_ids, pair_id_range)
    return weights


# SeqKL runs over these sides only; the token_weights asset stores no cache for anchors.
REFERENCE_TOPK_SIDES = ("chosen", "rejected")


def _attach_reference_topk(
    con: duckdb.DuckDBPyConnection,
    fingerprint: str,
    weights: dict[tuple[str, str], StoredWeights],
    pair_ids: Sequence[str] | None,
    pair_id_range: tuple[str, str] | None,
) -> None:
    """Put the reference top-k cache (ids and log-probs, [tokens, k]) into the chosen and rejected
    entries of `weights`, read with the same filters.

    The rows come in (pair, side, position) order as two flat arrays, cut at the token counts the
    weights already hold: a per-response list aggregate of k-wide lists took 3x as long. A response
    stored without a cache is an error naming the fix.
    """
    query = (
        "SELECT reference_topk_ids, reference_topk_logp FROM token_weights "
        f"WHERE fingerprint = ? AND side IN {REFERENCE_TOPK_SIDES}"
    )
    table = _weight_rows(con, query, fingerprint, pair_ids, pair_id_range, " ORDER BY pair_id, side, position")
    keys = sorted(key for key in weights if key[1] in REFERENCE_TOPK_SIDES)
    ids_column, logp_column = (table.column(i).combine_chunks() for i in (0, 1))
    if ids_column.null_count or logp_column.null_count:
        raise ValueError(
            f"{ids_column.null_count} tokens of token weights {fingerprint!r} have no reference top-k cache: "
            "materialize token_weights with reference_kl_top_k > 0 for reference_kl: cached"
        )
    if not keys:
        return
    lengths = pc.list_value_length(ids_column)
    k = pc.min(lengths).as_py()
    if k != pc.max(lengths).as_py() or not pc.all(pc.equal(lengths, pc.list_value_length(logp_column))).as_py():
        raise ValueError(f"token weights {fingerprint!r} mix reference top-k sizes; re-materialize token_weights")
    ids = ids_column.values.to_numpy(zero_copy_only=False).reshape(-1, k)
    logp = logp_column.values.to_numpy(zero_copy_only=False).reshape(-1, k)
    counts = np.fromiter((len(weights[key].token_ids) for key in keys), dtype=np.int64, count=len(keys))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    if bounds[-1] != len(ids):
        raise ValueError(f"token weights {fingerprint!r}: {len(ids)} cached tokens for {bounds[-1]} weighted tokens")
    for key, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True):
        weights[key] = dataclasses.replace(weights[key], reference_topk_ids=ids[a:b], reference_topk_logp=logp[a:b])


# --- contrastive models (the `contrastive` importance estimator) ---------------------------------------


def record_contrastive_models(
    con: duckdb.DuckDBPyConnection,
    fingerprint: str,
    reference_fingerprint: str,
    paths: Sequence[str],
    recipe: dict[str, Any],
) -> None:
    positive, negative = (str(p) for p in paths)
    with transaction(con):
        con.execute("DELETE FROM contrastive_models WHERE fingerprint = ?", [fingerprint])
        con.execute(
            "INSERT INTO contrastive_models VALUES (?, ?, ?, ?, ?, ?)",
            [fingerprint, reference_fingerprint, positive, negative, json.dumps(recipe, sort_keys=True), _now()],
        )


def latest_contrastive_models(con: duckdb.DuckDBPyConnection, reference_fingerprint: str) -> tuple[str, str] | None:
    """Paths (positive, negative) of the newest contrastive pair trained for this reference, if any."""
    row = con.execute(
        "SELECT positive_path, negative_path FROM contrastive_models WHERE reference_fingerprint = ? "
        "ORDER BY created_at DESC LIMIT 1",
        [reference_fingerprint],
    ).fetchone()
    return None if row is None else (row[0], row[1])


# --- evaluation -------------------------------------------------------------------------------------


def write_metrics(
    con: duckdb.DuckDBPyConnection, mlflow_run_id: str, metrics_by_model: dict[str, dict[str, float]]
) -> int:
    now = _now()
    rows = [
        (mlflow_run_id, model, metric, float(value), now)
        for model, metrics in metrics_by_model.items()
        for metric, value in metrics.items()
    ]
    with transaction(con):
        con.execute("DELETE FROM evaluation_metrics WHERE mlflow_run_id = ?", [mlflow_run_id])
        con.executemany("INSERT INTO evaluation_metrics VALUES (?, ?, ?, ?, ?)", rows)
    return len(rows)


def record_evaluation_pairs(con: duckdb.DuckDBPyConnection, mlflow_run_id: str, pair_ids: Sequence[str]) -> None:
    """The held-out pairs a version was judged on, so a later challenger can say how many it shares."""
    with transaction(con):
        con.execute("DELETE FROM evaluation_pairs WHERE mlflow_run_id = ?", [mlflow_run_id])
        con.executemany("INSERT INTO evaluation_pairs VALUES (?, ?)", [(mlflow_run_id, p) for p in pair_ids])


def shared_evaluation_pairs(con: duckdb.DuckDBPyConnection, mlflow_run_id: str, pair_ids: Sequence[str]) -> tuple[int, int]:
    """(shared, new): how many of `pair_ids` the run `mlflow_run_id` was also judged on, and how many not."""
    earlier = {row[0] for row in con.execute("SELECT pair_id FROM evaluation_pairs WHERE mlflow_run_id = ?", [mlflow_run_id]).fetchall()}
    shared = sum(1 for p in pair_ids if p in earlier)
    return shared, len(pair_ids) - shared


# --- champion history ------------------------------------------------------------------------------------


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
        [event.registered_model, event.version, event.event, event.previous_champion, event.compared_with, event.reason, event.recorded_at or _now()],
    )


def champion_history(con: duckdb.DuckDBPyConnection, registered_model: str) -> list[ChampionEvent]:
    rows = con.execute(
        "SELECT registered_model, version, event, previous_champion, compared_with, reason, recorded_at FROM champion_history "
        "WHERE registered_model = ? ORDER BY recorded_at, rowid",
        [registered_model],
    ).fetchall()
    return [ChampionEvent(*row) for row in rows]
