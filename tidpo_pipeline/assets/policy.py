"""The tidpo_policy asset: the training engine launched through Dagster Pipes, tracked and registered in MLflow."""

from typing import Any

import dagster as dg

from tidpo_core.runtime.launch import TrainingFailed
from tidpo_core.steps import RunTracking, settings_of
from tidpo_core.steps.policy import (
    SET_BY_THE_RUN,
    PolicyInputs,
    PolicyRunSettings,
    engine_option_names,
    train_policy,
)
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.training import TrainConfig
from tidpo_pipeline.assets.launched import through_pipes
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import user_errors_as_failures
from tidpo_pipeline.metadata import GROUP, mlflow_tags
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, TidpoDuckDB, TidpoStorage

PolicyConfig = config_class(
    "PolicyConfig",
    "Training of the policy: every option of the engine (TrainConfig), plus where it starts and how it is launched.",
    DocumentedConfig,
    core_fields(PolicyRunSettings),
    core_fields(TrainConfig, exclude=SET_BY_THE_RUN),
)


def training_fields(config: Any) -> dict[str, Any]:
    """The PolicyConfig values that are the engine's TrainConfig options (same names)."""
    return {name: getattr(config, name) for name in engine_option_names()}


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="The trained policy: an accelerate-driven TI-DPO run launched through Dagster Pipes, checkpointed and resumable, registered in MLflow.",
)
def tidpo_policy(
    context: dg.AssetExecutionContext,
    config: PolicyConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    token_weights: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    inputs = PolicyInputs(
        preference_pairs["digest"],
        ReferenceHandle.from_value(reference_model),
        anchor_responses["fingerprint"],
        token_weights,
    )
    with user_errors_as_failures():
        run_tracking = RunTracking(mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context))
        try:
            result = train_policy(
                duckdb.get_connection,
                storage.layout,
                run_tracking,
                mlflow_tracking.registered_model,
                inputs,
                settings_of(config, PolicyRunSettings),
                training_fields(config),
                through_pipes(context, pipes_subprocess_client),
                log=context.log.info,
            )
        except TrainingFailed as exc:
            raise dg.Failure(
                description=f"training failed: {exc.reason}",
                metadata={
                    "run_dir": dg.MetadataValue.path(str(exc.run_dir)),
                    "mlflow_run_id": str(exc.mlflow_run_id),
                },
            ) from exc
    summary, version, history = result.summary, result.model_version, result.summary["history"]
    return dg.MaterializeResult(
        value={
            "model_path": summary["final_model_path"],
            "mlflow_run_id": result.mlflow_run_id,
            "model_version": version,
            "run_dir": str(result.run_dir),
            "beta": config.beta,
            "encoding": token_weights["encoding"],
            # The pair losses' margin, or GRPO's mean reward: what the training_is_healthy check reads.
            "step_history": [
                {k: h[k] for k in ("loss", "rewards/margins", "reward") if k in h} for h in history
            ],
        },
        metadata={
            **result.reported,
            "model_path": dg.MetadataValue.path(summary["final_model_path"]),
            "mlflow_run_id": result.mlflow_run_id,
            "mlflow_model_version": str(version),
            "mlflow_model_uri": f"models:/{mlflow_tracking.registered_model}/{version}"
            if version
            else "not registered",
            "steps": summary["steps"],
            "first_loss": summary["first_loss"],
            "last_loss": summary["last_loss"],
            "final_reward_accuracy": history[-1].get("rewards/accuracies", float("nan"))
            if history
            else float("nan"),
            "seconds": summary["seconds"],
        },
    )
