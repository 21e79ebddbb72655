"""Asset checks guarding each edge of the graph (the evaluation gate lives with its asset)."""

import dataclasses

import dagster as dg

from tidpo_core import store
from tidpo_core.evaluation.training_health import training_health
from tidpo_pipeline.assets.anchors import anchor_responses
from tidpo_pipeline.assets.pairs import preference_pairs
from tidpo_pipeline.assets.policy import tidpo_policy
from tidpo_pipeline.assets.weights import token_weights
from tidpo_pipeline.resources import QualityRules, TidpoDuckDB


@dg.asset_check(
    asset=preference_pairs,
    blocking=True,
    description="No empty text and no chosen == rejected among stored pairs.",
)
def pairs_are_valid(duckdb: TidpoDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        validity = store.pairs_validity(con)
    return dg.AssetCheckResult(passed=validity.valid, metadata=dataclasses.asdict(validity))


@dg.asset_check(
    asset=preference_pairs, description="The share of quarantined rows stays below the configured limit."
)
def quarantine_share_below_limit(duckdb: TidpoDuckDB, quality: QualityRules) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        accepted = store.pair_count(con)
        reasons = store.quarantine_reasons(con)
    quarantined = sum(reasons.values())
    share = quarantined / max(accepted + quarantined, 1)
    return dg.AssetCheckResult(
        passed=share <= quality.max_quarantine_share,
        metadata={
            "quarantine_share": share,
            "limit": quality.max_quarantine_share,
            "reasons": dg.MetadataValue.json(reasons),
        },
    )


@dg.asset_check(asset=anchor_responses, description="Every train pair has an anchor response.")
def anchors_cover_train_pairs(anchor_responses: dict, duckdb: TidpoDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        missing = store.train_pairs_without_anchor(con, anchor_responses["fingerprint"])
    return dg.AssetCheckResult(passed=missing == 0, metadata={"train_pairs_without_anchor": missing})


@dg.asset_check(
    asset=token_weights,
    additional_ins={"anchor_responses": dg.AssetIn("anchor_responses")},
    blocking=True,
    description="Weights are finite, mean 1 per response, and cover every train response.",
)
def token_weights_are_valid(
    token_weights: dict, anchor_responses: dict, duckdb: TidpoDuckDB, quality: QualityRules
) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        validity = store.weights_validity(con, token_weights["fingerprint"], anchor_responses["fingerprint"])
    passed = (
        validity.non_finite_values == 0
        and validity.max_abs_mean_weight_minus_1 <= quality.weight_mean_tolerance
        and validity.uncovered_responses == 0
    )
    return dg.AssetCheckResult(passed=passed, metadata=dataclasses.asdict(validity))


@dg.asset_check(asset=tidpo_policy, description="No NaN/inf in training, and the reward margin grew.")
def training_is_healthy(tidpo_policy: dict) -> dg.AssetCheckResult:
    health = training_health(tidpo_policy["step_history"])
    return dg.AssetCheckResult(passed=health.passed, metadata=dataclasses.asdict(health))


ALL_CHECKS = [
    pairs_are_valid,
    quarantine_share_below_limit,
    anchors_cover_train_pairs,
    token_weights_are_valid,
    training_is_healthy,
]
