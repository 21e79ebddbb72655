"""The data directory's layout: every file and folder tidpo keeps, named here only.

<data_dir>/
    tidpo.duckdb          pairs, quarantine, anchors, token weights, metrics, champion history
    mlflow.db             MLflow's tracking store and model registry (sqlite; the default)
    mlartifacts/          MLflow's artifacts (models, reports)
    models/               model folders: reference/, contrastive/<key>/, reward/<key>/, policy/<run key>/, comparison/<id>/
    evaluation/<run id>/  the evaluation's pictures and files
    inbox/                data files dropped here are loaded with the configured source
    precompute/<kind>/<fingerprint>/
                          a sharded precompute (anchors, weights) in flight: its plan and the finished
                          shards' Parquet files; removed once the shards are loaded into DuckDB
    .lock, .lock.d/       the run lock (one run at a time per data directory)
    registry.lock         serializes moves of the champion alias
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATABASE_FILE = "tidpo.duckdb"
TRACKING_STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODELS_DIR = "models"
EVALUATION_DIR = "evaluation"
INBOX_DIR = "inbox"
PRECOMPUTE_DIR = "precompute"
LOCK_FILE = ".lock"  # a mutex around the run files below, held for milliseconds
RUNS_DIR = ".lock.d"  # <run_id>.lock: one file per run that holds the data dir
REGISTRY_LOCK_FILE = "registry.lock"


@dataclass(frozen=True)
class DataDir:
    """Paths inside one data directory (nothing is created until a caller asks for a folder)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> DataDir:
        return cls(Path(path).resolve())

    @property
    def database(self) -> Path:
        return self.root / DATABASE_FILE

    @property
    def tracking_store(self) -> Path:
        return self.root / TRACKING_STORE_FILE

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_store}"

    @property
    def artifacts(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def models(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def reference_model(self) -> Path:
        return self.models / "reference"

    @property
    def imported_models(self) -> Path:
        """HF folders converted from GGUF checkpoints, one per file fingerprint (modeling.import_gguf)."""
        return self.models / "imported"

    def contrastive_models(self, fingerprint: str) -> Path:
        return self.models / "contrastive" / fingerprint

    def reward_model(self, fingerprint: str) -> Path:
        """A Bradley-Terry reward model (the GRPO baseline's reward), keyed by its pairs, reference and settings."""
        return self.models / "reward" / fingerprint

    def policy_run(self, run_key: str) -> Path:
        return self.models / "policy" / run_key

    def comparison_run(self, comparison_id: str) -> Path:
        return self.models / "comparison" / comparison_id

    def evaluation(self, run_id: str) -> Path:
        return self.root / EVALUATION_DIR / run_id

    @property
    def inbox(self) -> Path:
        return self.root / INBOX_DIR

    def precompute(self, kind: str, fingerprint: str) -> ShardDir:
        """The folder of one sharded precompute (`kind`: anchors or weights) under one fingerprint."""
        return ShardDir(self.root / PRECOMPUTE_DIR / kind / fingerprint)


@dataclass(frozen=True)
class ShardDir:
    """One sharded precompute's folder: the plan every process reads, and one Parquet file per finished shard.

    A shard is written under a temporary name and renamed when complete, so a file with the final name is
    always whole; a temporary file is what a killed process left and is never read.
    """

    root: Path

    @property
    def plan(self) -> Path:
        """What to compute and how: kind, fingerprint, settings, shard size (JSON)."""
        return self.root / "plan.json"

    @property
    def items(self) -> Path:
        """The pending work items in plan order (Parquet): shard i is rows [i * size, (i + 1) * size)."""
        return self.root / "items.parquet"

    def shard(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.parquet"

    def temporary(self, index: int, writer: str) -> Path:
        """Where `writer` (a process) writes shard `index` before renaming it."""
        return self.root / f".shard-{index:05d}.parquet.{writer}.tmp"

    def temporaries(self) -> list[Path]:
        return sorted(self.root.glob(".shard-*.tmp"))


@dataclass(frozen=True)
class RunDir:
    """One training run's folder (a policy run, or one method and seed of a comparison)."""

    root: Path

    @property
    def train_config(self) -> Path:
        """The TrainConfig the training process reads (YAML)."""
        return self.root / "train.yaml"

    @property
    def summary(self) -> Path:
        """Written by the training process when it finishes: steps, losses, history, the final model's path."""
        return self.root / "summary.json"

    @property
    def failure(self) -> Path:
        """Why the training process failed, in one paragraph (written before it exits non-zero)."""
        return self.root / "failure.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.root / "final"

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run this folder's training logs to (a resumed run keeps it)."""
        return self.root / "mlflow_run.json"
