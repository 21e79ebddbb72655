"""The evaluation asset: held-out metrics of the trained policy vs its reference (preference metrics,
KL to the reference, diversity, critical-token metrics, opt-in benchmarks), pictures of token
importance and of training, and the gate that decides the MLflow `champion` alias."""

import math
from typing import Any

import dagster as dg

from tidpo_core.evaluation.benchmarks import BenchmarkResult
from tidpo_core.evaluation.evaluate import ModelEvaluation
from tidpo_core.evaluation.metrics import KEY_METRICS, STDERR_SUFFIX, comparison_rows, grouped_comparison_rows
from tidpo_core.steps import handle_of, settings_of
from tidpo_core.steps.evaluate import (
    EvaluationReport,
    EvaluationSettings,
    GateRule,
    TrainedPolicy,
    evaluate_policy,
)
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_pipeline.benchmark_config import BenchmarkConfig
from tidpo_pipeline.config_from_core import config_class, core_fields
from tidpo_pipeline.metadata import GROUP, markdown_table, picture_metadata, prompt_cell
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, QualityRules, TidpoDuckDB, TidpoStorage

EvaluationConfig = config_class(
    "EvaluationConfig",
    "How the policy is evaluated beside its reference.",
    BenchmarkConfig,
    core_fields(EvaluationSettings),
)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def _benchmark_rows(results: dict[str, list[BenchmarkResult]]) -> list[dict[str, str]]:
    rows = []
    for model, per_model in results.items():
        for r in per_model:
            scores = ", ".join(f"{k} {_fmt(v)}" for k, v in r.metrics.items())
            note = r.reason
            if r.details.get("unavailable_checks"):
                unavailable = "; ".join(f"{k}: {v}" for k, v in r.details["unavailable_checks"].items())
                note = f"checks unavailable: {unavailable}"
            rows.append(
                {
                    "model": model,
                    "task": r.task,
                    "status": r.status,
                    "documents": str(r.documents),
                    "scores": scores or "-",
                    "reason / note": note or "-",
                }
            )
    return rows


def _skipped_rows(
    evaluations: dict[str, ModelEvaluation], bench_results: dict[str, list[BenchmarkResult]]
) -> list[dict[str, str]]:
    rows = [
        {"model": m, "metrics": group, "reason": reason}
        for m, e in evaluations.items()
        for group, reason in e.skipped.items()
    ]
    rows += [
        {"model": m, "metrics": r.task, "reason": f"{r.status}: {r.reason}"}
        for m, results in bench_results.items()
        for r in results
        if r.status != "ok"
    ]
    return rows


def _samples_preview(evaluations: dict[str, ModelEvaluation]) -> list[dict[str, str]]:
    rows = []
    for model, e in evaluations.items():
        if e.samples is not None:
            rows += [
                {"model": model, "prompt": prompt_cell(p, 160), "sample": t}
                for p, t in list(zip(e.samples.prompts, e.samples.texts, strict=True))[:3]
            ]
    return rows


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "mlflow"},
    op_tags=MODEL_OP_TAGS,
    description=(
        "Held-out metrics of the trained policy vs the reference: preference accuracy and margins, KL to the "
        "reference, diversity, critical-token precision and phrase rate, opt-in benchmarks (TruthfulQA, IFEval, "
        "HumanEval); token-importance heatmaps and training curves; the gate that decides the champion alias."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            "evaluation_gate",
            asset="evaluation",
            description="trained metric > reference metric + margin, and no worse than the current champion's; only then the model becomes champion",
        )
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,  # type: ignore[valid-type]
    reference_model: dict,
    token_weights: dict,
    tidpo_policy: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
    quality: QualityRules,
):
    policy = handle_of(tidpo_policy, TrainedPolicy)
    report = evaluate_policy(
        duckdb.get_connection,
        storage.layout,
        mlflow_tracking.uri,
        mlflow_tracking.registered_model,
        ReferenceHandle.from_value(reference_model),
        token_weights.get("importance", {}),
        policy,
        settings_of(config, EvaluationSettings),
        settings_of(quality, GateRule),
        config.benchmarks,
        config.benchmark_options(),
        log=context.log.info,
    )
    return dg.MaterializeResult(
        value={
            "metrics": report.metrics,
            "gate_passed": report.gate.passed,
            "champion": report.champion,
            "output_dir": str(report.out_dir),
        },
        metadata=_evaluation_metadata(report, policy),
        check_results=[_gate_check(report, quality)],
    )


def _evaluation_metadata(report: EvaluationReport, policy: TrainedPolicy) -> dict[str, Any]:
    """The asset's metadata, in the order the UI lists it: the verdict, key metrics, every metric by group,
    what was skipped, benchmarks, samples, pictures, then the gate's details and the MLflow lineage."""
    metrics = report.metrics
    key_names = [name for name, _ in KEY_METRICS if name in metrics["policy"]]
    return {
        "summary": dg.MetadataValue.md(_summary(report, policy.model_version)),
        **_key_metric_tables(report, key_names),
        **_key_metric_values(metrics["policy"], key_names),
        **{
            f"metrics: {group}": dg.MetadataValue.md(markdown_table(rows))
            for group, rows in grouped_comparison_rows(metrics["policy"], metrics["reference"]).items()
        },
        **_report_tables(report),
        **picture_metadata(report.pictures),
        "output_dir": dg.MetadataValue.path(str(report.out_dir)),
        **_gate_metadata(report),
        "mlflow_run_id": policy.mlflow_run_id,
        "mlflow_model_version": str(policy.model_version),
    }


def _summary(report: EvaluationReport, version: int | None) -> str:
    """The gate's outcome, short enough for the UI's one-line preview (the numbers follow in the tables)."""
    gate = report.gate
    outcome = f"version {version} is the champion" if report.champion else "the champion is unchanged"
    return (
        f"**Gate {'passed' if gate.passed else 'failed'}** (compared with {gate.compared_with}): {outcome}."
    )


def _key_metric_tables(report: EvaluationReport, key_names: list[str]) -> dict[str, dg.MetadataValue]:
    """The key metrics of the policy beside the reference's, and beside the champion's when one was compared."""
    metrics = report.metrics
    tables = {
        "key_metrics": dg.MetadataValue.md(
            markdown_table(comparison_rows(metrics["policy"], metrics["reference"], key_names))
        )
    }
    if "champion" in metrics:
        tables["key_metrics_vs_champion"] = dg.MetadataValue.md(
            markdown_table(
                comparison_rows(
                    metrics["policy"],
                    metrics["champion"],
                    key_names,
                    baseline=f"champion v{report.champion_version}",
                )
            )
        )
    return tables


def _key_metric_values(policy_metrics: dict[str, float], key_names: list[str]) -> dict[str, float]:
    """The policy's key metrics as numbers, which the UI plots across materializations, with the standard
    error of those estimated by sampling (the KL) where it is finite."""
    values = {f"policy/{k}": round(policy_metrics[k], 4) for k in key_names}
    values |= {
        f"policy/{k}{STDERR_SUFFIX}": round(policy_metrics[k + STDERR_SUFFIX], 4)
        for k in key_names
        if math.isfinite(policy_metrics.get(k + STDERR_SUFFIX, math.nan))
    }
    return values


def _report_tables(report: EvaluationReport) -> dict[str, dg.MetadataValue]:
    """What was skipped, the benchmark results and a few samples per model, each with a note when empty."""
    skipped = _skipped_rows(report.evaluations, report.benchmarks)
    samples = _samples_preview(report.evaluations)
    return {
        "skipped": dg.MetadataValue.md(markdown_table(skipped) if skipped else "_nothing skipped_"),
        "benchmarks": dg.MetadataValue.md(
            markdown_table(_benchmark_rows(report.benchmarks))
            if report.benchmarks
            else "_no benchmarks requested (config `benchmarks`)_"
        ),
        "samples": dg.MetadataValue.md(markdown_table(samples, 160) if samples else "_no samples_"),
    }


def _gate_metadata(report: EvaluationReport) -> dict[str, Any]:
    """The gate's verdict, what it compared with, the eval pairs shared with the champion's evaluation, and
    whether this version now holds the alias."""
    shared = report.shared_with_champion
    return {
        "gate": report.verdict,
        "compared_with": report.gate.compared_with,
        **(
            {"eval_pairs_shared_with_champion": shared[0], "eval_pairs_new_since_champion": shared[1]}
            if shared is not None
            else {}
        ),
        "champion": report.champion,
    }


def _gate_check(report: EvaluationReport, quality: QualityRules) -> dg.AssetCheckResult:
    """The evaluation_gate check: the gate's decision, described by its verdict and rule."""
    return dg.AssetCheckResult(
        check_name="evaluation_gate",
        passed=report.gate.passed,
        metadata={
            "description": report.verdict,
            "metric": quality.gate_metric,
            "margin": quality.gate_margin,
            "tiebreak": str(quality.gate_tiebreak),
        },
    )
