"""The reference_model asset: the embedded tiny model built and fine-tuned, or a checkpoint checked and imported."""

import dataclasses

import dagster as dg

from tidpo_core.models.modeling import TinyModelConfig
from tidpo_core.steps import RunTracking, settings_of
from tidpo_core.steps.reference import ReferenceRecipe, build_reference
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import user_errors_as_failures
from tidpo_pipeline.metadata import GROUP, mlflow_tags
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, TidpoDuckDB, TidpoStorage

ReferenceModelConfig = config_class(
    "ReferenceModelConfig",
    "The reference: a checkpoint, or the embedded tiny model (its shape below) and its short SFT.",
    DocumentedConfig,
    core_fields(ReferenceRecipe),
    core_fields(TinyModelConfig),
)


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"pytorch", "mlflow"},
    description="The starting policy: a configured checkpoint, or the embedded tiny Llama with a locally trained tokenizer and a short SFT.",
)
def reference_model(
    context: dg.AssetExecutionContext,
    config: ReferenceModelConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    run_tracking = RunTracking(
        mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context)
    )  # fails early if tracking is down
    with user_errors_as_failures():
        built = build_reference(
            duckdb.get_connection,
            settings_of(config, ReferenceRecipe),
            settings_of(config, TinyModelConfig),
            storage.layout,
            preference_pairs["digest"],
            tracking_to=run_tracking,
            log=context.log.info,
        )
    handle, losses = built.handle, built.sft_losses
    return dg.MaterializeResult(
        value=dataclasses.asdict(handle),
        metadata={
            **built.details,
            "path": dg.MetadataValue.path(handle.path),
            "fingerprint": handle.fingerprint,
            "parameters": built.parameters if built.parameters is not None else "not loaded",
            "mlflow_run_id": str(handle.mlflow_run_id),
            "sft_first_loss": losses[0] if losses else float("nan"),
            "sft_last_loss": losses[-1] if losses else float("nan"),
        },
    )
