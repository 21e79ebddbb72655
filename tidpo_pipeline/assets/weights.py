"""The token_weights asset: hybrid importance and reference log-probs for every train response, in DuckDB."""

import dagster as dg

from tidpo_core.runtime.precompute import PrecomputeSettings
from tidpo_core.steps import settings_of
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.steps.weights import WeighingSettings, weigh_tokens
from tidpo_pipeline.assets.launched import precompute_runner, shard_metadata
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import precompute_failures_as_failures, user_errors_as_failures
from tidpo_pipeline.metadata import GROUP
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, TidpoDuckDB, TidpoStorage

TokenWeightsConfig = config_class(
    "TokenWeightsConfig",
    "How each response token is weighed (docs/method.md section 1), and by how many processes.",
    DocumentedConfig,
    core_fields(WeighingSettings),
    core_fields(PrecomputeSettings),
)


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"duckdb", "pytorch"},
    description="Per-token hybrid importance (an importance estimate, by default the paper's gradient attribution, + Gaussian prior) and reference log-probs for chosen, rejected and anchor responses.",
)
def token_weights(
    context: dg.AssetExecutionContext,
    config: TokenWeightsConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    settings = settings_of(config, WeighingSettings)
    precompute = settings_of(config, PrecomputeSettings)
    with user_errors_as_failures(), precompute_failures_as_failures():
        report = weigh_tokens(
            duckdb.get_connection,
            ReferenceHandle.from_value(reference_model),
            anchor_responses["fingerprint"],
            settings,
            precompute=precompute,
            layout=storage.layout,
            run_process=precompute_runner(context, pipes_subprocess_client, precompute),
            log=context.log.info,
        )
    summary = report.summary
    return dg.MaterializeResult(
        value={
            "fingerprint": report.fingerprint,
            "encoding": settings.encoding.__dict__,
            "importance": report.importance,
            "reference_kl_top_k": settings.reference_kl_top_k,
        },
        metadata={
            "fingerprint": report.fingerprint,
            "dagster/row_count": summary.token_rows,
            "responses": summary.responses,
            "computed": report.computed,
            "reused": report.expected - report.computed,
            **shard_metadata(report.shards, report.computed),
            "launcher": precompute.launcher,
            "mean_attribution": summary.mean_attribution,
            "mean_weight": summary.mean_weight,
            "reference_kl_top_k": settings.reference_kl_top_k,
            "estimator": settings.estimator + (" (eos excluded)" if settings.exclude_eos else ""),
            "settings": dg.MetadataValue.json({"encoding": settings.encoding.__dict__, **report.importance}),
        },
    )
