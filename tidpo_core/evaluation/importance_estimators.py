"""The importance estimators the evaluation scores and draws: one of importance.ESTIMATORS, optionally with
the eos token excluded (`<estimator>_no_eos`), each base estimator run once per call."""

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

# The estimators the evaluation scores by default, each optionally with the eos token excluded (_no_eos).
DEFAULT_IMPORTANCE_ESTIMATORS = ("attribution", "attribution_no_eos", "surprisal", "surprisal_no_eos")


def parse_importance_estimator(name: str) -> tuple[str, bool]:
    """`surprisal_no_eos` -> ("surprisal", True): the base estimator (one of importance.ESTIMATORS) and whether
    the eos token is excluded."""
    base, exclude_eos = (name[: -len("_no_eos")], True) if name.endswith("_no_eos") else (name, False)
    if base not in ESTIMATORS:
        raise ValueError(
            f"unknown importance estimator {name!r}; expected one of {ESTIMATORS}, optionally + '_no_eos'"
        )
    return base, exclude_eos


def importance_by_estimator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[EncodedSequence],
    estimators: Sequence[str],
    *,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    batch_size: int = 16,
    contrastive_models: tuple[PreTrainedModel, PreTrainedModel] | None = None,
) -> dict[str, list[TokenImportance]]:
    """importance.compute_token_importance of each importance estimator (e.g. `surprisal_no_eos`).

    Each base estimator runs once: a `_no_eos` one is derived from its base's result
    (importance.without_eos), which is what the model pass with `exclude_eos` would give.
    """
    parsed = {name: parse_importance_estimator(name) for name in estimators}
    estimates: dict[str, list[TokenImportance]] = {}
    for base in dict.fromkeys(base for base, _ in parsed.values()):
        estimates[base] = compute_token_importance(
            model,
            encoded,
            lambda_=weight_lambda,
            normalization=normalization,
            batch_size=batch_size,
            estimator=base,
            contrastive_models=contrastive_models if base == "contrastive" else None,
        )
    result: dict[str, list[TokenImportance]] = {}
    for name, (base, exclude_eos) in parsed.items():
        if not exclude_eos:
            result[name] = estimates[base]
            continue
        result[name] = [
            without_eos(
                estimate,
                [t for t, on in zip(e.input_ids, e.response_mask, strict=True) if on],
                closing_token_id(tokenizer),  # a chat model's end-of-turn token
                lambda_=weight_lambda,
                normalization=normalization,
            )
            for estimate, e in zip(estimates[base], encoded, strict=True)
        ]
    return result
