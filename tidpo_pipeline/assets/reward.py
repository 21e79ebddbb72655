"""The reward_model asset: the GRPO baseline's Bradley-Terry reward model (TRL's RewardTrainer on the train
pairs, from the reference's backbone), judged on the eval pairs, registered in MLflow as `tidpo-reward`;
and its check, reward_model_beats_chance."""

import dataclasses
import math

import dagster as dg

from tidpo_core.runtime import tracking
from tidpo_core.steps import RunTracking, settings_of
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.steps.reward import RewardModelSettings, beats_chance, train_reward
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import user_errors_as_failures
from tidpo_pipeline.metadata import GROUP, mlflow_tags
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, TidpoDuckDB, TidpoStorage

CHECK = "reward_model_beats_chance"

RewardModelConfig = config_class(
    "RewardModelConfig",
    "How the reward model is trained (TRL's RewardTrainer) and the accuracy its check asks for.",
    DocumentedConfig,
    core_fields(RewardModelSettings),
)


def _rounded(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else value


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "duckdb", "mlflow"},
    op_tags=MODEL_OP_TAGS,
    description=(
        "A Bradley-Terry reward model for the GRPO baseline: the reference's backbone with a one-output head, "
        "trained with TRL's RewardTrainer on the train pairs (-log sigmoid(r(chosen) - r(rejected))), judged "
        "on the eval pairs, registered in MLflow as tidpo-reward. tidpo_core.models.reward.load_reward_function(path) "
        "scores (prompts, completions)."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset="reward_model",
            blocking=False,
            description="Held-out pair accuracy > 0.5 + min_accuracy_margin (the config's): the reward model beats chance.",
        )
    ],
)
def reward_model(
    context: dg.AssetExecutionContext,
    config: RewardModelConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
):  # no return annotation: with check results in it, Dagster would take MaterializeResult for a Nothing output
    settings: RewardModelSettings = settings_of(config, RewardModelSettings)
    with user_errors_as_failures():
        run_tracking = RunTracking(mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context))
        handle = train_reward(
            duckdb.get_connection,
            ReferenceHandle.from_value(reference_model),
            settings,
            storage.layout,
            preference_pairs["digest"],
            tracking_to=run_tracking,
            log=context.log.info,
        )
    accuracy, passed = (
        handle.held_out_accuracy,
        beats_chance(handle.held_out_accuracy, settings.min_accuracy_margin),
    )
    metrics = handle.metrics
    return dg.MaterializeResult(
        value=dataclasses.asdict(handle),
        metadata={
            "held_out_accuracy": _rounded(accuracy),
            "held_out_margin": _rounded(metrics.get("eval_margin", math.nan)),
            "eval_pairs": handle.eval_pairs,
            "train_pairs": handle.train_pairs,
            "last_train_loss": _rounded(metrics.get("loss", math.nan)),
            "last_train_accuracy": _rounded(metrics.get("accuracy", math.nan)),
            "model_path": dg.MetadataValue.path(handle.path),
            "fingerprint": handle.fingerprint,
            "reused": handle.reused,
            "mlflow_run_id": str(handle.mlflow_run_id),
            "registered_version": str(handle.registered_version),
            "mlflow_model_uri": f"models:/{tracking.REWARD_MODEL}/{handle.registered_version}"
            if handle.registered_version
            else "not registered",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK,
                passed=passed,
                metadata={
                    "held_out_accuracy": _rounded(accuracy),
                    "threshold": 0.5 + settings.min_accuracy_margin,
                    "eval_pairs": handle.eval_pairs,
                },
            )
        ],
    )


REWARD_ASSETS = [reward_model]

__all__ = ["CHECK", "REWARD_ASSETS", "RewardModelConfig", "reward_model"]
