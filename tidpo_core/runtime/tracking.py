"""MLflow conventions of tidpo: one sqlite-backed store per data directory, a registered model with a
`champion` alias that only a model passing the evaluation gate receives, and a registered reward model
(`tidpo-reward`, the GRPO baseline's Bradley-Terry reward)."""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.layout import REGISTRY_LOCK_FILE, TRACKING_STORE_FILE, DataDir
from tidpo_core.runtime.quiet import MLFLOW_LOCAL_FOLDER_NOISE, without_log_messages

EXPERIMENT = "tidpo"
REGISTERED_MODEL = "tidpo-policy"
REWARD_MODEL = "tidpo-reward"
REWARD_ARTIFACT_PATH = "reward_model"  # the reward model's Hugging Face folder among its run's artifacts
CHAMPION_ALIAS = "champion"
STORE_FILE = TRACKING_STORE_FILE  # the sqlite tracking store inside a data directory
# Without explicit requirements mlflow infers them by importing the model's stack, torchvision
# included, which is absent (and broken beside this torch).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "safetensors", "accelerate"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def sqlite_tracking_uri(data_dir: str | Path) -> str:
    return DataDir.at(data_dir).tracking_uri


def artifact_root(data_dir: str | Path) -> str:
    return DataDir.at(data_dir).artifacts.as_uri()


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to one store for tracking AND registry: without registry_uri the client takes
    the process-global registry, which is whatever store the last `mlflow.set_tracking_uri` named."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class TrackingUnavailableError(RuntimeError):
    pass


# The probe's HTTP budget: MLflow's defaults (7 retries with exponential backoff, 120 s timeout) make
# an unreachable server look like a hang of about four minutes; the probe answers within seconds.
CHECK_HTTP_RETRIES = 0
CHECK_HTTP_TIMEOUT_S = 10


@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def check_tracking(tracking_uri: str) -> None:
    """Fail early and clearly when the tracking store cannot be reached, before expensive work.

    The probe runs without HTTP retries and with a short timeout; later calls keep MLflow's retries,
    which ride out a server that blips during a long run.
    """
    try:
        with _env(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(CHECK_HTTP_RETRIES),
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(CHECK_HTTP_TIMEOUT_S),
        ):
            client(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # the client raises many kinds, all mean "not reachable"
        detail = (str(exc).splitlines() or [""])[0][:400]
        raise TrackingUnavailableError(
            f"MLflow tracking store {tracking_uri!r} is not reachable ({type(exc).__name__}: {detail}); "
            "start the server or fix the mlflow_tracking resource's tracking_uri (empty: sqlite in the data dir)"
        ) from exc


def ensure_experiment(tracking_uri: str, artifact_location: str | None, name: str = EXPERIMENT) -> str:
    store = client(tracking_uri)
    experiment = store.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return store.create_experiment(name, artifact_location=artifact_location)


def _params(values: dict[str, Any]) -> list[Param]:
    # MLflow caps a parameter value at 6,000 characters; 500 keeps the UI's table readable.
    return [Param(key, str(value)[:500]) for key, value in values.items()]


def _finite_metrics(values: dict[str, float], step: int = 0) -> list[Metric]:
    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step) for key, value in values.items() if math.isfinite(float(value))
    ]


def start_run(
    tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> str:
    """A new run with its parameters; returns its id."""
    store = client(tracking_uri)
    run_id = store.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    store.log_batch(run_id, params=_params(params))
    return run_id


def run_status(tracking_uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED, KILLED, or DELETED (also for a run the store no longer has)."""
    try:
        return client(tracking_uri).get_run(run_id).info.status
    except MlflowException:
        return "DELETED"


def finish_run(tracking_uri: str, run_id: str, failed: bool = False) -> None:
    client(tracking_uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _log_in_batches(tracking_uri: str, run_id: str, metrics: list[Metric]) -> None:
    store = client(tracking_uri)
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1,000 metrics per batch
        store.log_batch(run_id, metrics=metrics[start : start + 900])


def log_metrics(tracking_uri: str, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Non-finite values are left out (MLflow stores them, its UI and comparisons choke on them)."""
    _log_in_batches(tracking_uri, run_id, _finite_metrics(values, step))


def log_metric_series(tracking_uri: str, run_id: str, key: str, values: list[float]) -> None:
    """One curve, its points at steps 0, 1, ..."""
    now = int(time.time() * 1000)
    _log_in_batches(
        tracking_uri,
        run_id,
        [Metric(key, float(v), now, step) for step, v in enumerate(values) if math.isfinite(float(v))],
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, by step."""
    return sorted((int(m.step), float(m.value)) for m in client(tracking_uri).get_metric_history(run_id, key))


def log_artifacts(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file or a folder."""
    store = client(tracking_uri)
    if Path(path).is_dir():
        store.log_artifacts(run_id, str(path), artifact_path=artifact_path)
    else:
        store.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_dataset(tracking_uri: str, run_id: str, frame: Any, name: str, digest: str, context: str) -> None:
    """Lineage: a pandas frame as an MLflow dataset input of the run (name, digest, row count, schema)."""
    dataset = mlflow.data.from_pandas(frame, name=name, digest=digest)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context=context)


class AsyncMetricLogger:
    """Step metrics of a training run, logged without waiting: a sqlite write costs tens of ms, a tiny
    step about 50 ms. `flush` waits until every batch is stored."""

    def __init__(self, tracking_uri: str, run_id: str):
        self._client = client(tracking_uri)
        self._run_id = run_id
        self._pending: list[Any] = []

    def log(self, step: int, values: dict[str, float]) -> None:
        self._pending.append(
            self._client.log_batch(self._run_id, metrics=_finite_metrics(values, step), synchronous=False)
        )

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for operation in pending:
            if operation is not None:
                operation.wait()


def model_versions(tracking_uri: str, name: str = REGISTERED_MODEL) -> list[Any]:
    return list(client(tracking_uri).search_model_versions(f"name='{name}'"))


def experiment_runs(tracking_uri: str, experiment: str = EXPERIMENT) -> list[Any]:
    found = client(tracking_uri).get_experiment_by_name(experiment)
    return [] if found is None else list(client(tracking_uri).search_runs([found.experiment_id]))


def log_transformers_model(
    tracking_uri: str,
    run_id: str,
    model_path: str | Path,
    registered_model_name: str | None = REGISTERED_MODEL,
) -> Any:
    """Log a saved HF folder to a run as an MLflow transformers model and register a new version.

    mlflow 3.17's memory-saving path (`transformers_model=<folder>`) breaks on transformers 5
    (`pipelines.check_task` returns class names), so the components are loaded and logged instead.
    """
    from tidpo_core.models.modeling import load_model_and_tokenizer

    if registered_model_name:
        # A run killed after registering but before it was marked finished is resumed in the same
        # MLflow run; its version is complete (MLflow registers after the artifacts are logged), so
        # the re-run reuses it instead of registering the same run twice.
        for version in client(tracking_uri).search_model_versions(
            f"name='{registered_model_name}' and run_id='{run_id}'"
        ):
            if version.status == "READY":
                return SimpleNamespace(registered_model_version=int(version.version), reused=True)
    model, tokenizer = load_model_and_tokenizer(model_path)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with (
        mlflow.start_run(run_id=run_id),
        without_log_messages("mlflow.transformers", *MLFLOW_LOCAL_FOLDER_NOISE),
    ):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_model_name,
        )
    return info


def register_model_folder(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    name: str = REWARD_MODEL,
    artifact_path: str = REWARD_ARTIFACT_PATH,
    tags: dict[str, str] | None = None,
) -> int:
    """Log a saved model folder (a Hugging Face folder, as it is) to a run's artifacts and register it as a new
    version of `name`; returns the version. A run that already registered a version of `name` (a re-run after a
    crash between registering and finishing) gets that version back instead of a second one.

    The policy is logged as an MLflow transformers model (a generation pipeline); a reward model has no
    pipeline of its own, so its folder is registered as it is: `download_model_version` fetches it back for
    `tidpo_core.models.reward.load_reward_function`.
    """
    store = client(tracking_uri)
    for version in store.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if version.status == "READY":
            return int(version.version)
    store.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
    try:
        store.create_registered_model(name)
    except MlflowException:  # it exists (another run may have created it a moment ago)
        store.get_registered_model(name)
    source = f"{store.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return int(store.create_model_version(name, source=source, run_id=run_id, tags=tags).version)


def latest_version(tracking_uri: str, name: str = REWARD_MODEL) -> str | None:
    """The highest version number of a registered model (None: no version)."""
    versions = [int(v.version) for v in client(tracking_uri).search_model_versions(f"name='{name}'")]
    return str(max(versions)) if versions else None


def download_model_version(
    tracking_uri: str,
    dst: str | Path,
    version: str | int | None = None,
    name: str = REWARD_MODEL,
    artifact_path: str = REWARD_ARTIFACT_PATH,
) -> Path:
    """A registered folder (register_model_folder) fetched to `dst`; the latest version when none is named.
    Returns the folder, e.g. for `tidpo_core.models.reward.load_reward_function`."""
    version = version if version is not None else latest_version(tracking_uri, name)
    if version is None:
        raise LookupError(f"registered model {name!r} has no version in {tracking_uri}")
    store = client(tracking_uri)
    run_id = store.get_model_version(name, str(version)).run_id
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(store.download_artifacts(run_id, artifact_path, str(dst)))


def load_registered_model(tracking_uri: str, model_uri: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered transformers model, e.g. `models:/tidpo-policy@champion`."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    components = mlflow.transformers.load_model(model_uri, return_type="components")
    return components["model"], components["tokenizer"]


def set_champion(tracking_uri: str, version: str | int, name: str = REGISTERED_MODEL) -> None:
    client(tracking_uri).set_registered_model_alias(name, CHAMPION_ALIAS, str(version))


@contextmanager
def registry_lock(lock_dir: str | Path) -> Iterator[None]:
    """Serializes every move of the champion alias made from one data directory (an flock, released by
    the kernel if the holder dies)."""
    path = Path(lock_dir) / REGISTRY_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def champion_version(tracking_uri: str, name: str = REGISTERED_MODEL) -> str | None:
    try:
        return str(client(tracking_uri).get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def version_run_id(tracking_uri: str, version: str | int, name: str = REGISTERED_MODEL) -> str:
    return client(tracking_uri).get_model_version(name, str(version)).run_id


def promote_if_champion_is(
    tracking_uri: str,
    version: str | int,
    expected: str | None,
    lock_dir: str | Path,
    name: str = REGISTERED_MODEL,
) -> tuple[bool, str | None]:
    """Compare and set: `version` takes the alias only if the champion is still `expected` (the one it was
    judged against; None: no champion). Returns (moved, the champion found)."""
    with registry_lock(lock_dir):
        current = champion_version(tracking_uri, name)
        if current != (None if expected is None else str(expected)):
            return False, current
        set_champion(tracking_uri, version, name)
        return True, current


def rollback_champion(
    tracking_uri: str, version: str | int, reason: str, lock_dir: str | Path, name: str = REGISTERED_MODEL
) -> str | None:
    """Give an earlier `version` the alias back; tags it with why. Returns the champion it replaced.
    An unknown version raises UserInputError (naming the versions that exist) before the alias moves."""
    store = client(tracking_uri)
    try:
        store.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        versions = registered_versions(tracking_uri, name)
        known = f"versions: {', '.join(versions)}" if versions else f"{name!r} has no versions yet"
        raise UserInputError(
            f"version {version} of {name!r} does not exist; {known}", version=str(version)
        ) from None
    with registry_lock(lock_dir):
        previous = champion_version(tracking_uri, name)
        set_champion(tracking_uri, version, name)
    store.set_model_version_tag(name, str(version), "rollback_reason", reason[:5000])
    return previous


def registered_versions(tracking_uri: str, name: str = REGISTERED_MODEL) -> list[str]:
    """The registered model's version numbers, oldest first (none if the model is not registered)."""
    quoted = name.replace("'", "\\'")
    found = client(tracking_uri).search_model_versions(f"name='{quoted}'")
    return [str(v) for v in sorted(int(mv.version) for mv in found)]


def tag_gate_verdict(
    tracking_uri: str,
    version: str | int,
    passed: bool,
    compared_with: str,
    description: str,
    name: str = REGISTERED_MODEL,
) -> None:
    """What the gate decided for a version, on the version itself (visible in the MLflow UI)."""
    store = client(tracking_uri)
    for key, value in {
        "gate": "passed" if passed else "failed",
        "compared_with": compared_with,
        "gate_verdict": description,
    }.items():
        store.set_model_version_tag(name, str(version), key, value[:5000])


@dataclass(frozen=True)
class ChampionInfo:
    name: str
    version: str
    run_id: str
    source: str
    metrics: dict[str, float]
    model_uri: str
    tags: dict[str, str]
    """The version's tags: the gate's verdict (`gate`, `compared_with`, `gate_verdict`), any `rollback_reason`."""


def champion(tracking_uri: str, name: str = REGISTERED_MODEL) -> ChampionInfo | None:
    store = client(tracking_uri)
    try:
        version = store.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    run = store.get_run(version.run_id)
    return ChampionInfo(
        name=name,
        version=str(version.version),
        run_id=version.run_id,
        source=store.get_model_version_download_uri(name, str(version.version)),
        metrics=dict(run.data.metrics),
        model_uri=f"models:/{name}@{CHAMPION_ALIAS}",
        tags=dict(version.tags),
    )
