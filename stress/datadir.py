"""Reading what a run left in its data dir: DuckDB rows, the MLflow registry, the trained policy, and how
they compare with an uninterrupted run's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def read_db(data_dir: Path) -> Iterator[Any]:
    from tidpo_core import store

    con = store.connect(data_dir / store.DATABASE_FILE, read_only=True)
    try:
        yield con
    finally:
        con.close()


def db_contents(data_dir: Path) -> dict[str, Any]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.contents(con)


def integrity_problems(data_dir: Path) -> dict[str, int]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.integrity_problems(con)


def table_counts(data_dir: Path) -> dict[str, int]:
    from tidpo_core import store

    with read_db(data_dir) as con:
        return store.table_counts(con)


def registry(data_dir: Path) -> dict[str, Any]:
    from tidpo_core.runtime import tracking

    uri = tracking.sqlite_tracking_uri(data_dir)
    versions = []
    with contextlib.suppress(Exception):
        for v in tracking.model_versions(uri):
            versions.append(
                {"version": int(v.version), "run_id": v.run_id, "status": v.status, "tags": dict(v.tags)}
            )
    info = tracking.champion(uri)
    runs = [(r.info.run_id, r.info.run_name, r.info.status) for r in tracking.experiment_runs(uri)]
    return {
        "versions": sorted(versions, key=lambda v: v["version"]),
        "champion": info.version if info else None,
        "runs": runs,
    }


def final_model(data_dir: Path) -> dict[str, Any]:
    """The weights of the newest trained policy folder (models/policy/<run>/final)."""
    from safetensors.torch import load_file

    finals = sorted(
        (data_dir / "models" / "policy").glob("*/final/model.safetensors"), key=lambda p: p.stat().st_mtime
    )
    return load_file(finals[-1]) if finals else {}


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if set(a) != set(b) or not a:
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def weights_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for key in a:
        if a[key][0] != b[key][0]:
            return float("inf")
        for x, y in zip(a[key][1] + a[key][2], b[key][1] + b[key][2], strict=True):
            worst = max(worst, abs(x - y))
    return worst


def metrics_diff(a: list[tuple], b: list[tuple]) -> float:
    left, right = {(m, k): v for m, k, v in a}, {(m, k): v for m, k, v in b}
    if set(left) != set(right):
        return float("inf")
    return max(
        (abs(left[k] - right[k]) for k in left if left[k] == left[k] and right[k] == right[k]), default=0.0
    )


@dataclass(frozen=True)
class Baseline:
    """An uninterrupted whole-graph run: its data dir, stored rows, final policy, time and row counts."""

    data_dir: Path
    contents: dict[str, Any]
    model: dict[str, Any]
    seconds: float
    counts: dict[str, int]


def compare_to_baseline(data_dir: Path, baseline: Baseline) -> dict[str, Any]:
    """How the rows, weights, policy and metrics in `data_dir` differ from the uninterrupted run's."""
    expected = baseline.contents
    got = db_contents(data_dir)
    problems = integrity_problems(data_dir)
    pairs_lost = len(set(expected["pairs"]) - set(got["pairs"]))
    anchors_lost = len(set(expected["anchors"]) - set(got["anchors"]))
    weights_lost = len(set(expected["weights"]) - set(got["weights"]))
    return {
        "pairs_equal": got["pairs"] == expected["pairs"],
        "anchors_equal": got["anchors"] == expected["anchors"],
        "weights_max_abs_diff": weights_diff(got["weights"], expected["weights"]),
        "policy_max_abs_diff": max_abs_diff(final_model(data_dir), baseline.model),
        "metrics_max_abs_diff": metrics_diff(got["metrics"], expected["metrics"]),
        "rows_lost": pairs_lost + anchors_lost + weights_lost,
        "rows_extra": (len(got["pairs"]) - len(expected["pairs"]) + pairs_lost)
        + (len(got["anchors"]) - len(expected["anchors"]) + anchors_lost)
        + (len(got["weights"]) - len(expected["weights"]) + weights_lost),
        "integrity_problems": {k: v for k, v in problems.items() if v},
    }


def stores_readable(data_dir: Path) -> dict[str, Any]:
    """Whether DuckDB and MLflow still open after the runs, with their counts and consistency."""
    out: dict[str, Any] = {}
    try:
        out["integrity_problems"] = {k: v for k, v in integrity_problems(data_dir).items() if v}
        out["counts"] = table_counts(data_dir)
        out["duckdb_readable"] = True
    except Exception as exc:  # noqa: BLE001
        out["duckdb_readable"] = f"{type(exc).__name__}: {exc}"
    try:
        reg = registry(data_dir)
        out["mlflow_readable"] = True
        run_status = {r[0]: r[2] for r in reg["runs"]}
        out["versions"] = len(reg["versions"])
        out["versions_with_unfinished_run"] = sum(
            1 for v in reg["versions"] if run_status.get(v["run_id"]) != "FINISHED"
        )
        out["champion"] = reg["champion"]
    except Exception as exc:  # noqa: BLE001
        out["mlflow_readable"] = f"{type(exc).__name__}: {exc}"
    return out
