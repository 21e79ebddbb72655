"""The one Definitions object of tidpo: assets, checks, the training job, its schedule and sensor."""

import json

import dagster as dg

from tidpo_core.data.sources import inbox_files
from tidpo_pipeline.assets.anchors import anchor_responses
from tidpo_pipeline.assets.compare import COMPARISON_ASSETS, method_comparison_job
from tidpo_pipeline.assets.contrastive import contrastive_models
from tidpo_pipeline.assets.evaluate import evaluation
from tidpo_pipeline.assets.pairs import preference_pairs
from tidpo_pipeline.assets.policy import tidpo_policy
from tidpo_pipeline.assets.reference import reference_model
from tidpo_pipeline.assets.reward import reward_model
from tidpo_pipeline.assets.weights import token_weights
from tidpo_pipeline.checks import ALL_CHECKS
from tidpo_pipeline.console import tidpo_console
from tidpo_pipeline.resources import TidpoStorage, build_resources

ASSETS = [
    preference_pairs,
    reference_model,
    reward_model,
    anchor_responses,
    token_weights,
    tidpo_policy,
    evaluation,
]

tidpo_training = dg.define_asset_job(
    "tidpo_training",
    selection=dg.AssetSelection.assets(*ASSETS),
    description=(
        "Load pairs, build the reference, train the reward model (the GRPO baseline's), sample anchors, weigh "
        "tokens, train with TI-DPO, evaluate and gate."
    ),
)

weekly_retraining = dg.ScheduleDefinition(
    name="weekly_retraining",
    job=tidpo_training,
    cron_schedule="0 3 * * 1",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain every Monday 03:00; off by default, turn it on in the UI (Automation).",
)


@dg.sensor(job=tidpo_training, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def new_preference_data(context: dg.SensorEvaluationContext, storage: TidpoStorage) -> dg.SensorResult:
    """Starts tidpo_training when data files land in <data_dir>/inbox (new or changed)."""
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    current = {p.name: p.stat().st_mtime_ns for p in inbox_files(storage.inbox_dir)}
    changed = sorted(name for name, mtime in current.items() if seen.get(name) != mtime)
    if not changed:
        return dg.SensorResult(skip_reason="no new files in the inbox", cursor=json.dumps(current))
    run_key = "inbox:" + ",".join(f"{n}@{current[n]}" for n in changed)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"tidpo/new_files": ",".join(changed)[:200]})],
        cursor=json.dumps(current),
    )


defs = dg.Definitions(
    # contrastive_models feeds token_weights' `contrastive` estimator only: materialized on demand, not by the job.
    assets=[*ASSETS, contrastive_models, *COMPARISON_ASSETS],
    asset_checks=ALL_CHECKS,
    jobs=[tidpo_training, method_comparison_job],
    schedules=[weekly_retraining],
    sensors=[new_preference_data],
    resources=build_resources(),
    loggers={"console": tidpo_console},
)
