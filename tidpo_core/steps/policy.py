"""Train the policy: one resumable training run of the engine on the stored pairs, anchors and weights,
tracked and registered in MLflow.

The run is keyed by its inputs and settings: re-running with the same ones resumes the interrupted run
(same folder, same MLflow run) from its last checkpoint instead of starting over.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tidpo_core import store
from tidpo_core.models.modeling import save_model_and_tokenizer
from tidpo_core.runtime import launch, tracking
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.launch import LaunchSettings
from tidpo_core.runtime.layout import DataDir, RunDir
from tidpo_core.steps import OpenDb, RunTracking, log_to
from tidpo_core.steps.reference import ReferenceHandle, with_optimizer_recipe
from tidpo_core.steps.reward import with_stored_reward_model
from tidpo_core.training import TrainConfig


@dataclass(frozen=True)
class PolicyRunSettings:
    """What the run is besides the engine's options: where the weights start, how it is launched, registration."""

    weight_lambda: float | None = None
    """None: the lambda the token_weights were computed with. 0 / 1 run the paper's weight ablations."""
    init_from: Literal["reference", "champion"] = "reference"
    """Where the policy's weights start. `champion`: continue from the current champion (a retraining on new
    data keeps what it learned); log-ratios and the KL still use the reference. Without a champion yet,
    the reference. Not with LoRA."""
    launcher: Literal["python", "accelerate"] = "python"
    """`python`: one process; `accelerate`: `accelerate launch` with the config file / process count below."""
    accelerate_config_file: str = ""
    """With `accelerate`: an accelerate config file (FSDP, DeepSpeed, multi-node); empty: flags for one machine."""
    num_processes: int | None = None
    """With `accelerate`: how many processes; None: the config file's count, or 1 without a file."""
    register_model: bool = True

    @property
    def launch(self) -> LaunchSettings:
        return LaunchSettings(self.launcher, self.num_processes, self.accelerate_config_file)


# TrainConfig fields the run fills in from its inputs (paths, fingerprints, the encoding and weight
# normalization the token weights were made with, the MLflow run), and weight_lambda, which
# PolicyRunSettings declares with a None that means "as the token weights". Every other field is an
# engine option the user sets.
SET_BY_THE_RUN = (
    "duckdb_path",
    "reference_model_path",
    "output_dir",
    "reference_revision",
    "init_model_path",
    "trust_remote_code",
    "weights_fingerprint",
    "anchors_fingerprint",
    "weight_lambda",
    "weight_normalization",
    "max_prompt_tokens",
    "max_response_tokens",
    "resume",
    "mlflow_tracking_uri",
    "mlflow_run_id",
    "progress",
    "extra",
)


def engine_option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SET_BY_THE_RUN]


@dataclass(frozen=True)
class PolicyInputs:
    pairs_digest: str
    reference: ReferenceHandle
    anchors_fingerprint: str
    weights: Mapping[str, Any]
    """The token_weights handle: fingerprint, importance (lambda, normalization), encoding, reference_kl_top_k."""


ProcessRunner = Callable[[list[str], dict[str, str]], dict[str, Any]]
"""Runs the training command with this environment and returns what the process reported (metadata);
raises launch.ProcessFailed when it exits non-zero. The Dagster asset's runs it through Pipes."""


@dataclass(frozen=True)
class PolicyResult:
    run_dir: Path
    mlflow_run_id: str
    model_version: int | None
    summary: dict[str, Any]
    """The engine's summary.json: steps, losses, history, final_model_path, seconds..."""
    reported: dict[str, Any]


def train_policy(
    open_db: OpenDb,
    layout: DataDir,
    tracking_to: RunTracking,
    registered_model: str,
    inputs: PolicyInputs,
    run_settings: PolicyRunSettings,
    engine_options: Mapping[str, Any],
    run_process: ProcessRunner,
    log: Callable[[str], None] | None = None,
) -> PolicyResult:
    log = log_to(log)
    options = with_stored_reward_model(
        open_db, inputs.reference, with_optimizer_recipe(inputs.reference, engine_options)
    )
    _refuse_cached_kl_without_top_k(options, inputs.weights)
    lambda_ = (
        run_settings.weight_lambda
        if run_settings.weight_lambda is not None
        else inputs.weights["importance"]["lambda"]
    )
    start_version = (
        tracking.champion_version(tracking_to.uri, registered_model)
        if run_settings.init_from == "champion"
        else None
    )
    if run_settings.init_from == "champion" and start_version is None:
        log("init_from: champion, but there is no champion yet: starting from the reference")
    settings = {**dataclasses.asdict(run_settings), **options}
    run_dir = layout.policy_run(
        digest(
            {
                "start": start_version,
                "pairs": inputs.pairs_digest,
                "reference": inputs.reference.fingerprint,
                "anchors": inputs.anchors_fingerprint,
                "weights": inputs.weights["fingerprint"],
                "config": settings,
            }
        )
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    init_model_path = _champion_weights(tracking_to.uri, registered_model, start_version, run_dir)
    run_id = _mlflow_run(open_db, tracking_to, run_dir, inputs, settings, lambda_, log)
    train_config = TrainConfig(
        duckdb_path=str(layout.database),
        reference_model_path=inputs.reference.path,
        reference_revision=inputs.reference.revision,
        trust_remote_code=inputs.reference.trust_remote_code,
        output_dir=str(run_dir),
        weights_fingerprint=inputs.weights["fingerprint"],
        anchors_fingerprint=inputs.anchors_fingerprint,
        **options,
        init_model_path=str(init_model_path) if init_model_path else None,
        weight_lambda=lambda_,
        weight_normalization=inputs.weights["importance"]["normalization"],
        max_prompt_tokens=inputs.weights["encoding"]["max_prompt_tokens"],
        max_response_tokens=inputs.weights["encoding"]["max_response_tokens"],
        mlflow_tracking_uri=tracking_to.uri,
        mlflow_run_id=run_id,
        progress=True,
    )
    reported = _launch(train_config, run_settings, run_process, tracking_to.uri, run_id, run_dir)
    summary = launch.read_summary(run_dir)
    version = _finish_tracking(tracking_to.uri, run_id, run_dir, summary, run_settings, registered_model)
    return PolicyResult(run_dir, run_id, version, summary, reported)


def _refuse_cached_kl_without_top_k(options: Mapping[str, Any], weights: Mapping[str, Any]) -> None:
    if (
        options.get("reference_kl") == "cached"
        and options.get("loss_type") == "tidpo"
        and options.get("alpha", 0) > 0
        and not weights.get("reference_kl_top_k")
    ):
        raise UserInputError(
            "reference_kl: cached needs the reference top-k stored with the token weights: "
            "materialize token_weights with reference_kl_top_k > 0 (e.g. 64) first"
        )


def _launch(
    train_config: TrainConfig,
    run_settings: PolicyRunSettings,
    run_process: ProcessRunner,
    tracking_uri: str,
    run_id: str,
    run_dir: Path,
) -> dict[str, Any]:
    """Run the engine; a failed or interrupted run marks its MLflow run failed before the error goes up."""
    try:
        return run_process(launch.process_command(train_config, run_settings.launch), launch.training_env())
    except launch.ProcessFailed as exc:
        tracking.finish_run(tracking_uri, run_id, failed=True)
        raise launch.TrainingFailed(launch.failure_reason(run_dir), run_dir, mlflow_run_id=run_id) from exc
    except BaseException:
        tracking.finish_run(tracking_uri, run_id, failed=True)
        raise


def _finish_tracking(
    tracking_uri: str,
    run_id: str,
    run_dir: Path,
    summary: Mapping[str, Any],
    run_settings: PolicyRunSettings,
    registered_model: str,
) -> str | None:
    """Log the run's config and summary, register the model when asked, close the run; the new version."""
    tracking.log_artifacts(tracking_uri, run_id, RunDir(run_dir).train_config)
    tracking.log_artifacts(tracking_uri, run_id, RunDir(run_dir).summary)
    version = None
    if run_settings.register_model:
        info = tracking.log_transformers_model(
            tracking_uri, run_id, summary["final_model_path"], registered_model
        )
        version = getattr(info, "registered_model_version", None)
    tracking.finish_run(tracking_uri, run_id)
    return version


def _champion_weights(
    tracking_uri: str, registered_model: str, version: str | None, run_dir: Path
) -> Path | None:
    """The champion's weights as a folder in the run (init_from: champion), fetched once."""
    if version is None:
        return None
    path = run_dir / f"init_champion_v{version}"
    if not (path / "config.json").exists():
        model, tokenizer = tracking.load_registered_model(
            tracking_uri, f"models:/{registered_model}/{version}"
        )
        save_model_and_tokenizer(model, tokenizer, path)
    return path


def _mlflow_run(
    open_db: OpenDb,
    tracking_to: RunTracking,
    run_dir: Path,
    inputs: PolicyInputs,
    settings: dict[str, Any],
    lambda_: float,
    log: Callable[[str], None],
) -> str:
    """The interrupted run with these exact inputs, to resume in the same MLflow run; else a new one."""
    run_file = RunDir(run_dir).mlflow_run
    if run_file.exists():
        previous = json.loads(run_file.read_text())["run_id"]
        if tracking.run_status(tracking_to.uri, previous) not in ("FINISHED", "DELETED"):
            log(f"resuming MLflow run {previous} from the checkpoints in {run_dir}")
            return previous
    shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)
    run_id = tracking.start_run(
        tracking_to.uri,
        tracking_to.experiment_id,
        f"tidpo_policy-{settings.get('loss_type', 'tidpo')}",
        tracking_to.tags,
        {
            **settings,
            "weight_lambda": lambda_,
            "reference_fingerprint": inputs.reference.fingerprint,
            "weights_fingerprint": inputs.weights["fingerprint"],
            "anchors_fingerprint": inputs.anchors_fingerprint,
            "reference_mlflow_run_id": inputs.reference.mlflow_run_id,
        },
    )
    run_file.write_text(json.dumps({"run_id": run_id}))
    with open_db() as con:  # lineage: the training table as an MLflow dataset (name, digest, row count)
        frame = store.train_pairs_frame(con)
    tracking.log_dataset(
        tracking_to.uri, run_id, frame, "preference_pairs/train", inputs.pairs_digest[-16:], "training"
    )
    return run_id
