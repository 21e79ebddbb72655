"""The method comparison: DPO, SimPO, TI-DPO and its three ablations from one reference and one data
set, over several seeds, in one table (the paper's comparison in miniature).

Not part of `tidpo_training`: it trains 6 methods x N seeds, so it has its own job,
`method_comparison`, started by hand (UI: Jobs -> method_comparison, or
`dagster job execute -m tidpo_pipeline.definitions -j method_comparison`). Its run config goes under
`ops: compare_methods: config:` (the op's name; see the note at the decorator).
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import dagster as dg
from mlflow.entities import Metric, Param
from pydantic import Field

from tidpo_core import tracking
from tidpo_core.comparison import (
    METHODS,
    PLOT_METRICS,
    ComparisonInputs,
    comparison_markdown,
    run_method_comparison,
    training_curves,
    write_comparison_csv,
    write_comparison_table,
    write_runs_csv,
)
from tidpo_core.evaluation import EvalSettings
from tidpo_core.features import EncodingSettings
from tidpo_core.fingerprint import digest
from tidpo_core.generation import SamplingSettings
from tidpo_core.plots import png_markdown, save_comparison_png, save_training_curves_png
from tidpo_pipeline.benchmark_config import BenchmarkConfig
from tidpo_pipeline.metadata import GROUP, markdown_table, mlflow_tags
from tidpo_pipeline.resources import MlflowTracking, TidpoDuckDB, TidpoStorage

COMPARISON_PNG = "method_comparison.png"
COMPARISON_CURVES_PNG = "method_comparison_curves.png"


class MethodComparisonConfig(BenchmarkConfig):
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    """Any of dpo, simpo, tidpo, tidpo_no_attribution (lambda 0), tidpo_no_prior (lambda 1), tidpo_no_triplet (gamma 0)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    max_steps: int = 100
    """Optimizer steps per run (100 x 8 pairs = 0.44 epoch of the embedded default's 1818 train pairs).
    6 methods x 3 seeds took 567 s of CPU in all (one thread; 19.5 min of wall time on a 2-core CPU that
    other jobs kept at load 8-10), inside the 30-minute budget; raise it where compute allows (-1: one
    epoch)."""
    per_device_batch_size: int = 8
    learning_rate: float = 5e-4
    warmup_steps: int = 4
    beta: float = 0.1
    alpha: float = 0.5
    gamma: float = 0.1
    # evaluation of each run
    batch_size: int = 32
    sample_prompts: int = 32
    max_new_tokens: int = 96
    critical_pairs: int = 32
    """Eval pairs whose attribution is computed for importance precision@k, per run."""
    sample_seed: int = 0
    torch_threads: int = 1
    """torch intra-op threads while the comparison runs (0: torch's default). The default, 1, is what the
    budget below was measured with: on a machine busy with other jobs, 2 threads that wait on each other
    were 3x slower than 1; on an idle multi-core machine or a GPU set 0."""
    keep_models: bool = False
    """Keep every trained policy folder (6 x seeds models); by default each is deleted once evaluated."""
    benchmarks: list[str] = Field(default_factory=list)
    """lm-eval benchmarks for every run (see the evaluation asset); none by default: 6 methods x seeds runs."""
    docs_dir: str = ""
    """If set, the comparison chart is also written to <docs_dir>/img/ (for the README)."""


def _metric_name(method: str, metric: str, stat: str) -> str:
    return f"comparison/{method}/{metric.replace('@', '_at_')}_{stat}"


# A multi_asset only to name the op: the job is called `method_comparison`, and a job and an op may
# not share a name in one Dagster repository; the asset key stays `method_comparison`.
@dg.multi_asset(
    name="compare_methods",
    group_name=GROUP,
    specs=[
        dg.AssetSpec(
            "method_comparison",
            kinds={"pytorch", "duckdb", "mlflow"},
            deps=["preference_pairs", "reference_model", "anchor_responses", "token_weights"],
            description=(
                "DPO, SimPO, TI-DPO and its ablations (no gradient attribution, no Gaussian prior, no triplet) trained "
                "from the same reference and data over several seeds, each evaluated on every held-out metric; one table "
                "of mean and spread (DuckDB method_comparison, CSV + PNG in MLflow)."
            ),
        )
    ],
)
def method_comparison(
    context: dg.AssetExecutionContext,
    config: MethodComparisonConfig,
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    token_weights: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    experiment_id = mlflow_tracking.experiment_id()
    encoding = EncodingSettings(**token_weights["encoding"])
    importance = token_weights.get("importance", {})
    comparison_id = digest(
        {
            "pairs": preference_pairs["digest"],
            "reference": reference_model["fingerprint"],
            "weights": token_weights["fingerprint"],
            "anchors": anchor_responses["fingerprint"],
            "config": config.model_dump(),
        }
    )
    output_dir = storage.models_dir / "comparison" / comparison_id
    inputs = ComparisonInputs(
        duckdb_path=str(storage.duckdb_path),
        reference_model_path=reference_model["path"],
        reference_revision=reference_model.get("revision"),
        trust_remote_code=reference_model.get("trust_remote_code", False),
        weights_fingerprint=token_weights["fingerprint"],
        anchors_fingerprint=anchor_responses["fingerprint"],
        weight_lambda=float(importance.get("lambda", 0.7)),
        weight_normalization=importance.get("normalization", "max"),
        max_prompt_tokens=encoding.max_prompt_tokens,
        max_response_tokens=encoding.max_response_tokens,
    )
    eval_settings = EvalSettings(
        beta=config.beta,
        batch_size=config.batch_size,
        encoding=encoding,
        sample_prompts=config.sample_prompts,
        critical_pairs=config.critical_pairs,
        sampling=SamplingSettings(
            max_new_tokens=config.max_new_tokens,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            seed=config.sample_seed,
            batch_size=min(config.batch_size, 32),
            max_prompt_tokens=encoding.max_prompt_tokens,
        ),
    )
    benchmark_options = config.benchmark_options()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    context.log.info(
        f"comparison {comparison_id}: {len(config.methods)} methods x {len(config.seeds)} seeds, {config.max_steps} steps each"
    )
    result = run_method_comparison(
        inputs,
        output_dir,
        methods=config.methods,
        seeds=config.seeds,
        train_overrides={
            "max_steps": config.max_steps,
            "per_device_batch_size": config.per_device_batch_size,
            "learning_rate": config.learning_rate,
            "warmup_steps": config.warmup_steps,
            "beta": config.beta,
            "alpha": config.alpha,
            "gamma": config.gamma,
        },
        eval_settings=eval_settings,
        benchmarks=config.benchmarks,
        benchmark_options=benchmark_options,
        keep_models=config.keep_models,
        torch_threads=config.torch_threads,
        log=context.log.info,
    )

    report_dir = output_dir / "report"
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    table_md = comparison_markdown(result.table)
    (report_dir / "method_comparison.md").write_text(table_md + "\n")
    csv_path = write_comparison_csv(result, report_dir / "method_comparison.csv")
    write_runs_csv(result, report_dir / "method_comparison_runs.csv")
    (report_dir / "benchmarks.json").write_text(
        json.dumps([{"method": r.method, "seed": r.seed, "benchmarks": r.benchmarks} for r in result.runs if r.benchmarks], indent=1)
    )
    pictures: dict = {}
    try:
        save_comparison_png(result.table, PLOT_METRICS, report_dir / COMPARISON_PNG, title="mean ± std over seeds")
        pictures["chart"] = dg.MetadataValue.md(png_markdown(report_dir / COMPARISON_PNG, "method comparison"))
        pictures["chart_png"] = dg.MetadataValue.path(str(report_dir / COMPARISON_PNG))
    except ValueError as exc:
        context.log.warning(f"no comparison chart: {exc}")
    curves = training_curves(result)
    if any(any(v) for v in curves.values()):
        save_training_curves_png(curves, report_dir / COMPARISON_CURVES_PNG, title="training, mean over seeds")
        pictures["training_curves"] = dg.MetadataValue.md(png_markdown(report_dir / COMPARISON_CURVES_PNG, "training curves"))

    client = tracking.client(mlflow_tracking.uri)
    run = client.create_run(experiment_id, run_name="method_comparison", tags={**mlflow_tags(context), "tidpo.comparison_id": comparison_id})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in {**config.model_dump(), "comparison_id": comparison_id}.items()])
    now = int(time.time() * 1000)
    metrics = [
        Metric(_metric_name(str(row["method"]), key[: -len("_mean")], stat), float(row[key if stat == "mean" else key[: -len("_mean")] + "_std"]), now, 0)
        for row in result.table
        for key in row
        if key.endswith("_mean")
        for stat in ("mean", "std")
        if math.isfinite(float(row[key if stat == "mean" else key[: -len("_mean")] + "_std"]))
    ]
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 900])
    client.log_artifacts(run_id, str(report_dir), artifact_path="method_comparison")
    client.set_terminated(run_id)
    with duckdb.get_connection() as con:
        rows = write_comparison_table(con, comparison_id, result, run_id)
    if config.docs_dir:
        img = Path(config.docs_dir) / "img"
        img.mkdir(parents=True, exist_ok=True)
        for name in (COMPARISON_PNG, COMPARISON_CURVES_PNG):
            if (report_dir / name).exists():
                shutil.copyfile(report_dir / name, img / name)
    runs_md = markdown_table(
        [
            {
                "method": r.method,
                "seed": r.seed,
                "train_s": f"{r.train_seconds:.0f}" + (" (reused)" if r.reused else ""),
                "eval_s": f"{r.eval_seconds:.0f}",
                "reward_accuracy": f"{r.metrics.get('reward_accuracy', float('nan')):.3f}",
            }
            for r in result.runs
        ]
    )
    return dg.MaterializeResult(
        metadata={
            "table": dg.MetadataValue.md(table_md),
            **pictures,
            "runs": dg.MetadataValue.md(runs_md),
            "csv": dg.MetadataValue.path(str(csv_path)),
            "report_dir": dg.MetadataValue.path(str(report_dir)),
            "comparison_id": comparison_id,
            "duckdb_rows": rows,
            "mlflow_run_id": run_id,
            "seconds": result.seconds,
            "methods": dg.MetadataValue.json(list(config.methods)),
            "seeds": dg.MetadataValue.json(list(config.seeds)),
        },
    )


COMPARISON_ASSETS = [method_comparison]

method_comparison_job = dg.define_asset_job(
    "method_comparison",
    selection=dg.AssetSelection.assets(method_comparison),
    description="Train DPO, SimPO, TI-DPO and its ablations over several seeds and compare them in one table.",
)

__all__ = ["COMPARISON_ASSETS", "MethodComparisonConfig", "method_comparison", "method_comparison_job"]
