"""The preference_pairs asset: every source loaded, validated and stored; bad rows quarantined with a reason."""

import dagster as dg

from tidpo_core.data.sources import inbox_files
from tidpo_core.steps import settings_of
from tidpo_core.steps.pairs import PairSources, ingest_pairs
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.failures import user_errors_as_failures
from tidpo_pipeline.metadata import GROUP, pairs_preview, quarantine_preview
from tidpo_pipeline.resources import TidpoDuckDB, TidpoStorage


class PairsAssetSettings(DocumentedConfig):
    include_inbox: bool = True
    """Also load every data file dropped into <data_dir>/inbox."""


PreferencePairsConfig = config_class(
    "PreferencePairsConfig",
    "Where the preference pairs come from and how they are split.",
    PairsAssetSettings,
    core_fields(PairSources),
)


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb"},
    description="Validated preference pairs with a train/eval split; bad rows go to the quarantine table.",
)
def preference_pairs(
    context: dg.AssetExecutionContext,
    config: PreferencePairsConfig,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,  # type: ignore[valid-type]
) -> dg.MaterializeResult:
    inbox = [str(p) for p in inbox_files(storage.inbox_dir)] if config.include_inbox else []
    with user_errors_as_failures():
        report = ingest_pairs(duckdb.get_connection, settings_of(config, PairSources), inbox)
    result, stored = report.result, report.stored
    context.log.info(
        f"{stored.pairs} pairs stored ({stored.train} train / {stored.eval} eval), {stored.quarantined} quarantined, "
        f"{result.skipped_rows} rows skipped {result.skipped or ''}"
    )
    return dg.MaterializeResult(
        value={"digest": report.digest, "train": stored.train, "eval": stored.eval},
        metadata={
            "dagster/row_count": stored.pairs,
            "rows_read": result.rows_read,
            "accepted": result.accepted,
            "quarantined": stored.quarantined,
            "skipped": result.skipped_rows,
            "skipped_reasons": dg.MetadataValue.json(result.skipped),
            "pairs_available": report.available,
            "max_pairs": str(config.max_pairs),
            "quarantine_share": result.quarantine_share,
            "quarantine_reasons": dg.MetadataValue.json(result.reason_counts()),
            "train_pairs": stored.train,
            "eval_pairs": stored.eval,
            "sources": dg.MetadataValue.json(report.sources),
            "digest": report.digest,
            "preview": dg.MetadataValue.md(pairs_preview(report.preview)),
            "quarantine_preview": dg.MetadataValue.md(quarantine_preview(report.quarantine_preview)),
        },
    )
