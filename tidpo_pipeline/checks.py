"""Asset checks guarding each edge of the graph (the evaluation gate lives with its asset)."""


import dataclasses

import dagster as dg

from tidpo_core.evaluation import training_health
from tidpo_pipeline.assets import anchor_responses, preference_pairs, tidpo_policy, token_weights
from tidpo_pipeline.resources import QualityPolicy, TidpoDuckDB


@dg.asset_check(asset=preference_pairs, blocking=True, description="No empty text and no chosen == rejected among stored pairs.")
def pairs_are_valid(duckdb: TidpoDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        empty, identical, total = con.execute(
            """
            SELECT count(*) FILTER (WHERE trim(prompt) = '' OR trim(chosen) = '' OR trim(rejected) = ''),
                   count(*) FILTER (WHERE trim(chosen) = trim(rejected)),
                   count(*)
            FROM preference_pairs
            """
        ).fetchone()
    return dg.AssetCheckResult(
        passed=bool(total > 0 and empty == 0 and identical == 0),
        metadata={"pairs": total, "empty_text": empty, "chosen_equals_rejected": identical},
    )


@dg.asset_check(asset=preference_pairs, description="The share of quarantined rows stays below the configured limit.")
def quarantine_share_below_limit(duckdb: TidpoDuckDB, quality: QualityPolicy) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        accepted = con.execute("SELECT count(*) FROM preference_pairs").fetchone()[0]
        reasons = dict(con.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
    quarantined = sum(reasons.values())
    share = quarantined / max(accepted + quarantined, 1)
    return dg.AssetCheckResult(
        passed=share <= quality.max_quarantine_share,
        metadata={"quarantine_share": share, "limit": quality.max_quarantine_share, "reasons": dg.MetadataValue.json(reasons)},
    )


@dg.asset_check(asset=anchor_responses, description="Every train pair has an anchor response.")
def anchors_cover_train_pairs(anchor_responses: dict, duckdb: TidpoDuckDB) -> dg.AssetCheckResult:
    with duckdb.get_connection() as con:
        missing = con.execute(
            """SELECT count(*) FROM preference_pairs p LEFT JOIN anchor_responses a
               ON a.pair_id = p.pair_id AND a.fingerprint = ? WHERE p.split = 'train' AND a.pair_id IS NULL""",
            [anchor_responses["fingerprint"]],
        ).fetchone()[0]
    return dg.AssetCheckResult(passed=missing == 0, metadata={"train_pairs_without_anchor": missing})


@dg.asset_check(
    asset=token_weights,
    additional_ins={"anchor_responses": dg.AssetIn("anchor_responses")},
    blocking=True,
    description="Weights are finite, mean 1 per response, and cover every train response.")
def token_weights_are_valid(token_weights: dict, anchor_responses: dict, duckdb: TidpoDuckDB, quality: QualityPolicy) -> dg.AssetCheckResult:
    fingerprint = token_weights["fingerprint"]
    with duckdb.get_connection() as con:
        non_finite = con.execute(
            """SELECT count(*) FROM token_weights WHERE fingerprint = ? AND NOT (isfinite(weight)
               AND isfinite(attribution) AND isfinite(prior) AND isfinite(reference_logp))""",
            [fingerprint],
        ).fetchone()[0]
        worst_mean = con.execute(
            """SELECT coalesce(max(abs(m - 1)), 0) FROM (SELECT avg(weight) AS m FROM token_weights
               WHERE fingerprint = ? GROUP BY pair_id, side)""",
            [fingerprint],
        ).fetchone()[0]
        uncovered = con.execute(
            """
            WITH wanted AS (
                SELECT pair_id, s.side FROM preference_pairs, (VALUES ('chosen'), ('rejected')) s(side) WHERE split = 'train'
                UNION ALL
                SELECT a.pair_id, 'anchor' FROM anchor_responses a JOIN preference_pairs p USING (pair_id)
                WHERE a.fingerprint = ? AND p.split = 'train'
            )
            SELECT count(*) FROM wanted w WHERE NOT EXISTS (
                SELECT 1 FROM token_weights t WHERE t.fingerprint = ? AND t.pair_id = w.pair_id AND t.side = w.side)
            """,
            [anchor_responses["fingerprint"], fingerprint],
        ).fetchone()[0]
    passed = non_finite == 0 and worst_mean <= quality.weight_mean_tolerance and uncovered == 0
    return dg.AssetCheckResult(
        passed=bool(passed),
        metadata={
            "non_finite_values": non_finite,
            "max_abs_mean_weight_minus_1": float(worst_mean),
            "uncovered_responses": uncovered,
        },
    )


@dg.asset_check(asset=tidpo_policy, description="No NaN/inf in training, and the reward margin grew.")
def training_is_healthy(tidpo_policy: dict) -> dg.AssetCheckResult:
    health = training_health(tidpo_policy["step_history"])
    return dg.AssetCheckResult(passed=health.passed, metadata=dataclasses.asdict(health))


ALL_CHECKS = [pairs_are_valid, quarantine_share_below_limit, anchors_cover_train_pairs, token_weights_are_valid, training_is_healthy]
