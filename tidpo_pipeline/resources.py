"""Dagster resources: where state lives (data dir, DuckDB, MLflow) and the quality rules."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import ConfigDict, Field, PrivateAttr

from tidpo_core import store
from tidpo_core.runtime import threads, tracking
from tidpo_core.runtime.layout import DataDir
from tidpo_core.runtime.lock import DataDirLock
from tidpo_core.steps.evaluate import GateRule
from tidpo_pipeline.config_from_core import config_class, core_fields

DEFAULT_DATA_DIR = ".tidpo"


def default_data_dir() -> str:
    return os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR)


class TidpoStorage(dg.ConfigurableResource):
    """The one data directory: DuckDB file, MLflow store, model folders, inbox for new data files."""

    data_dir: str = Field(default_factory=default_data_dir, description="Root of all tidpo state")

    @property
    def layout(self) -> DataDir:
        layout = DataDir.at(self.data_dir)
        layout.root.mkdir(parents=True, exist_ok=True)
        return layout

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def duckdb_path(self) -> Path:
        return self.layout.database

    @property
    def models_dir(self) -> Path:
        return self.layout.models

    @property
    def inbox_dir(self) -> Path:
        path = self.layout.inbox
        path.mkdir(parents=True, exist_ok=True)
        return path


class TidpoDuckDB(DuckDBResource):
    """dagster-duckdb's resource, plus the tidpo schema on every connection and the data dir's run lock.

    The lock (DataDirLock) is taken when Dagster sets the resource up and released at teardown: once
    for the whole run under the in-process executor (`dagster.materialize`, `make run`), by each step
    process under the multiprocess one (`dagster dev`, `dagster job execute`), where the steps of one
    run share it.
    """

    lock_timeout_s: float = Field(
        default=0.0, description="Seconds to wait for another run's lock on the data dir; 0 fails fast"
    )
    connect_timeout_s: float = Field(
        default=60.0,
        description="Seconds to retry while another process (a notebook, a reader) has the DuckDB file open",
    )
    _lock: DataDirLock | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.database == ":memory:":
            return
        run = context.run
        holder = {"run_id": run.run_id, "job": run.job_name} if run is not None else {}
        self._lock = DataDirLock(Path(self.database).parent, holder, self.lock_timeout_s).acquire()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _connect(self) -> duckdb.DuckDBPyConnection:
        config = {"custom_user_agent": "dagster", **self.connection_config}
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                return duckdb.connect(self.database, read_only=False, config=config)
            except duckdb.IOException as exc:
                # Another process has the file open (DuckDB names it): a reader that will let go soon.
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"cannot open {self.database} for writing after {self.connect_timeout_s:g} s: {exc}"
                    ) from exc
                time.sleep(0.2)

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        # Opened here rather than through DuckDBResource.get_connection, which leaves the connection
        # (and DuckDB's file lock) open when the body raises.
        con = self._connect()
        try:
            store.ensure_schema(con)
            yield con
        finally:
            con.close()


class ComputeThreads(dg.ConfigurableResource):
    """The thread plan of the steps that run a model (tidpo_core.runtime.threads): automatic by default (one
    thread for a small model, one per usable CPU for a large one); `num_threads` fixes the count, for the
    step's process and the training processes it starts (as TIDPO_NUM_THREADS does)."""

    num_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads per process; 0: decided per model by the thread plan",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.num_threads > 0:
            os.environ[threads.NUM_THREADS_ENV] = str(self.num_threads)
        threads.requested_threads()  # a bad TIDPO_NUM_THREADS fails here, naming the variable


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


class QualityThresholds(dg.ConfigurableResource):
    """Thresholds of the asset checks and of the evaluation gate that guards the champion alias."""

    model_config = ConfigDict(**dg.ConfigurableResource.model_config, use_attribute_docstrings=True)

    max_quarantine_share: float = 0.2
    weight_mean_tolerance: float = 1e-3


# The gate's fields are tidpo_core's GateRule, declared once.
QualityRules = config_class(
    "QualityRules", QualityThresholds.__doc__ or "", QualityThresholds, core_fields(GateRule)
)


def build_resources(data_dir: str | None = None) -> dict[str, object]:
    data_dir = data_dir or default_data_dir()
    storage = TidpoStorage(data_dir=data_dir)
    return {
        "storage": storage,
        "duckdb": TidpoDuckDB(database=str(DataDir.at(data_dir).database)),
        "mlflow_tracking": MlflowTracking(data_dir=data_dir),
        "quality": QualityRules(),
        "compute": ComputeThreads(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        # Named explicitly: Dagster's implicit default (fs_io_manager) warns that it is superseded by this.
        "io_manager": dg.FilesystemIOManager(),
    }
