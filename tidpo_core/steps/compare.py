"""Compare methods: DPO, SimPO, TI-DPO and its ablations (and, asked for, the GRPO baseline) trained from one
reference and one data set over several seeds, each evaluated on every held-out metric, in one table (DuckDB,
CSV, PNG, an MLflow run)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tidpo_core.batching.features import EncodingSettings
from tidpo_core.evaluation.benchmarks import BenchmarkOptions
from tidpo_core.evaluation.comparison import (
    DEFAULT_METHODS,
    ESTIMATOR_METHODS,
    ComparisonInputs,
    ComparisonResult,
    run_method_comparison,
)
from tidpo_core.evaluation.comparison_report import (
    PLOT_METRICS,
    comparison_markdown,
    tradeoff_points,
    training_curves,
    write_comparison_csv,
    write_comparison_table,
    write_runs_csv,
)
from tidpo_core.evaluation.plots import (
    TradeoffPanel,
    save_comparison_png,
    save_tradeoff_png,
    save_training_curves_png,
)
from tidpo_core.evaluation.settings import ModelEvalSettings
from tidpo_core.models.generation import SamplingSettings
from tidpo_core.runtime import tracking
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.layout import DataDir
from tidpo_core.steps import OpenDb, RunTracking, log_to, publish_pictures
from tidpo_core.steps.evaluate import eval_settings_for
from tidpo_core.steps.reference import ReferenceHandle, with_optimizer_recipe
from tidpo_core.steps.reward import with_stored_reward_model
from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

COMPARISON_PNG = "method_comparison.png"
COMPARISON_CURVES_PNG = "method_comparison_curves.png"
COMPARISON_TRADEOFF_PNG = "method_comparison_tradeoff.png"


@dataclass(frozen=True)
class ComparisonSettings:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Any of dpo, simpo, tidpo, tidpo_no_attribution (lambda 0), tidpo_no_prior (lambda 1), tidpo_no_triplet (gamma 0);
    and, not in the default list: tidpo_surprisal and tidpo_contrastive (TI-DPO on the weights of that
    estimator, weighed here; contrastive needs the contrastive_models asset), and grpo (the GRPO baseline: it
    needs a reward, the built-in data's phrases or grpo_reward: model, and samples grpo_num_generations
    completions per prompt at every step)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = 100
    """Optimizer steps per run (100 x 8 pairs = 0.44 epoch of the embedded default's 1818 train pairs).
    6 methods x 3 seeds took 567 s of CPU in all (one thread; 19.5 min of wall time on a 2-core CPU that
    other jobs kept at load 8-10), inside the 30-minute budget; raise it where compute allows (-1: one
    epoch)."""
    batch_size: int = 32
    """Evaluation of each run: pairs per forward."""
    sample_prompts: int = 32
    max_new_tokens: int = 96
    critical_pairs: int = 32
    """Eval pairs whose attribution is computed for importance precision@k, per run."""
    sample_seed: int = 0
    keep_models: bool = False
    """Keep every trained policy folder (6 x seeds models); by default each is deleted once evaluated."""
    docs_dir: str = ""
    """If set, the comparison chart is also written to <docs_dir>/img/ (for the README)."""


@dataclass(frozen=True)
class ComparisonReport:
    comparison_id: str
    result: ComparisonResult
    table_markdown: str
    report_dir: Path
    csv_path: Path
    pictures: dict[str, Path]
    mlflow_run_id: str
    duckdb_rows: int


def metric_name(method: str, metric: str, stat: str) -> str:
    return f"comparison/{method}/{metric.replace('@', '_at_')}_{stat}"


def compare_methods(
    open_db: OpenDb,
    layout: DataDir,
    tracking_to: RunTracking,
    pairs_digest: str,
    reference: ReferenceHandle,
    anchors_fingerprint: str,
    weights: Mapping[str, Any],
    settings: ComparisonSettings,
    engine_options: Mapping[str, Any],
    benchmarks: Sequence[str] = (),
    benchmark_options: BenchmarkOptions | None = None,
    record: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> ComparisonReport:
    """Train and evaluate every (method, seed), write the report, log it to MLflow and store the table in DuckDB.
    `record` is kept with each run as it is evaluated (see run_method_comparison)."""
    log = log_to(log)
    engine_options = with_stored_reward_model(
        open_db, reference, with_optimizer_recipe(reference, engine_options)
    )
    recorded = {
        **asdict(settings),
        **engine_options,
        "benchmarks": list(benchmarks),
        "benchmark_options": repr(benchmark_options),
    }
    comparison_id = digest(
        {
            "pairs": pairs_digest,
            "reference": reference.fingerprint,
            "weights": weights["fingerprint"],
            "anchors": anchors_fingerprint,
            "config": recorded,
        }
    )
    output_dir = layout.comparison_run(comparison_id)
    weights_by_method = {
        method: estimator_weights(
            open_db, reference, anchors_fingerprint, weights, ESTIMATOR_METHODS[method], layout, log
        )
        for method in settings.methods
        if method in ESTIMATOR_METHODS
    }
    inputs = _comparison_inputs(layout, reference, anchors_fingerprint, weights, weights_by_method)
    log(
        f"comparison {comparison_id}: {len(settings.methods)} methods x {len(settings.seeds)} seeds, {settings.max_steps} steps each"
    )
    result = run_method_comparison(
        inputs,
        output_dir,
        methods=settings.methods,
        seeds=settings.seeds,
        train_overrides={"max_steps": settings.max_steps, **engine_options},
        eval_settings=comparison_eval_settings(
            settings, engine_options, EncodingSettings(**weights["encoding"])
        ),
        benchmarks=benchmarks,
        benchmark_options=benchmark_options,
        keep_models=settings.keep_models,
        record=record,
        log=log,
    )
    report_dir = output_dir / "report"
    table_markdown, csv_path, pictures = _write_report(result, report_dir, log)
    run_id = _log_run(tracking_to, comparison_id, recorded, result, report_dir)
    with open_db() as con:
        rows = write_comparison_table(con, comparison_id, result, run_id)
    publish_pictures(pictures.values(), settings.docs_dir)
    return ComparisonReport(
        comparison_id, result, table_markdown, report_dir, csv_path, pictures, run_id, rows
    )


def _comparison_inputs(
    layout: DataDir,
    reference: ReferenceHandle,
    anchors_fingerprint: str,
    weights: Mapping[str, Any],
    weights_by_method: Mapping[str, str],
) -> ComparisonInputs:
    """What every run of the comparison starts from: the data, the reference, the anchors and weight tables."""
    encoding = EncodingSettings(**weights["encoding"])
    importance = weights.get("importance", {})
    return ComparisonInputs(
        duckdb_path=str(layout.database),
        reference_model_path=reference.path,
        reference_revision=reference.revision,
        trust_remote_code=reference.trust_remote_code,
        weights_fingerprint=weights["fingerprint"],
        anchors_fingerprint=anchors_fingerprint,
        weight_lambda=float(importance.get("lambda", 0.7)),
        weight_normalization=importance.get("normalization", "max"),
        max_prompt_tokens=encoding.max_prompt_tokens,
        max_response_tokens=encoding.max_response_tokens,
        weights_by_method=dict(weights_by_method),
    )


def comparison_eval_settings(
    settings: ComparisonSettings, engine_options: Mapping[str, Any], encoding: EncodingSettings
) -> ModelEvalSettings:
    """How each run is evaluated: sampled from pi itself (temperature 1, no top-k/top-p), so the KL estimate is
    unbiased, with every run's samples drawn from the same seed."""
    return eval_settings_for(
        float(engine_options.get("beta", 0.1)),
        encoding,
        batch_size=settings.batch_size,
        sample_prompts=settings.sample_prompts,
        critical_pairs=settings.critical_pairs,
        sampling=SamplingSettings(
            max_new_tokens=settings.max_new_tokens,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            seed=settings.sample_seed,
        ),
    )


def estimator_weights(
    open_db: OpenDb,
    reference: ReferenceHandle,
    anchors_fingerprint: str,
    weights: Mapping[str, Any],
    estimator: str,
    layout: DataDir,
    log: Callable[[str], None],
) -> str:
    """The fingerprint of a weight table like the token_weights asset's (`weights`: its value) but with another
    importance estimator, weighed now where it is not stored yet."""
    importance = weights.get("importance", {})
    encoding = weights["encoding"]
    settings = WeighingSettings(
        estimator=estimator,  # type: ignore[arg-type]
        exclude_eos=bool(importance.get("exclude_eos", False)),
        weight_lambda=float(importance.get("lambda", 0.7)),
        normalization=importance.get("normalization", "max"),
        temperature=float(importance.get("temperature", 1.0)),
        max_prompt_tokens=int(encoding["max_prompt_tokens"]),
        max_response_tokens=int(encoding["max_response_tokens"]),
        reference_kl_top_k=int(weights.get("reference_kl_top_k", 0)),
    )
    log(f"token weights of estimator {estimator}:")
    return weigh_tokens(
        open_db, reference, anchors_fingerprint, settings, layout=layout, progress=False, log=log
    ).fingerprint


def _write_report(
    result: ComparisonResult, report_dir: Path, log: Callable[[str], None]
) -> tuple[str, Path, dict[str, Path]]:
    """The table (markdown, CSV per method and per run), the benchmarks, the chart and the curves."""
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    table_markdown = comparison_markdown(result.table)
    (report_dir / "method_comparison.md").write_text(table_markdown + "\n")
    csv_path = write_comparison_csv(result, report_dir / "method_comparison.csv")
    write_runs_csv(result, report_dir / "method_comparison_runs.csv")
    (report_dir / "benchmarks.json").write_text(
        json.dumps(
            [
                {"method": r.method, "seed": r.seed, "benchmarks": r.benchmarks}
                for r in result.runs
                if r.benchmarks
            ],
            indent=1,
        )
    )
    pictures: dict[str, Path] = {}
    try:
        save_comparison_png(
            result.table, PLOT_METRICS, report_dir / COMPARISON_PNG, title="mean ± std over seeds"
        )
        pictures["chart"] = report_dir / COMPARISON_PNG
    except ValueError as exc:
        log(f"no comparison chart: {exc}")
    curves = training_curves(result)
    if any(any(v) for v in curves.values()):
        save_training_curves_png(
            curves, report_dir / COMPARISON_CURVES_PNG, title="training, mean over seeds"
        )
        pictures["training_curves"] = report_dir / COMPARISON_CURVES_PNG
    frontier = tradeoff_points(result.runs, "kl_to_reference", "judged_win_rate")
    if frontier:  # the DPO paper's frontier: how far each run moved from the reference, for what gain
        save_tradeoff_png(
            [
                TradeoffPanel(
                    "KL to the reference, nats per answer",
                    "judged win rate over the reference",
                    frontier,
                    level=0.5,
                )
            ],
            report_dir / COMPARISON_TRADEOFF_PNG,
            title="one dot per run, a cross per method's mean",
        )
        pictures["tradeoff"] = report_dir / COMPARISON_TRADEOFF_PNG
    return table_markdown, csv_path, pictures


def _log_run(
    tracking_to: RunTracking,
    comparison_id: str,
    recorded: dict[str, Any],
    result: ComparisonResult,
    report_dir: Path,
) -> str:
    run_id = tracking.start_run(
        tracking_to.uri,
        tracking_to.experiment_id,
        "method_comparison",
        {**tracking_to.tags, "tidpo.comparison_id": comparison_id},
        {**recorded, "comparison_id": comparison_id},
    )
    tracking.log_metrics(
        tracking_to.uri,
        run_id,
        {
            metric_name(str(row["method"]), key[: -len("_mean")], stat): float(
                row[key if stat == "mean" else key[: -len("_mean")] + "_std"]
            )
            for row in result.table
            for key in row
            if key.endswith("_mean")
            for stat in ("mean", "std")
        },
    )
    tracking.log_artifacts(tracking_to.uri, run_id, report_dir, artifact_path="method_comparison")
    tracking.finish_run(tracking_to.uri, run_id)
    return run_id
