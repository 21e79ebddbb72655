"""Critical-token metrics on data with known critical spans (the built-in synthetic corpus, whose pair
meta carries them): importance precision@k of each importance estimator, the Gaussian prior and uniform
weights, overall and per third of the response, and the critical-phrase rate of sampled answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.features import EncodingSettings, encode_response
from tidpo_core.batching.tokenization import EncodedSequence, tokens_overlapping
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.data.synthetic import contains_phrase, critical_phrases
from tidpo_core.evaluation.importance_estimators import importance_by_estimator, parse_importance_estimator
from tidpo_core.method.importance import Normalization


def importance_precision_at_k(
    weights: Sequence[float], span_token_indices: Sequence[int], k: int | None = None
) -> float:
    """Share of the k highest-weighted tokens that lie in the critical span (k = span size by default).

    Ties at the k-th place are broken uniformly at random and the *expected* precision is returned, so
    the result is deterministic: uniform weights give |span| / T exactly (the chance level), a weight
    vector that is higher on every span token than elsewhere gives 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain non-finite values")
    span = sorted({int(i) for i in span_token_indices})
    if not span:
        raise ValueError("the span has no tokens")
    if span[0] < 0 or span[-1] >= w.size:
        raise ValueError(f"span token indices {span[0]}..{span[-1]} outside 0..{w.size - 1}")
    k = len(span) if k is None else int(k)
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, w.size)
    threshold = np.sort(w)[::-1][k - 1]
    above, tied = w > threshold, w == threshold
    in_span = np.zeros(w.size, dtype=bool)
    in_span[span] = True
    free_places = k - int(above.sum())
    hits = float((above & in_span).sum()) + free_places * float((tied & in_span).sum()) / float(tied.sum())
    return hits / k


def critical_phrase_rate(
    samples: Sequence[str], chosen_phrases: Sequence[str], rejected_phrases: Sequence[str]
) -> dict[str, float]:
    """Which critical phrase the sampled answers use, sample i judged against its own prompt's phrases.

    chosen_rate / rejected_rate: among samples containing either phrase, the share containing only the
    chosen / only the rejected one (both_rate: both; the three sum to 1; NaN when no sample contains
    either); neither_rate: share of all samples containing neither. Matching ignores case and runs of
    whitespace.
    """
    if not len(samples) == len(chosen_phrases) == len(rejected_phrases):
        raise ValueError(
            f"one chosen and one rejected phrase per sample: {len(samples)} samples, "
            f"{len(chosen_phrases)} chosen, {len(rejected_phrases)} rejected phrases"
        )
    counts = {"chosen": 0, "rejected": 0, "both": 0, "neither": 0}
    for text, chosen, rejected in zip(samples, chosen_phrases, rejected_phrases, strict=True):
        has_c, has_r = contains_phrase(text, chosen), contains_phrase(text, rejected)
        key = "both" if has_c and has_r else "chosen" if has_c else "rejected" if has_r else "neither"
        counts[key] += 1
    n = len(samples)
    matched = counts["chosen"] + counts["rejected"] + counts["both"]

    def share(value: int, total: int) -> float:
        return value / total if total else float("nan")

    return {
        "chosen_rate": share(counts["chosen"], matched),
        "rejected_rate": share(counts["rejected"], matched),
        "both_rate": share(counts["both"], matched),
        "neither_rate": share(counts["neither"], n),
        "matched": float(matched),
        "samples": float(n),
    }


def has_critical_spans(pair: PreferencePair) -> bool:
    meta = pair.meta or {}
    return all(
        isinstance(meta.get(k), list | tuple) and len(meta[k]) == 2 for k in ("chosen_span", "rejected_span")
    )


def has_critical_phrases(pair: PreferencePair) -> bool:
    return critical_phrases(pair) is not None


@dataclass(frozen=True)
class SpanResponse:
    """One response of a pair with a critical span: its encoding and the span's token indices."""

    pair_id: str
    side: str
    encoded: EncodedSequence
    span_tokens: list[int]


def span_responses(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], settings: EncodingSettings
) -> list[SpanResponse]:
    """Chosen and rejected responses of the pairs that carry spans; a span truncated away is left out."""
    out = []
    for pair in pairs:
        if not has_critical_spans(pair):
            continue
        for side in ("chosen", "rejected"):
            encoded = encode_response(tokenizer, pair.prompt, getattr(pair, side), settings)
            start, end = pair.meta[f"{side}_span"]
            span = tokens_overlapping(encoded.response_offsets, (int(start), int(end)))
            if span:
                out.append(SpanResponse(pair.pair_id, side, encoded, span))
    return out


IMPORTANCE_METHODS = ("attribution", "prior", "hybrid", "uniform")
RESPONSE_THIRDS = ("start", "middle", "end")


def span_third(span_tokens: Sequence[int], length: int) -> str:
    """Which third of a response of `length` tokens the span's centre falls in: start, middle or end."""
    if length < 1 or not span_tokens:
        raise ValueError("a span needs at least one token in a non-empty response")
    centre = (min(span_tokens) + max(span_tokens) + 1) / 2 / length
    return RESPONSE_THIRDS[min(int(centre * 3), 2)]


def precision_table(
    weights_by_method: dict[str, Sequence[np.ndarray]], spans: Sequence[Sequence[int]], k: int | None = None
) -> dict[str, float]:
    """Mean precision@k of each method's per-response weights, overall (`precision_at_k_<method>`) and by
    the third of the response the span sits in (`precision_at_k_<method>_<third>`, absent for an empty third)."""
    thirds = [
        span_third(span, len(next(iter(weights_by_method.values()))[i])) for i, span in enumerate(spans)
    ]
    metrics: dict[str, float] = {}
    for method, all_weights in weights_by_method.items():
        scores = [importance_precision_at_k(w, span, k) for w, span in zip(all_weights, spans, strict=True)]
        metrics[f"precision_at_k_{method}"] = float(np.mean(scores))
        for third in RESPONSE_THIRDS:
            in_third = [score for score, where in zip(scores, thirds, strict=True) if where == third]
            if in_third:
                metrics[f"precision_at_k_{method}_{third}"] = float(np.mean(in_third))
    for third in RESPONSE_THIRDS:
        metrics[f"critical_responses_{third}"] = float(sum(where == third for where in thirds))
    return metrics


def critical_token_precision(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    *,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    k: int | None = None,
    batch_size: int = 16,
    estimators: Sequence[str] = ("attribution",),
    contrastive_models: tuple[PreTrainedModel, PreTrainedModel] | None = None,
) -> dict[str, float]:
    """Mean importance precision@k over the chosen and rejected responses of pairs with critical spans.

    attribution: the model's gradient attribution I; prior: the Gaussian prior; hybrid: their mix with
    `weight_lambda` (what TI-DPO trains with); uniform: all weights equal, whose expected precision is
    the span's share of the response, |span| / T (chance level). Each further estimator of `estimators`
    (`surprisal`, `contrastive`, `*_no_eos`; see importance.py) adds its raw estimate
    (`precision_at_k_<estimator>`) and its hybrid weights (`precision_at_k_hybrid_<estimator>`). Every figure
    also comes per third of the response the span sits in. Empty dict when no pair has a span.
    """
    responses = span_responses(tokenizer, pairs, settings)
    if not responses:
        return {}
    encoded = [r.encoded for r in responses]
    usable = [
        estimator
        for estimator in dict.fromkeys(("attribution", *estimators))
        if parse_importance_estimator(estimator)[0] != "contrastive" or contrastive_models is not None
    ]
    computed = importance_by_estimator(
        model,
        tokenizer,
        encoded,
        usable,
        weight_lambda=weight_lambda,
        normalization=normalization,
        batch_size=batch_size,
        contrastive_models=contrastive_models,
    )
    by_method: dict[str, list[np.ndarray]] = {}
    for estimator, estimates in computed.items():
        # The paper's hybrid keeps its plain name ("hybrid"); every other estimator's is "hybrid_<estimator>".
        by_method[estimator] = [i.attribution for i in estimates]
        by_method["hybrid" if estimator == "attribution" else f"hybrid_{estimator}"] = [
            i.weight for i in estimates
        ]
    by_method["prior"] = [i.prior for i in computed["attribution"]]
    by_method["uniform"] = [np.ones_like(i.weight) for i in computed["attribution"]]
    metrics = precision_table(by_method, [r.span_tokens for r in responses], k)
    metrics["critical_responses"] = float(len(responses))
    metrics["mean_span_tokens"] = float(np.mean([len(r.span_tokens) for r in responses]))
    return metrics
