"""The contrastive_models asset: the contrastive importance estimator's two fine-tuned models."""

import dagster as dg

from tidpo_core.models.contrastive import ContrastiveSFT
from tidpo_core.steps import settings_of
from tidpo_core.steps.contrastive import train_contrastive_models
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.metadata import GROUP
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, TidpoDuckDB, TidpoStorage

ContrastiveModelsConfig = config_class(
    "ContrastiveModelsConfig",
    "The SFT recipe of both contrastive models.",
    DocumentedConfig,
    core_fields(ContrastiveSFT),
)


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"pytorch", "duckdb"},
    description="Two contrastive models for the `contrastive` importance estimator (TIS-DPO): the reference's base "
    "fine-tuned on the chosen answers only and on the rejected answers only. Not part of tidpo_training: "
    "materialize it before token_weights with estimator: contrastive.",
)
def contrastive_models(
    context: dg.AssetExecutionContext,
    config: ContrastiveModelsConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
) -> dg.MaterializeResult:
    built = train_contrastive_models(
        duckdb.get_connection,
        ReferenceHandle.from_value(reference_model),
        settings_of(config, ContrastiveSFT),
        storage.layout,
        preference_pairs["digest"],
        log=context.log.info,
    )
    return dg.MaterializeResult(
        value={"fingerprint": built.fingerprint, "paths": list(built.paths)},
        metadata={
            "fingerprint": built.fingerprint,
            "positive": dg.MetadataValue.path(built.paths[0]),
            "negative": dg.MetadataValue.path(built.paths[1]),
            "reused": built.reused,
            **{f"sft_last_loss/{name}": curve[-1] for name, curve in built.sft_losses.items() if curve},
        },
    )
