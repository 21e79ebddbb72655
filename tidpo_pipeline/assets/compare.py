"""The method comparison: DPO, SimPO, TI-DPO and its three ablations (and, with `grpo` in the methods, the
GRPO baseline) from one reference and one data set, over several seeds, in one table (the paper's
comparison in miniature).

Not part of `tidpo_training`: it trains 6 methods x N seeds, so it has its own job,
`method_comparison`, started by hand (UI: Jobs -> method_comparison, or
`dagster job execute -m tidpo_pipeline.definitions -j method_comparison`). Its run config goes under
`ops: compare_methods: config:` (the op's name; see the note at the decorator).
"""

import dagster as dg
from pydantic import Field

from tidpo_core.steps import RunTracking, settings_of
from tidpo_core.steps.compare import ComparisonSettings, compare_methods
from tidpo_core.steps.policy import SET_BY_THE_RUN
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.training import TrainConfig
from tidpo_pipeline.benchmark_config import BenchmarkConfig
from tidpo_pipeline.config_from_core import config_class, core_fields
from tidpo_pipeline.metadata import GROUP, markdown_table, mlflow_tags, picture_metadata
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, TidpoDuckDB, TidpoStorage

# The engine options every run of the comparison shares: the policy's, less what the comparison sets
# per run (the method's loss and switches, the seed) and its own short-run defaults.
COMPARISON_TRAINING_FIELDS = core_fields(
    TrainConfig,
    exclude=(*SET_BY_THE_RUN, "loss_type", "seed", "max_steps", "checkpoint_every", "keep_checkpoints"),
    defaults={"warmup_steps": 4},
)


class ComparisonBenchmarks(BenchmarkConfig):
    benchmarks: list[str] = Field(default_factory=list)
    """lm-eval benchmarks for every run (see the evaluation asset); none by default: 6 methods x seeds runs."""


MethodComparisonConfig = config_class(
    "MethodComparisonConfig",
    "The method comparison: methods x seeds from one reference and data set; every training option is shared.",
    ComparisonBenchmarks,
    core_fields(ComparisonSettings),
    COMPARISON_TRAINING_FIELDS,
)


# A multi_asset only to name the op: the job is called `method_comparison`, and a job and an op may
# not share a name in one Dagster repository; the asset key stays `method_comparison`.
@dg.multi_asset(
    name="compare_methods",
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    specs=[
        dg.AssetSpec(
            "method_comparison",
            kinds={"pytorch", "duckdb", "mlflow"},
            deps=["preference_pairs", "reference_model", "anchor_responses", "token_weights"],
            description=(
                "DPO, SimPO, TI-DPO and its ablations (no gradient attribution, no Gaussian prior, no triplet), and GRPO "
                "when listed, trained from the same reference and data over several seeds, each evaluated on every "
                "held-out metric (with training seconds and, where a reward exists, reward_model_score); one table "
                "of mean and spread (DuckDB method_comparison, CSV + PNG in MLflow)."
            ),
        )
    ],
)
def method_comparison(
    context: dg.AssetExecutionContext,
    config: MethodComparisonConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    token_weights: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    report = compare_methods(
        duckdb.get_connection,
        storage.layout,
        RunTracking(mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context)),
        preference_pairs["digest"],
        ReferenceHandle.from_value(reference_model),
        anchor_responses["fingerprint"],
        token_weights,
        settings_of(config, ComparisonSettings),
        {name: getattr(config, name) for name in COMPARISON_TRAINING_FIELDS},
        config.benchmarks,
        config.benchmark_options(),
        log=context.log.info,
    )
    result = report.result
    runs_md = markdown_table(
        [
            {
                "method": r.method,
                "seed": r.seed,
                "train_s": f"{r.train_seconds:.0f}" + (" (reused)" if r.reused else ""),
                "eval_s": f"{r.eval_seconds:.0f}",
                "reward_accuracy": f"{r.metrics.get('reward_accuracy', float('nan')):.3f}",
                "reward_model_score": f"{r.metrics.get('reward_model_score', float('nan')):.3f}",
            }
            for r in result.runs
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "table": dg.MetadataValue.md(report.table_markdown),
            **picture_metadata(report.pictures),
            "runs": dg.MetadataValue.md(runs_md),
            "csv": dg.MetadataValue.path(str(report.csv_path)),
            "report_dir": dg.MetadataValue.path(str(report.report_dir)),
            "comparison_id": report.comparison_id,
            "duckdb_rows": report.duckdb_rows,
            "mlflow_run_id": report.mlflow_run_id,
            "seconds": result.seconds,
            "reward_model_score_reward": result.reward or "none (no reward model, no built-in phrases)",
            "methods": dg.MetadataValue.json(list(config.methods)),
            "seeds": dg.MetadataValue.json(list(config.seeds)),
        },
    )


COMPARISON_ASSETS = [method_comparison]

method_comparison_job = dg.define_asset_job(
    "method_comparison",
    selection=dg.AssetSelection.assets(method_comparison),
    description="Train DPO, SimPO, TI-DPO and its ablations (and GRPO, when listed) over several seeds and compare them in one table.",
)

__all__ = ["COMPARISON_ASSETS", "MethodComparisonConfig", "method_comparison", "method_comparison_job"]
