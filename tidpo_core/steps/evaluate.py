"""Evaluate a trained policy: held-out metrics beside its reference (and the current champion), the gate
that decides the `champion` alias, pictures of token importance and of training, all recorded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tidpo_core import store
from tidpo_core.batching.features import EncodingSettings
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.evaluation.benchmark_runner import run_benchmarks
from tidpo_core.evaluation.benchmarks import BenchmarkOptions, BenchmarkResult, benchmark_metrics
from tidpo_core.evaluation.critical_tokens import has_critical_spans
from tidpo_core.evaluation.evaluate import ModelEvaluation, evaluate_model
from tidpo_core.evaluation.gate import PromotionDecision, promotion_decision
from tidpo_core.evaluation.heatmaps import best_importance_estimator, importance_heatmap_sections
from tidpo_core.evaluation.metrics import CURVE_METRICS
from tidpo_core.evaluation.plots import save_token_heatmap_png, save_training_curves_png, token_heatmap_html
from tidpo_core.evaluation.preference import score_pairs
from tidpo_core.evaluation.settings import ModelEvalSettings
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.runtime import tracking
from tidpo_core.runtime.launch import read_summary
from tidpo_core.runtime.layout import DataDir, RunDir
from tidpo_core.runtime.threads import threads_for
from tidpo_core.steps import OpenDb, log_to, publish_pictures
from tidpo_core.steps.reference import ReferenceHandle

HEATMAP_PNG = "token_importance_heatmap.png"
HEATMAP_HTML = "token_importance_heatmap.html"
CURVES_PNG = "training_curves.png"


@dataclass(frozen=True)
class EvaluationSettings:
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


@dataclass(frozen=True)
class GateRule:
    """What a challenger must do to take the champion alias (the QualityRules resource's gate fields)."""

    gate_metric: str = "likelihood_win_rate"
    """Held-out metric the trained policy must beat the reference on to become champion."""
    gate_margin: float = 0.0
    """By how much (strictly more than)."""
    champion_margin: float = 0.0
    """A challenger may trail the current champion on gate_metric by less than this (0: it must be at
    least as good); on an exact tie gate_tiebreak decides."""
    gate_tiebreak: str | None = "reward_margin"
    """On an exact tie of gate_metric (frequent for a count on a small eval split), the policy must be
    strictly better on this one; None: a tie fails."""


@dataclass(frozen=True)
class TrainedPolicy:
    """The tidpo_policy asset's handle."""

    model_path: str
    mlflow_run_id: str
    model_version: int | None
    beta: float
    encoding: dict[str, int]
    run_dir: str | None = None
    step_history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluationReport:
    metrics: dict[str, dict[str, float]]
    """By model: reference, policy, and champion when one was compared."""
    evaluations: dict[str, ModelEvaluation]
    benchmarks: dict[str, list[BenchmarkResult]]
    gate: PromotionDecision
    champion: bool
    """Whether this version now holds the alias."""
    verdict: str
    champion_version: str | None
    """The champion it was compared with (None: none, or this very version)."""
    shared_with_champion: tuple[int, int] | None
    """(shared, new) eval pairs compared with the champion's evaluation."""
    out_dir: Path
    pictures: dict[str, Path]


def evaluate_policy(
    open_db: OpenDb,
    layout: DataDir,
    tracking_uri: str,
    registered_model: str,
    reference: ReferenceHandle,
    importance: dict[str, Any],
    policy: TrainedPolicy,
    settings: EvaluationSettings,
    gate_rule: GateRule,
    benchmarks: Sequence[str] = (),
    benchmark_options: BenchmarkOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    log = log_to(log)
    with open_db() as con:
        pairs = store.read_pairs(con, split="eval")
    eval_settings = _policy_eval_settings(policy, settings, importance)
    reference_model, tokenizer = reference.load()
    # The policy is the reference's architecture, saved by the engine: it needs the same code trust.
    policy_model, _ = load_model_and_tokenizer(
        policy.model_path, trust_remote_code=reference.trust_remote_code
    )
    evaluations, champion_version = _evaluate_models(
        reference_model,
        policy_model,
        tokenizer,
        pairs,
        eval_settings,
        tracking_uri,
        registered_model,
        policy,
        log,
    )
    metrics = {model: dict(e.metrics) for model, e in evaluations.items()}
    bench_results = _run_benchmarks(
        benchmarks,
        benchmark_options,
        {"reference": reference.path, "policy": policy.model_path},
        metrics,
        log,
    )
    gate = _gate(metrics, gate_rule, champion_version)
    shared = _record(
        open_db, tracking_uri, registered_model, policy.mlflow_run_id, metrics, pairs, gate, champion_version
    )
    out_dir = layout.evaluation(policy.mlflow_run_id)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    pictures = _heatmap_pictures(
        out_dir, reference_model, tokenizer, pairs, eval_settings, settings, metrics["reference"]
    )
    pictures |= _training_curves_picture(out_dir, tracking_uri, registered_model, policy)
    _write_files(out_dir, metrics, bench_results, evaluations)
    tracking.log_artifacts(tracking_uri, policy.mlflow_run_id, out_dir, artifact_path="evaluation")
    publish_pictures(pictures.values(), settings.docs_dir)
    champion, verdict = _promote(
        open_db, layout, tracking_uri, registered_model, policy.model_version, gate, champion_version
    )
    return EvaluationReport(
        metrics,
        evaluations,
        bench_results,
        gate,
        champion,
        verdict,
        champion_version,
        shared,
        out_dir,
        pictures,
    )


def _policy_eval_settings(
    policy: TrainedPolicy, settings: EvaluationSettings, importance: dict[str, Any]
) -> ModelEvalSettings:
    """The evaluation's settings for this policy: its beta and encoding, the step's batch and sampling settings."""
    return eval_settings_for(
        policy.beta,
        EncodingSettings(**policy.encoding),
        batch_size=settings.batch_size,
        sample_prompts=settings.sample_prompts,
        critical_pairs=settings.critical_pairs,
        critical_k=settings.critical_k,
        sampling=SamplingSettings(
            max_new_tokens=settings.max_new_tokens,
            top_k=settings.top_k,
            top_p=settings.top_p,
            temperature=settings.temperature,
            seed=settings.sample_seed,
        ),
        importance=importance,
    )


def _evaluate_models(
    reference_model: Any,
    policy_model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    eval_settings: ModelEvalSettings,
    tracking_uri: str,
    registered_model: str,
    policy: TrainedPolicy,
    log: Callable[[str], None],
) -> tuple[dict[str, ModelEvaluation], str | None]:
    """Held-out evaluations of the reference, the policy and the current champion, all scored against the
    reference's log-probabilities (computed once); returns them with the champion's version (None: not
    compared)."""
    with threads_for(reference_model):
        reference_scores = score_pairs(
            reference_model, tokenizer, pairs, eval_settings.encoding, eval_settings.batch_size, progress=True
        )

    def evaluate(model: Any) -> ModelEvaluation:
        return evaluate_model(
            model,
            reference_model,
            tokenizer,
            pairs,
            eval_settings,
            reference_scores=reference_scores,
            progress=True,
        )

    evaluations = {"reference": evaluate(reference_model), "policy": evaluate(policy_model)}
    # The challenger is also judged against today's champion, on the same held-out pairs (none on a first
    # run, or when this very version already holds the alias).
    champion_version = tracking.champion_version(tracking_uri, registered_model)
    if champion_version is None or champion_version == str(policy.model_version):
        return evaluations, None
    log(f"evaluating the current champion (version {champion_version}) on the same pairs")
    evaluations["champion"] = evaluate(
        tracking.load_registered_model(tracking_uri, f"models:/{registered_model}/{champion_version}")[0]
    )
    return evaluations, champion_version


def _run_benchmarks(
    benchmarks: Sequence[str],
    options: BenchmarkOptions | None,
    model_paths: dict[str, str],
    metrics: dict[str, dict[str, float]],
    log: Callable[[str], None],
) -> dict[str, list[BenchmarkResult]]:
    """The opt-in benchmarks on each model (by name: its path); their scores join that model's `metrics`."""
    results: dict[str, list[BenchmarkResult]] = {}
    for model, path in model_paths.items() if benchmarks else ():
        log(f"benchmarks {list(benchmarks)} on the {model}")
        results[model] = run_benchmarks(path, benchmarks, options or BenchmarkOptions())
        metrics[model].update(benchmark_metrics(results[model]))
    return results


def _gate(
    metrics: dict[str, dict[str, float]], gate_rule: GateRule, champion_version: str | None
) -> PromotionDecision:
    """The gate's decision on the policy against the reference and, when one was evaluated, the champion."""
    return promotion_decision(
        metrics["policy"],
        metrics["reference"],
        metrics.get("champion"),
        gate_rule.gate_metric,
        gate_rule.gate_margin,
        gate_rule.gate_tiebreak,
        gate_rule.champion_margin,
        champion_version,
    )


def eval_settings_for(
    beta: float,
    encoding: EncodingSettings,
    *,
    batch_size: int,
    sample_prompts: int,
    critical_pairs: int | None,
    sampling: SamplingSettings,
    critical_k: int | None = None,
    importance: dict[str, Any] | None = None,
) -> ModelEvalSettings:
    """The evaluation's settings for a policy trained at `beta` on `encoding`: sampling batches of at most 32
    prompts, prompts cut as in training, and the hybrid weight of the token weights (`importance`; ModelEvalSettings'
    own defaults without one)."""
    extra = {}
    if importance is not None:
        extra = {
            "weight_lambda": float(importance.get("lambda", 0.7)),
            "weight_normalization": importance.get("normalization", "max"),
        }
    return ModelEvalSettings(
        beta=beta,
        batch_size=batch_size,
        encoding=encoding,
        sample_prompts=sample_prompts,
        sampling=replace(
            sampling, batch_size=min(batch_size, 32), max_prompt_tokens=encoding.max_prompt_tokens
        ),
        critical_k=critical_k,
        critical_pairs=critical_pairs,
        **extra,
    )


def _record(
    open_db: OpenDb,
    tracking_uri: str,
    registered_model: str,
    run_id: str,
    metrics: dict[str, dict[str, float]],
    pairs: Sequence[PreferencePair],
    gate: PromotionDecision,
    champion_version: str | None,
) -> tuple[int, int] | None:
    """Metrics and eval pairs into DuckDB and the run; returns (shared, new) eval pairs versus the champion's."""
    pair_ids = [p.pair_id for p in pairs]
    with open_db() as con:
        store.write_metrics(con, run_id, metrics)
        store.record_evaluation_pairs(con, run_id, pair_ids)
        # Judged on the same pairs as the champion was? (The split is a hash of each pair, so old eval
        # pairs stay eval pairs; new data can only add some.)
        shared = (
            store.shared_evaluation_pairs(
                con, tracking.version_run_id(tracking_uri, champion_version, registered_model), pair_ids
            )
            if champion_version is not None
            else None
        )
    tracking.log_metrics(
        tracking_uri,
        run_id,
        {f"eval/{model}/{name}": value for model, values in metrics.items() for name, value in values.items()}
        | {"eval/gate_passed": float(gate.passed)},
    )
    return shared


def _heatmap_pictures(
    out_dir: Path,
    reference_model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    eval_settings: ModelEvalSettings,
    settings: EvaluationSettings,
    reference_metrics: dict[str, float],
) -> dict[str, Path]:
    """The token-importance heatmap (PNG and HTML) of the first eval pairs, those with critical spans first,
    written into `out_dir`; rows of the best importance estimator sit beside the paper's attribution."""
    heatmap_pairs = sorted(pairs, key=lambda p: (not has_critical_spans(p), p.pair_id))[
        : max(settings.heatmap_pairs, 0)
    ]
    best_estimator = best_importance_estimator(reference_metrics)
    if not heatmap_pairs:
        return {}
    with threads_for(reference_model):
        anchors = sample_responses(
            reference_model,
            tokenizer,
            [p.prompt for p in heatmap_pairs],
            SamplingSettings(seed=settings.sample_seed),
        )
    sections = importance_heatmap_sections(
        reference_model,
        tokenizer,
        heatmap_pairs,
        eval_settings.encoding,
        anchors={p.pair_id: a for p, a in zip(heatmap_pairs, anchors, strict=True)},
        weight_lambda=eval_settings.weight_lambda,
        normalization=eval_settings.weight_normalization,
        batch_size=settings.batch_size,
        compare_with=best_estimator,
    )
    caption = (
        f"Hybrid token weight (lambda {eval_settings.weight_lambda}) under the reference model: darker = more important; "
        "outlined = the critical span; anchor = a response sampled from the reference."
    )
    if best_estimator:
        caption += f" Rows named side: {best_estimator} use that estimator (the best precision@k of this evaluation) instead of the paper's attribution."
    (out_dir / HEATMAP_HTML).write_text(
        f"<html><body>{token_heatmap_html(sections, caption)}</body></html>", encoding="utf-8"
    )
    save_token_heatmap_png(sections, out_dir / HEATMAP_PNG, caption=caption)
    return {"token_heatmap": out_dir / HEATMAP_PNG, "token_heatmap_html": out_dir / HEATMAP_HTML}


def _training_curves_picture(
    out_dir: Path, tracking_uri: str, registered_model: str, policy: TrainedPolicy
) -> dict[str, Path]:
    """The policy's training curves, written into `out_dir` (none when no curve has a point)."""
    series = training_series(
        tracking_uri, policy.mlflow_run_id, policy.run_dir, [h["loss"] for h in policy.step_history]
    )
    if not any(series.values()):
        return {}
    title = f"training of {registered_model} version {policy.model_version} (MLflow run {policy.mlflow_run_id[:8]})"
    save_training_curves_png({"policy": series}, out_dir / CURVES_PNG, title=title)
    return {"training_curves": out_dir / CURVES_PNG}


def training_series(
    tracking_uri: str, run_id: str, run_dir: str | None, losses: list[float]
) -> dict[str, list[tuple[int, float]]]:
    """Curves from the MLflow run's metric history; else the run's summary.json; else the losses."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key in CURVE_METRICS:
        try:
            history = tracking.metric_history(tracking_uri, run_id, key)
        except Exception:  # a tracking hiccup must not cost the evaluation its pictures
            history = []
        if history:
            series[key] = history
    if series:
        return series
    if run_dir and RunDir(Path(run_dir)).summary.exists():
        for entry in read_summary(run_dir).get("history", []):
            for key in CURVE_METRICS:
                if key in entry:
                    series.setdefault(key, []).append((int(entry["step"]), float(entry[key])))
        if series:
            return series
    return {"loss": [(i + 1, float(v)) for i, v in enumerate(losses)]}


def _write_files(
    out_dir: Path,
    metrics: dict[str, dict[str, float]],
    bench_results: dict[str, list[BenchmarkResult]],
    evaluations: dict[str, ModelEvaluation],
) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    (out_dir / "benchmarks.json").write_text(
        json.dumps({m: [r.as_dict() for r in rs] for m, rs in bench_results.items()}, indent=1)
    )
    with (out_dir / "samples.jsonl").open("w") as handle:
        for model, e in evaluations.items():
            if e.samples is not None:
                for p, t in zip(e.samples.prompts, e.samples.texts, strict=True):
                    handle.write(json.dumps({"model": model, "prompt": p, "sample": t}) + "\n")


def _promote(
    open_db: OpenDb,
    layout: DataDir,
    tracking_uri: str,
    registered_model: str,
    version: int | None,
    gate: PromotionDecision,
    champion_version: str | None,
) -> tuple[bool, str]:
    """Move the alias if the gate passed and the champion is still the one compared with; record the verdict."""
    champion = False
    verdict = gate.description
    if not version:
        return champion, verdict
    if gate.passed:
        # Compare and set: another run may have moved the alias while this one was evaluating.
        champion, found = tracking.promote_if_champion_is(
            tracking_uri, version, champion_version, layout.root, registered_model
        )
        if not champion:
            verdict += f"; refused: the champion changed during this evaluation (v{champion_version} -> v{found}), re-run to compare with it"
    tracking.tag_gate_verdict(tracking_uri, version, champion, gate.compared_with, verdict, registered_model)
    with open_db() as con:
        store.record_champion_event(
            con,
            store.ChampionEvent(
                registered_model,
                str(version),
                "promoted" if champion else "refused",
                champion_version,
                gate.compared_with,
                verdict,
            ),
        )
    return champion, verdict
