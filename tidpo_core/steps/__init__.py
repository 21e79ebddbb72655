"""The pipeline's stages as plain functions: one per stage, Dagster-free.

Each takes plain arguments (settings dataclasses, a way to open the DuckDB file, the handles of the
stages before it) and returns a plain result. The Dagster assets are adapters around them (config in,
step call, metadata out), and the benchmarks and reliability checks call the same functions, so no
stage is written twice.

    pairs.ingest_pairs          sources -> preference_pairs + quarantine tables
    reference.build_reference   pairs -> the reference model folder (or a checked checkpoint)
    reward.train_reward         pairs + reference -> a Bradley-Terry reward model (GRPO's), registered
    anchors.sample_anchors      reference -> anchor_responses table
    weights.weigh_tokens        reference + anchors -> token_weights table
    policy.train_policy         everything above -> a trained, registered policy
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import duckdb

from tidpo_core import store


class OpenDb(Protocol):
    """Opens the DuckDB file for one unit of work (the Dagster resource's get_connection, or database_at).

    A Protocol rather than a `Callable[[], AbstractContextManager[DuckDBPyConnection]]` alias: building
    that alias at import keeps DuckDB's classes alive past interpreter shutdown, and DuckDB's bindings
    then print "nanobind: leaked ..." at the exit of every run (tests/test_exit.py).
    """

    def __call__(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...


def database_at(path: str | Path) -> OpenDb:
    """An OpenDb for scripts and benchmarks: a fresh connection per unit of work, closed after it."""

    @contextmanager
    def open_db() -> Iterator[duckdb.DuckDBPyConnection]:
        con = store.connect(path)
        try:
            yield con
        finally:
            con.close()

    return open_db


@dataclass(frozen=True)
class RunTracking:
    """Where a step logs its MLflow run: the store, the experiment, and the run's tags (Dagster's run id...)."""

    uri: str
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)


def log_to(log: Callable[[str], None] | None) -> Callable[[str], None]:
    return log if log is not None else (lambda message: None)


def settings_of(values: Any, cls: type) -> Any:
    """`cls` (a settings dataclass) built from the same-named attributes of `values` (a Dagster config)."""
    return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)})


def handle_of(value: Mapping[str, Any], cls: type) -> Any:
    """`cls` (a handle dataclass) from an asset's value (a dict); keys it does not know are left out, so a
    value stored by an older version still loads."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in value.items() if k in names})


def publish_pictures(paths: Iterable[Path], docs_dir: str) -> None:
    """Copy the PNGs among `paths` to <docs_dir>/img/ (the README's pictures); nothing without a docs_dir."""
    if not docs_dir:
        return
    img = Path(docs_dir) / "img"
    img.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path.suffix == ".png":
            shutil.copyfile(path, img / path.name)
