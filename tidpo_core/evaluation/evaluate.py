"""Every held-out metric of a policy against its reference, in one call (`evaluate_model`):

- preference metrics on the eval split (preference.py);
- KL(pi || ref) by Monte Carlo on responses sampled from pi, with its standard error (kl.py), and the
  samples' diversity (diversity.py);
- on data with known critical spans (the built-in synthetic corpus): importance precision@k and the
  critical-phrase rate of the sampled answers (critical_tokens.py).

What it measures is set by ModelEvalSettings (settings.py); the champion gate lives in gate.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.chat import stop_token_ids
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.evaluation.critical_tokens import (
    critical_phrase_rate,
    critical_token_precision,
    has_critical_phrases,
    has_critical_spans,
)
from tidpo_core.evaluation.diversity import diversity_metrics
from tidpo_core.evaluation.kl_estimate import kl_to_reference
from tidpo_core.evaluation.preference import PairScores, preference_metrics, score_pairs
from tidpo_core.evaluation.sampled_responses import SampledResponses, is_pure_sampling
from tidpo_core.evaluation.settings import ModelEvalSettings
from tidpo_core.runtime.threads import threads_for


@dataclass
class ModelEvaluation:
    metrics: dict[str, float]
    samples: SampledResponses | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    """Metric group -> why it was not measured."""


def sample_prompt_pairs(pairs: Sequence[PreferencePair], n: int) -> list[PreferencePair]:
    """The eval pairs whose prompts are sampled: the first n by pair_id (stable as the corpus grows little)."""
    return sorted(pairs, key=lambda p: p.pair_id)[: max(n, 0)]


def evaluate_model(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: ModelEvalSettings = ModelEvalSettings(),
    *,
    reference_scores: PairScores | None = None,
    progress: bool = False,
) -> ModelEvaluation:
    """Every held-out metric of `model` against `reference` on the eval pairs.

    Preference metrics (accuracy, margin, win rates), KL(model || reference) with its standard error,
    generation diversity, and on pairs with critical spans (the synthetic corpus) importance
    precision@k and the critical-phrase rate. Pass `model=reference` for the reference's own row.
    Runs under the thread plan for the two models (tidpo_core.runtime.threads).
    """
    with threads_for(model, reference):
        return _evaluate_model(model, reference, tokenizer, pairs, settings, reference_scores, progress)


def _evaluate_model(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: ModelEvalSettings,
    reference_scores: PairScores | None,
    progress: bool,
) -> ModelEvaluation:
    skipped: dict[str, str] = {}
    if reference_scores is None:
        reference_scores = score_pairs(
            reference, tokenizer, pairs, settings.encoding, settings.batch_size, progress
        )
    scores = (
        reference_scores
        if model is reference
        else score_pairs(model, tokenizer, pairs, settings.encoding, settings.batch_size, progress)
    )
    metrics = preference_metrics(scores, reference_scores, settings.beta)
    chosen_pairs = sample_prompt_pairs(pairs, settings.sample_prompts)
    samples = _add_sampled_metrics(
        metrics, skipped, model, reference, tokenizer, chosen_pairs, settings, progress
    )
    _add_critical_token_metrics(metrics, skipped, model, tokenizer, pairs, settings)
    if samples is not None:
        _add_critical_phrase_metrics(metrics, skipped, chosen_pairs, samples)
    return ModelEvaluation(metrics=metrics, samples=samples, skipped=skipped)


def _add_sampled_metrics(
    metrics: dict[str, float],
    skipped: dict[str, str],
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chosen_pairs: Sequence[PreferencePair],
    settings: ModelEvalSettings,
    progress: bool,
) -> SampledResponses | None:
    """KL to the reference and diversity of the model's answers to the chosen pairs' prompts; the samples."""
    if not chosen_pairs:
        skipped["sampling"] = "no eval prompts to sample (sample_prompts = 0 or no eval pairs)"
        return None
    estimate, samples = kl_to_reference(
        model,
        reference,
        tokenizer,
        [p.prompt for p in chosen_pairs],
        settings.sampling,
        batch_size=settings.batch_size,
        progress=progress,
    )
    metrics.update(estimate.as_metrics())
    metrics.update(diversity_metrics(samples, stop_token_ids(tokenizer)))
    if not is_pure_sampling(settings.sampling):
        skipped["kl_exactness"] = (
            "samples were drawn with temperature/top-k/top-p: the KL estimate is of the modified distribution"
        )
    return samples


def _add_critical_token_metrics(
    metrics: dict[str, float],
    skipped: dict[str, str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: ModelEvalSettings,
) -> None:
    """Importance precision@k on the first `critical_pairs` pairs (by pair_id) that carry critical spans."""
    span_pairs = sorted((p for p in pairs if has_critical_spans(p)), key=lambda p: p.pair_id)
    if settings.critical_pairs is not None:
        span_pairs = span_pairs[: max(settings.critical_pairs, 0)]
    critical = critical_token_precision(
        model,
        tokenizer,
        span_pairs,
        settings.encoding,
        weight_lambda=settings.weight_lambda,
        normalization=settings.weight_normalization,
        k=settings.critical_k,
        batch_size=settings.batch_size,
        estimators=settings.importance_estimators,
    )
    if critical:
        metrics.update(critical)
    else:
        skipped["critical_tokens"] = (
            "no eval pair carries chosen_span/rejected_span in its meta (non-synthetic data)"
            if not any(has_critical_spans(p) for p in pairs)
            else "critical_pairs is 0"
        )


def _add_critical_phrase_metrics(
    metrics: dict[str, float],
    skipped: dict[str, str],
    chosen_pairs: Sequence[PreferencePair],
    samples: SampledResponses,
) -> None:
    """Which critical phrase the sampled answers use, on the sampled pairs whose meta names the phrases."""
    phrase_pairs = [
        (p, text) for p, text in zip(chosen_pairs, samples.texts, strict=True) if has_critical_phrases(p)
    ]
    if not phrase_pairs:
        skipped["critical_phrases"] = "no sampled eval pair carries chosen_phrase/rejected_phrase in its meta"
        return
    rates = critical_phrase_rate(
        [t for _, t in phrase_pairs],
        [p.meta["chosen_phrase"] for p, _ in phrase_pairs],
        [p.meta["rejected_phrase"] for p, _ in phrase_pairs],
    )
    metrics.update({f"critical_phrase_{k}": v for k, v in rates.items()})
