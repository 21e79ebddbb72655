"""Token weights: one row per response token (importance, prior, weight, reference log-prob, and
optionally the reference's top-k next tokens), under the weighing settings' fingerprint."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidpo_core.store import connection


def existing_weight_keys(con: duckdb.DuckDBPyConnection, fingerprint: str) -> set[tuple[str, str, str]]:
    rows = con.execute(
        "SELECT DISTINCT pair_id, side, text_digest FROM token_weights WHERE fingerprint = ?", [fingerprint]
    ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def write_token_weights(
    con: duckdb.DuckDBPyConnection, fingerprint: str, rows: Iterable[dict[str, Any]]
) -> int:
    """Replace the weights of every (pair, side) present in `rows`, in one transaction.

    Each row is one response: pair_id, side, text_digest and equal-length lists token_ids,
    attribution, prior, weight, reference_logp; optionally reference_topk_ids and reference_topk_logp,
    [tokens, k] arrays (the reference's top-k next-token distribution; NULL where absent).
    """
    tokens = _TokenRows()
    for row in rows:
        tokens.add_response(row)
    if not tokens.keys:
        return 0
    _replace_weights(con, fingerprint, tokens.keys, tokens.table(fingerprint))
    return len(tokens.keys)


# The per-token float columns, stored as float32.
_VALUE_COLUMNS = ("attribution", "prior", "weight", "reference_logp")


class _TokenRows:
    """Responses (write_token_weights' rows) flattened into one row per token, as token_weights holds them."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []
        self.columns: dict[str, list[Any]] = {
            k: [] for k in ("pair_id", "side", "text_digest", "position", "token_id", *_VALUE_COLUMNS)
        }
        self.topk_ids: list[np.ndarray] = []
        self.topk_logp: list[np.ndarray] = []
        # Per token: the cache's k, or -1 for a response stored without one.
        self.topk_lengths: list[np.ndarray] = []

    def add_response(self, row: dict[str, Any]) -> None:
        n = len(row["token_ids"])
        self.keys.append((row["pair_id"], row["side"]))
        self.columns["pair_id"].extend([row["pair_id"]] * n)
        self.columns["side"].extend([row["side"]] * n)
        self.columns["text_digest"].extend([row["text_digest"]] * n)
        self.columns["position"].extend(range(n))
        for name, key in (("token_id", "token_ids"), *((name, name) for name in _VALUE_COLUMNS)):
            values = list(map(float, row[key])) if name != "token_id" else list(map(int, row[key]))
            if len(values) != n:
                raise ValueError(
                    f"{key} has {len(values)} values for {n} tokens ({row['pair_id']}/{row['side']})"
                )
            self.columns[name].extend(values)
        self._add_topk(row, n)

    def _add_topk(self, row: dict[str, Any], n: int) -> None:
        ids, logp = row.get("reference_topk_ids"), row.get("reference_topk_logp")
        if ids is None:
            self.topk_lengths.append(np.full(n, -1, dtype=np.int64))
            return
        ids, logp = np.asarray(ids, dtype=np.int32), np.asarray(logp, dtype=np.float32)
        if ids.ndim != 2 or ids.shape[0] != n or logp.shape != ids.shape:
            raise ValueError(
                f"reference top-k of {row['pair_id']}/{row['side']} must be two [{n}, k] arrays, "
                f"got {ids.shape} and {logp.shape}"
            )
        self.topk_ids.append(ids.reshape(-1))
        self.topk_logp.append(logp.reshape(-1))
        self.topk_lengths.append(np.full(n, ids.shape[1], dtype=np.int64))

    def table(self, fingerprint: str) -> pa.Table:
        """The token rows in token_weights' column order, fingerprint first."""
        # One list per token row, built from flat values and offsets (NULL for rows without a cache).
        lengths = np.concatenate(self.topk_lengths)
        offsets = pa.array(np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))]).astype(np.int32))
        null = pa.array(lengths < 0)
        flat_ids = pa.array(np.concatenate(self.topk_ids) if self.topk_ids else np.zeros(0, np.int32))
        flat_logp = pa.array(np.concatenate(self.topk_logp) if self.topk_logp else np.zeros(0, np.float32))
        return pa.table(
            {
                "fingerprint": [fingerprint] * len(self.columns["pair_id"]),
                **{k: v for k, v in self.columns.items() if k not in _VALUE_COLUMNS},
                **{k: pa.array(self.columns[k], pa.float32()) for k in _VALUE_COLUMNS},
                "reference_topk_ids": pa.ListArray.from_arrays(offsets, flat_ids, mask=null),
                "reference_topk_logp": pa.ListArray.from_arrays(offsets, flat_logp, mask=null),
            }
        )


def _replace_weights(
    con: duckdb.DuckDBPyConnection, fingerprint: str, keys: list[tuple[str, str]], table: pa.Table
) -> None:
    """Delete the stored weights of the (pair, side)s in `keys` and insert `table`, in one transaction."""
    key_table = pa.table({"pair_id": [k[0] for k in keys], "side": [k[1] for k in keys]})
    with connection.transaction(con):
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


# One row per response, the per-token values as lists: how a precompute shard holds weights.
WEIGHT_SHARD_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("side", pa.string()),
        ("text_digest", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("attribution", pa.list_(pa.float32())),
        ("prior", pa.list_(pa.float32())),
        ("weight", pa.list_(pa.float32())),
        ("reference_logp", pa.list_(pa.float32())),
        ("reference_topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("reference_topk_logp", pa.list_(pa.list_(pa.float32()))),
    ]
)


def _token_lists(values: Any, dtype: Any) -> list[list[Any]] | None:
    return None if values is None else np.asarray(values, dtype=dtype).tolist()


def weight_shard_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Responses' rows (write_token_weights' format) as one shard table (WEIGHT_SHARD_SCHEMA), values as
    float32 exactly as write_token_weights stores them."""
    columns: dict[str, list[Any]] = {name: [] for name in WEIGHT_SHARD_SCHEMA.names}
    for row in rows:
        n = len(row["token_ids"])
        for name in _VALUE_COLUMNS:
            if len(row[name]) != n:
                raise ValueError(
                    f"{name} has {len(row[name])} values for {n} tokens ({row['pair_id']}/{row['side']})"
                )
        for name in ("pair_id", "side", "text_digest"):
            columns[name].append(row[name])
        columns["token_ids"].append(np.asarray(row["token_ids"], dtype=np.int32).tolist())
        for name in _VALUE_COLUMNS:
            columns[name].append(np.asarray(row[name], dtype=np.float32).tolist())
        columns["reference_topk_ids"].append(_token_lists(row.get("reference_topk_ids"), np.int32))
        columns["reference_topk_logp"].append(_token_lists(row.get("reference_topk_logp"), np.float32))
    return pa.table(columns, schema=WEIGHT_SHARD_SCHEMA)


def load_weight_shards(con: duckdb.DuckDBPyConnection, fingerprint: str, files: Sequence[Path]) -> int:
    """Every shard file's responses (WEIGHT_SHARD_SCHEMA) into token_weights, one row per token, in one
    transaction, replacing the weights those (pair, side)s had; returns the responses loaded. DuckDB
    reads the files: one it cannot read fails the whole load, naming the file."""
    if not files:
        return 0
    paths = [str(f) for f in files]
    with connection.transaction(con):
        con.execute(
            "DELETE FROM token_weights WHERE fingerprint = ? AND (pair_id, side) IN "
            "(SELECT (pair_id, side) FROM read_parquet(?))",
            [fingerprint, paths],
        )
        # Unnests in one SELECT walk their lists together (a response's NULL top-k gives NULL per token).
        con.execute(
            """
            INSERT INTO token_weights
            SELECT ?, pair_id, side, text_digest, unnest(range(len(token_ids)))::INTEGER, unnest(token_ids),
                   unnest(attribution), unnest(prior), unnest(weight), unnest(reference_logp),
                   unnest(reference_topk_ids), unnest(reference_topk_logp)
            FROM read_parquet(?)
            """,
            [fingerprint, paths],
        )
        responses = con.execute("SELECT count(*) FROM read_parquet(?)", [paths]).fetchone()[0]
    return int(responses)


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
    table = _weight_rows(
        con, query, fingerprint, pair_ids, pair_id_range, " ORDER BY pair_id, side, position"
    )
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
    if (
        k != pc.max(lengths).as_py()
        or not pc.all(pc.equal(lengths, pc.list_value_length(logp_column))).as_py()
    ):
        raise ValueError(
            f"token weights {fingerprint!r} mix reference top-k sizes; re-materialize token_weights"
        )
    ids = ids_column.values.to_numpy(zero_copy_only=False).reshape(-1, k)
    logp = logp_column.values.to_numpy(zero_copy_only=False).reshape(-1, k)
    counts = np.fromiter((len(weights[key].token_ids) for key in keys), dtype=np.int64, count=len(keys))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    if bounds[-1] != len(ids):
        raise ValueError(
            f"token weights {fingerprint!r}: {len(ids)} cached tokens for {bounds[-1]} weighted tokens"
        )
    for key, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True):
        weights[key] = dataclasses.replace(
            weights[key], reference_topk_ids=ids[a:b], reference_topk_logp=logp[a:b]
        )


@dataclass(frozen=True)
class WeightsSummary:
    token_rows: int
    responses: int
    mean_attribution: float
    mean_weight: float


def weights_summary(con: duckdb.DuckDBPyConnection, fingerprint: str) -> WeightsSummary:
    rows, responses, attribution, weight = con.execute(
        "SELECT count(*), count(DISTINCT (pair_id, side)), avg(attribution), avg(weight) FROM token_weights WHERE fingerprint = ?",
        [fingerprint],
    ).fetchone()
    return WeightsSummary(rows, responses, float(attribution or 0.0), float(weight or 0.0))


@dataclass(frozen=True)
class WeightsValidity:
    non_finite_values: int
    max_abs_mean_weight_minus_1: float
    uncovered_responses: int


def weights_validity(
    con: duckdb.DuckDBPyConnection, fingerprint: str, anchors_fingerprint: str
) -> WeightsValidity:
    """Non-finite values, the worst per-response mean weight (should be 1), and train responses (chosen,
    rejected, anchor) that have no weights."""
    non_finite = con.execute(
        """SELECT count(*) FROM token_weights WHERE fingerprint = ? AND NOT (isfinite(weight)
           AND isfinite(attribution) AND isfinite(prior) AND isfinite(reference_logp))""",
        [fingerprint],
    ).fetchone()[0]
    worst_mean = con.execute(
        """SELECT coalesce(max(abs(m - 1)), 0) FROM (SELECT avg(weight) AS m FROM token_weights
           WHERE fingerprint = ? GROUP BY pair_id, side)""",
        [fingerprint],
    ).fetchone()[0]
    uncovered = con.execute(
        """
        WITH wanted AS (
            SELECT pair_id, s.side FROM preference_pairs, (VALUES ('chosen'), ('rejected')) s(side) WHERE split = 'train'
            UNION ALL
            SELECT a.pair_id, 'anchor' FROM anchor_responses a JOIN preference_pairs p USING (pair_id)
            WHERE a.fingerprint = ? AND p.split = 'train'
        )
        SELECT count(*) FROM wanted w WHERE NOT EXISTS (
            SELECT 1 FROM token_weights t WHERE t.fingerprint = ? AND t.pair_id = w.pair_id AND t.side = w.side)
        """,
        [anchors_fingerprint, fingerprint],
    ).fetchone()[0]
    return WeightsValidity(non_finite, float(worst_mean), uncovered)
