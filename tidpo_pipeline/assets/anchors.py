"""The anchor_responses asset: one response per train prompt sampled from the reference, the triplet's anchor."""

import dagster as dg

from tidpo_core.models.generation import SamplingSettings
from tidpo_core.runtime.precompute import PrecomputeSettings
from tidpo_core.steps import settings_of
from tidpo_core.steps.anchors import AnchorBackend, sample_anchors
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_pipeline.assets.launched import precompute_runner, shard_metadata
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import precompute_failures_as_failures, user_errors_as_failures
from tidpo_pipeline.metadata import GROUP, anchors_preview
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, TidpoDuckDB, TidpoStorage

AnchorConfig = config_class(
    "AnchorConfig",
    "How the anchors are sampled from the reference, and by how many processes.",
    DocumentedConfig,
    core_fields(SamplingSettings, defaults={"batch_size": 32}),
    core_fields(AnchorBackend),
    core_fields(PrecomputeSettings),
)


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"duckdb", "pytorch"},
    description="One response per train prompt sampled from the reference policy: the triplet loss's anchor.",
)
def anchor_responses(
    context: dg.AssetExecutionContext,
    config: AnchorConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    settings = settings_of(config, SamplingSettings)
    precompute = settings_of(config, PrecomputeSettings)
    backend = settings_of(config, AnchorBackend)
    with user_errors_as_failures(), precompute_failures_as_failures():
        report = sample_anchors(
            duckdb.get_connection,
            ReferenceHandle.from_value(reference_model),
            settings,
            backend=backend,
            precompute=precompute,
            layout=storage.layout,
            run_process=precompute_runner(context, pipes_subprocess_client, precompute),
            log=context.log.info,
        )
    return dg.MaterializeResult(
        value={"fingerprint": report.fingerprint},
        metadata={
            "fingerprint": report.fingerprint,
            "generated": report.generated,
            "reused": report.stored - report.generated,
            "dagster/row_count": report.stored,
            **shard_metadata(report.shards, report.generated),
            "launcher": precompute.launcher,
            "generation_backend": backend.generation_backend,
            "sampling": dg.MetadataValue.json(settings.as_dict()),
            "preview": dg.MetadataValue.md(anchors_preview(report.preview)),
        },
    )
