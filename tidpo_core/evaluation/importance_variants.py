"""The importance variants the evaluation scores and draws: an estimator of importance.ESTIMATORS,
optionally with the eos token excluded (`<estimator>_no_eos`), each estimator run once per call."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.chat import closing_token_id
from tidpo_core.batching.tokenization import EncodedSequence
from tidpo_core.method.importance import (
    ESTIMATORS,
    Normalization,
    TokenImportance,
    compute_token_importance,
    without_eos,
)

# Importance variants the evaluation scores: an estimator, optionally with the eos token excluded (_no_eos).
DEFAULT_IMPORTANCE_VARIANTS = ("attribution", "attribution_no_eos", "surprisal", "surprisal_no_eos")


def parse_importance_variant(variant: str) -> tuple[str, bool]:
    """`surprisal_no_eos` -> ("surprisal", True); the estimator must be one of importance.ESTIMATORS."""
    estimator, exclude_eos = (variant[: -len("_no_eos")], True) if variant.endswith("_no_eos") else (variant, False)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown importance variant {variant!r}; expected an estimator of {ESTIMATORS}, optionally + '_no_eos'")
    return estimator, exclude_eos


def importance_by_variant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[EncodedSequence],
    variants: Sequence[str],
    *,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    batch_size: int = 16,
    contrastive_models: tuple[PreTrainedModel, PreTrainedModel] | None = None,
) -> dict[str, list[TokenImportance]]:
    """importance.compute_token_importance of each importance variant (e.g. `surprisal_no_eos`).

    Each estimator runs once: a `_no_eos` variant is derived from its estimator's result
    (importance.without_eos), which is what the model pass with `exclude_eos` would give.
    """
    parsed = {variant: parse_importance_variant(variant) for variant in variants}
    estimates: dict[str, list[TokenImportance]] = {}
    for estimator in dict.fromkeys(estimator for estimator, _ in parsed.values()):
        estimates[estimator] = compute_token_importance(
            model,
            encoded,
            lambda_=weight_lambda,
            normalization=normalization,
            batch_size=batch_size,
            estimator=estimator,
            contrastive_models=contrastive_models if estimator == "contrastive" else None,
        )
    result: dict[str, list[TokenImportance]] = {}
    for variant, (estimator, exclude_eos) in parsed.items():
        if not exclude_eos:
            result[variant] = estimates[estimator]
            continue
        result[variant] = [
            without_eos(
                estimate,
                [t for t, on in zip(e.input_ids, e.response_mask, strict=True) if on],
                closing_token_id(tokenizer),  # a chat model's end-of-turn token
                lambda_=weight_lambda,
                normalization=normalization,
            )
            for estimate, e in zip(estimates[estimator], encoded, strict=True)
        ]
    return result
