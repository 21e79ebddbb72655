"""Token-importance heatmaps: each response's tokens shaded by their hybrid weight, the critical span
outlined, optionally beside another estimator's weights (sections for tidpo_core.evaluation.plots)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.chat import readable_prompt
from tidpo_core.batching.features import EncodingSettings, encode_response
from tidpo_core.batching.tokenization import EncodedSequence, tokens_overlapping
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.evaluation.critical_tokens import has_critical_spans
from tidpo_core.evaluation.importance_estimators import DEFAULT_IMPORTANCE_ESTIMATORS, importance_by_estimator
from tidpo_core.method.importance import Normalization
from tidpo_core.runtime.threads import threads_for


def _prompt_title(prompt: str, width: int = 110, turns: int = 4) -> str:
    """A heatmap section's title: the prompt's turns one per line ("user: ...", "assistant: ..."), each cut
    to `width` characters; of a longer conversation the last `turns` turns, under a line that says how many
    came before."""
    lines = readable_prompt(prompt, width).split("\n")
    if len(lines) > turns:
        earlier = len(lines) - turns
        lines = [f"… {earlier} earlier turn{'s' if earlier > 1 else ''}", *lines[-turns:]]
    return "\n".join(lines)


def best_importance_estimator(
    metrics: dict[str, float], candidates: Sequence[str] = DEFAULT_IMPORTANCE_ESTIMATORS
) -> str | None:
    """The estimator (other than the paper's attribution) whose hybrid weights scored the highest precision@k."""
    scored = {
        v: metrics[f"precision_at_k_hybrid_{v}"]
        for v in candidates
        if f"precision_at_k_hybrid_{v}" in metrics
    }
    scored = {v: value for v, value in scored.items() if v != "attribution" and math.isfinite(value)}
    return max(scored, key=lambda v: scored[v]) if scored else None


def importance_heatmap_sections(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    *,
    anchors: dict[str, str] | None = None,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    batch_size: int = 16,
    compare_with: str | None = None,
) -> list[Any]:
    """Heatmap sections (tidpo_core.evaluation.plots.HeatmapSection) of the pairs' chosen, rejected and anchor responses.

    Each token is shaded by its hybrid weight under `model` (the TI-DPO weight, mean 1 per response);
    tokens of the critical span, where the pair's meta has one, are outlined. With `compare_with` (an
    importance estimator, e.g. `surprisal_no_eos`) each chosen and rejected row is followed by the same
    response under that estimator's hybrid weights, so the paper's weights and the other sit side by side.
    """
    from tidpo_core.evaluation.plots import HeatmapRow, HeatmapSection, token_display_text

    items: list[tuple[PreferencePair, str, str, EncodedSequence]] = []
    for pair in pairs:
        texts = {"chosen": pair.chosen, "rejected": pair.rejected}
        if anchors and pair.pair_id in anchors:
            texts["anchor"] = anchors[pair.pair_id]
        for side, text in texts.items():
            items.append((pair, side, text, encode_response(tokenizer, pair.prompt, text, settings)))
    if not items:
        return []
    estimators = ["attribution"] + ([compare_with] if compare_with and compare_with != "attribution" else [])
    with threads_for(model):
        weights_by_estimator = importance_by_estimator(
            model,
            tokenizer,
            [e for *_, e in items],
            estimators,
            weight_lambda=weight_lambda,
            normalization=normalization,
            batch_size=batch_size,
        )
    sections: dict[str, Any] = {}
    for index, (pair, side, text, encoded) in enumerate(items):
        span: list[int] = []
        if side in ("chosen", "rejected") and has_critical_spans(pair):
            start, end = pair.meta[f"{side}_span"]
            span = tokens_overlapping(encoded.response_offsets, (int(start), int(end)))
        section = sections.setdefault(pair.pair_id, HeatmapSection(_prompt_title(pair.prompt), []))
        for estimator in estimators if side != "anchor" else estimators[:1]:
            section.rows.append(
                HeatmapRow(
                    label=side if estimator == "attribution" else f"{side}: {estimator}",
                    tokens=token_display_text(text, encoded.response_offsets),
                    weights=[float(w) for w in weights_by_estimator[estimator][index].weight],
                    span=frozenset(span),
                )
            )
    return list(sections.values())
