"""The evaluation asset: held-out metrics of the trained policy vs its reference (preference metrics,
KL to the reference, diversity, critical-token metrics, opt-in benchmarks), pictures of token
importance and of training, and the gate that decides the MLflow `champion` alias."""

import json
import math
import shutil
import time
from pathlib import Path

import dagster as dg
from mlflow.entities import Metric

from tidpo_core import store, tracking
from tidpo_core.benchmarks import BenchmarkResult, benchmark_metrics, run_benchmarks
from tidpo_core.evaluation import (
    EvalSettings,
    ModelEvaluation,
    best_importance_variant,
    evaluate_model,
    has_critical_spans,
    importance_heatmap_sections,
    promotion_decision,
    score_pairs,
    single_thread_if_small,
)
from tidpo_core.features import EncodingSettings
from tidpo_core.generation import SamplingSettings, sample_responses
from tidpo_core.metrics import KEY_METRICS, comparison_rows, grouped_comparison_rows
from tidpo_core.modeling import load_model_and_tokenizer
from tidpo_core.plots import (
    png_markdown,
    save_token_heatmap_png,
    save_training_curves_png,
    token_heatmap_html,
)
from tidpo_pipeline.assets import reference_loading
from tidpo_pipeline.benchmark_config import BenchmarkConfig
from tidpo_pipeline.metadata import GROUP, markdown_table
from tidpo_pipeline.resources import MlflowTracking, QualityPolicy, TidpoDuckDB, TidpoStorage

CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
HEATMAP_PNG = "token_importance_heatmap.png"
CURVES_PNG = "training_curves.png"

# --- evaluation ------------------------------------------------------------------------------------


class EvaluationConfig(BenchmarkConfig):
    batch_size: int = 32
    sample_prompts: int = 64
    """Eval prompts answered by each model for KL(pi||ref), diversity and the critical-phrase rate (0: skip)."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    """Sampling for the KL estimate: temperature 1 with top_k 0 and top_p 1 samples pi itself (unbiased)."""
    top_k: int = 0
    top_p: float = 1.0
    sample_seed: int = 0
    critical_k: int | None = None
    """k of importance precision@k; None: the number of critical-span tokens of each response."""
    critical_pairs: int | None = 64
    """Eval pairs with critical spans whose token attribution is computed for precision@k (None: all)."""
    heatmap_pairs: int = 3
    """Eval pairs drawn as token-importance heatmaps (0: none)."""
    docs_dir: str = ""
    """If set, the heatmap and training-curve PNGs are also written to <docs_dir>/img/ (for the README)."""


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
            rows.append({"model": model, "task": r.task, "status": r.status, "documents": str(r.documents), "scores": scores or "-", "reason / note": note or "-"})
    return rows


def _training_series(client, run_id: str, run_dir: str | None, loss_history: list[float]) -> dict[str, list[tuple[int, float]]]:
    """Curves from the MLflow run's metric history; else the run's summary.json; else loss_history."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key in CURVE_METRICS:
        try:
            history = client.get_metric_history(run_id, key)
        except Exception:  # a tracking hiccup must not cost the evaluation its pictures
            history = []
        if history:
            series[key] = sorted((int(m.step), float(m.value)) for m in history)
    if series:
        return series
    summary = Path(run_dir) / "summary.json" if run_dir else None
    if summary is not None and summary.exists():
        for entry in json.loads(summary.read_text()).get("history", []):
            for key in CURVE_METRICS:
                if key in entry:
                    series.setdefault(key, []).append((int(entry["step"]), float(entry[key])))
        if series:
            return series
    return {"loss": [(i + 1, float(v)) for i, v in enumerate(loss_history)]}


def _skipped_rows(evaluations: dict[str, ModelEvaluation]) -> list[dict[str, str]]:
    return [{"model": m, "metrics": group, "reason": reason} for m, e in evaluations.items() for group, reason in e.skipped.items()]


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "mlflow"},
    description=(
        "Held-out metrics of the trained policy vs the reference: preference accuracy and margins, KL to the "
        "reference, diversity, critical-token precision and phrase rate, opt-in benchmarks (TruthfulQA, IFEval, "
        "HumanEval); token-importance heatmaps and training curves; the gate that decides the champion alias."
    ),
    check_specs=[dg.AssetCheckSpec("evaluation_gate", asset="evaluation", description="trained metric > reference metric + margin, and no worse than the current champion's; only then the model becomes champion")],
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    reference_model: dict,
    token_weights: dict,
    tidpo_policy: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    mlflow_tracking: MlflowTracking,
    quality: QualityPolicy,
):
    encoding = EncodingSettings(**tidpo_policy["encoding"])
    importance = token_weights.get("importance", {})
    settings = EvalSettings(
        beta=tidpo_policy["beta"],
        batch_size=config.batch_size,
        encoding=encoding,
        sample_prompts=config.sample_prompts,
        sampling=SamplingSettings(
            max_new_tokens=config.max_new_tokens,
            top_k=config.top_k,
            top_p=config.top_p,
            temperature=config.temperature,
            seed=config.sample_seed,
            batch_size=min(config.batch_size, 32),
            max_prompt_tokens=encoding.max_prompt_tokens,
        ),
        critical_k=config.critical_k,
        critical_pairs=config.critical_pairs,
        weight_lambda=float(importance.get("lambda", 0.7)),
        weight_normalization=importance.get("normalization", "max"),
    )
    with duckdb.get_connection() as con:
        pairs = store.read_pairs(con, split="eval")
    reference, tokenizer = load_model_and_tokenizer(**reference_loading(reference_model))
    # The policy is the reference's architecture, saved by the engine: it needs the same code trust.
    policy, _ = load_model_and_tokenizer(tidpo_policy["model_path"], trust_remote_code=reference_model.get("trust_remote_code", False))
    with single_thread_if_small(reference):
        reference_scores = score_pairs(reference, tokenizer, pairs, encoding, config.batch_size, progress=True)
    evaluations = {
        "reference": evaluate_model(reference, reference, tokenizer, pairs, settings, reference_scores=reference_scores, progress=True),
        "policy": evaluate_model(policy, reference, tokenizer, pairs, settings, reference_scores=reference_scores, progress=True),
    }
    version = tidpo_policy.get("model_version")
    # The challenger is also judged against today's champion, on the same held-out pairs (none on a first
    # run, or when this very version already holds the alias).
    champion_version = tracking.champion_version(mlflow_tracking.uri, mlflow_tracking.registered_model)
    if champion_version is not None and champion_version != str(version):
        context.log.info(f"evaluating the current champion (version {champion_version}) on the same pairs")
        champion_model, _ = tracking.load_registered_model(
            mlflow_tracking.uri, f"models:/{mlflow_tracking.registered_model}/{champion_version}"
        )
        evaluations["champion"] = evaluate_model(
            champion_model, reference, tokenizer, pairs, settings, reference_scores=reference_scores, progress=True
        )
    else:
        champion_version = None
    metrics = {model: dict(e.metrics) for model, e in evaluations.items()}

    bench_results: dict[str, list[BenchmarkResult]] = {}
    if config.benchmarks:
        options = config.benchmark_options()
        for model, path in (("reference", reference_model["path"]), ("policy", tidpo_policy["model_path"])):
            context.log.info(f"benchmarks {config.benchmarks} on the {model}")
            bench_results[model] = run_benchmarks(path, config.benchmarks, options)
            metrics[model].update(benchmark_metrics(bench_results[model]))

    gate = promotion_decision(
        metrics["policy"],
        metrics["reference"],
        metrics.get("champion"),
        quality.gate_metric,
        quality.gate_margin,
        quality.gate_tiebreak,
        quality.champion_margin,
        champion_version,
    )
    run_id = tidpo_policy["mlflow_run_id"]
    pair_ids = [p.pair_id for p in pairs]
    with duckdb.get_connection() as con:
        store.write_metrics(con, run_id, metrics)
        store.record_evaluation_pairs(con, run_id, pair_ids)
        # Judged on the same pairs as the champion was? (The split is a hash of each pair, so old eval
        # pairs stay eval pairs; new data can only add some.)
        shared_new = (
            store.shared_evaluation_pairs(con, tracking.version_run_id(mlflow_tracking.uri, champion_version, mlflow_tracking.registered_model), pair_ids)
            if champion_version is not None
            else None
        )
    client = tracking.client(mlflow_tracking.uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"eval/{model}/{name}", float(value), now, 0)
            for model, values in metrics.items()
            for name, value in values.items()
            if math.isfinite(value)
        ],
    )
    client.log_metric(run_id, "eval/gate_passed", float(gate.passed))

    # --- pictures and files ---
    out_dir = storage.root / "evaluation" / run_id
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    pictures: dict = {}
    heatmap_pairs = sorted(pairs, key=lambda p: (not has_critical_spans(p), p.pair_id))[: max(config.heatmap_pairs, 0)]
    best_variant = best_importance_variant(metrics["reference"])
    if heatmap_pairs:
        with single_thread_if_small(reference):
            anchor_texts = sample_responses(reference, tokenizer, [p.prompt for p in heatmap_pairs], SamplingSettings(seed=config.sample_seed))
        sections = importance_heatmap_sections(
            reference,
            tokenizer,
            heatmap_pairs,
            encoding,
            anchors={p.pair_id: a for p, a in zip(heatmap_pairs, anchor_texts, strict=True)},
            weight_lambda=settings.weight_lambda,
            normalization=settings.weight_normalization,
            batch_size=config.batch_size,
            compare_with=best_variant,
        )
        caption = (
            f"Hybrid token weight (lambda {settings.weight_lambda}) under the reference model: darker = more important; "
            "outlined = the critical span; anchor = a response sampled from the reference. Rows named side: "
            f"{best_variant} use that estimator (the best precision@k of this evaluation) instead of the paper's attribution."
            if best_variant
            else f"Hybrid token weight (lambda {settings.weight_lambda}) under the reference model: darker = more important; "
            "outlined = the critical span; anchor = a response sampled from the reference."
        )
        html_path = out_dir / "token_importance_heatmap.html"
        html_path.write_text(f"<html><body>{token_heatmap_html(sections, caption)}</body></html>", encoding="utf-8")
        save_token_heatmap_png(sections, out_dir / HEATMAP_PNG, caption=caption)
        pictures["token_heatmap"] = dg.MetadataValue.md(png_markdown(out_dir / HEATMAP_PNG, "token importance"))
        pictures["token_heatmap_png"] = dg.MetadataValue.path(str(out_dir / HEATMAP_PNG))
        pictures["token_heatmap_html"] = dg.MetadataValue.path(str(html_path))
    series = _training_series(client, run_id, tidpo_policy.get("run_dir"), tidpo_policy.get("loss_history", []))
    if any(series.values()):
        save_training_curves_png({"policy": series}, out_dir / CURVES_PNG, title=f"training of {mlflow_tracking.registered_model} version {tidpo_policy.get('model_version')} (MLflow run {run_id[:8]})")
        pictures["training_curves"] = dg.MetadataValue.md(png_markdown(out_dir / CURVES_PNG, "training curves"))
        pictures["training_curves_png"] = dg.MetadataValue.path(str(out_dir / CURVES_PNG))
    samples_preview = []
    for model, e in evaluations.items():
        if e.samples is not None:
            samples_preview += [{"model": model, "prompt": p, "sample": t} for p, t in list(zip(e.samples.prompts, e.samples.texts, strict=True))[:3]]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    (out_dir / "benchmarks.json").write_text(json.dumps({m: [r.as_dict() for r in rs] for m, rs in bench_results.items()}, indent=1))
    with (out_dir / "samples.jsonl").open("w") as handle:
        for model, e in evaluations.items():
            if e.samples is not None:
                for p, t in zip(e.samples.prompts, e.samples.texts, strict=True):
                    handle.write(json.dumps({"model": model, "prompt": p, "sample": t}) + "\n")
    client.log_artifacts(run_id, str(out_dir), artifact_path="evaluation")
    if config.docs_dir:
        img = Path(config.docs_dir) / "img"
        img.mkdir(parents=True, exist_ok=True)
        for name in (HEATMAP_PNG, CURVES_PNG):
            if (out_dir / name).exists():
                shutil.copyfile(out_dir / name, img / name)

    champion = False
    verdict_text = gate.description
    if version:
        if gate.passed:
            # Compare and set: another run may have moved the alias while this one was evaluating.
            champion, found = tracking.promote_if_champion_is(
                mlflow_tracking.uri, version, champion_version, storage.root, mlflow_tracking.registered_model
            )
            if not champion:
                verdict_text += f"; refused: the champion changed during this evaluation (v{champion_version} -> v{found}), re-run to compare with it"
        tracking.tag_gate_verdict(mlflow_tracking.uri, version, champion, gate.compared_with, verdict_text, mlflow_tracking.registered_model)
        with duckdb.get_connection() as con:
            store.record_champion_event(
                con,
                store.ChampionEvent(
                    mlflow_tracking.registered_model, str(version), "promoted" if champion else "refused",
                    champion_version, gate.compared_with, verdict_text,
                ),
            )
    skipped = _skipped_rows(evaluations)
    for model, results in bench_results.items():
        skipped += [{"model": model, "metrics": r.task, "reason": f"{r.status}: {r.reason}"} for r in results if r.status != "ok"]
    outcome = f"version {version} is the champion" if champion else "the champion is unchanged"
    # Short enough for the UI's one-line preview; the numbers follow in the key-metrics tables.
    summary = f"**Gate {'passed' if gate.passed else 'failed'}** (compared with {gate.compared_with}): {outcome}."
    key_names = [name for name, _ in KEY_METRICS if name in metrics["policy"]]
    return dg.MaterializeResult(
        value={"metrics": metrics, "gate_passed": gate.passed, "champion": champion, "output_dir": str(out_dir)},
        metadata={
            "summary": dg.MetadataValue.md(summary),
            "key_metrics": dg.MetadataValue.md(markdown_table(comparison_rows(metrics["policy"], metrics["reference"], key_names))),
            **(
                {"key_metrics_vs_champion": dg.MetadataValue.md(markdown_table(
                    comparison_rows(metrics["policy"], metrics["champion"], key_names, baseline=f"champion v{champion_version}")
                ))}
                if "champion" in metrics
                else {}
            ),
            # The key metrics also as numbers, which the UI plots across materializations.
            **{f"policy/{k}": round(metrics["policy"][k], 4) for k in key_names},
            **{
                f"metrics: {group}": dg.MetadataValue.md(markdown_table(rows))
                for group, rows in grouped_comparison_rows(metrics["policy"], metrics["reference"]).items()
            },
            "skipped": dg.MetadataValue.md(markdown_table(skipped) if skipped else "_nothing skipped_"),
            "benchmarks": dg.MetadataValue.md(markdown_table(_benchmark_rows(bench_results)) if bench_results else "_no benchmarks requested (config `benchmarks`)_"),
            "samples": dg.MetadataValue.md(markdown_table(samples_preview, 160) if samples_preview else "_no samples_"),
            **pictures,
            "output_dir": dg.MetadataValue.path(str(out_dir)),
            "gate": verdict_text,
            "compared_with": gate.compared_with,
            **(
                {"eval_pairs_shared_with_champion": shared_new[0], "eval_pairs_new_since_champion": shared_new[1]}
                if shared_new is not None
                else {}
            ),
            "champion": champion,
            "mlflow_run_id": run_id,
            "mlflow_model_version": str(version),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="evaluation_gate",
                passed=gate.passed,
                metadata={"description": verdict_text, "metric": quality.gate_metric, "margin": quality.gate_margin, "tiebreak": str(quality.gate_tiebreak)},
            )
        ],
    )
