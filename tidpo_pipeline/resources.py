"""Dagster resources: where state lives (data dir, DuckDB, MLflow) and the quality policy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import Field

from tidpo_core import store, tracking

DEFAULT_DATA_DIR = ".tidpo"


def default_data_dir() -> str:
    return os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR)


class TidpoStorage(dg.ConfigurableResource):
    """The one data directory: DuckDB file, MLflow store, model folders, inbox for new data files."""

    data_dir: str = Field(default_factory=default_data_dir, description="Root of all tidpo state")

    @property
    def root(self) -> Path:
        path = Path(self.data_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def duckdb_path(self) -> Path:
        return self.root / "tidpo.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def inbox_dir(self) -> Path:
        path = self.root / "inbox"
        path.mkdir(parents=True, exist_ok=True)
        return path


class TidpoDuckDB(DuckDBResource):
    """dagster-duckdb's resource, plus the tidpo schema on every connection."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with super().get_connection() as con:
            store.ensure_schema(con)
            yield con


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking: sqlite in the data dir by default (the registry needs a database), artifacts
    beside it, never ./mlruns."""

    tracking_uri: str = Field(default="", description="Empty: sqlite:///<data_dir>/mlflow.db")
    data_dir: str = Field(default_factory=default_data_dir)
    experiment: str = tracking.EXPERIMENT
    registered_model: str = tracking.REGISTERED_MODEL

    @property
    def uri(self) -> str:
        return self.tracking_uri or tracking.sqlite_tracking_uri(self.data_dir)

    def experiment_id(self) -> str:
        tracking.check_tracking(self.uri)
        artifacts = None if self.tracking_uri else tracking.artifact_root(self.data_dir)
        return tracking.ensure_experiment(self.uri, artifacts, self.experiment)


class QualityPolicy(dg.ConfigurableResource):
    """Thresholds of the asset checks and of the evaluation gate that guards the champion alias."""

    max_quarantine_share: float = 0.2
    gate_metric: str = "likelihood_win_rate"
    gate_margin: float = 0.0
    weight_mean_tolerance: float = 1e-3


def build_resources(data_dir: str | None = None) -> dict[str, object]:
    data_dir = data_dir or default_data_dir()
    storage = TidpoStorage(data_dir=data_dir)
    return {
        "storage": storage,
        "duckdb": TidpoDuckDB(database=str(Path(data_dir).resolve() / "tidpo.duckdb")),
        "mlflow_tracking": MlflowTracking(data_dir=data_dir),
        "quality": QualityPolicy(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
