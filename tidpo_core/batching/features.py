"""From stored pairs, anchors and token weights to model-ready features and batches.

One encoding function serves the weight precompute, training and evaluation, so the token positions
that weights were computed for are exactly the positions the loss sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from tidpo_core.batching.batch import SideBatch, TrainingBatch, column_name
from tidpo_core.batching.tokenization import (
    EncodedSequence,
    PreferenceCollator,
    encode_prompt_response,
    response_token_ids,
    scatter_response_values,
)
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.importance import Normalization, TokenImportance, hybrid_weights
from tidpo_core.store import REFERENCE_TOPK_SIDES, StoredWeights


@dataclass(frozen=True)
class EncodingSettings:
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, settings: EncodingSettings
) -> EncodedSequence:
    return encode_prompt_response(
        tokenizer,
        prompt,
        response,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_response_tokens=settings.max_response_tokens,
    )


def side_texts(pair: PreferencePair, anchor: str | None) -> dict[str, str]:
    texts = {"chosen": pair.chosen, "rejected": pair.rejected}
    if anchor is not None:
        texts["anchor"] = anchor
    return texts


class WeightMismatchError(RuntimeError):
    """Stored weights do not belong to the tokens being trained on (different tokenizer or settings)."""


def build_features(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings,
    *,
    anchors: Mapping[str, str] | None = None,
    stored: Mapping[tuple[str, str], StoredWeights] | None = None,
    lambda_: float = 0.7,
    normalization: Normalization = "max",
    uniform_weights: bool = False,
) -> list[dict[str, Any]]:
    """One feature dict per pair with ids, masks, weights and reference log-probs per side.

    Arrays are compact numpy (int32 ids, int8 masks, float32 values): a Python list spends ~32 bytes on
    each number, which made the training process's memory grow with the data set.

    Weights are recombined from the stored raw attribution with `lambda_`, so the ablations
    (lambda 0 or 1) reuse one precomputed table. A pair without an anchor is an error when anchors
    are requested: silently training without the triplet term would misreport the method.
    """
    features = []
    for pair in pairs:
        anchor = None
        if anchors is not None:
            if pair.pair_id not in anchors:
                raise KeyError(
                    f"no anchor response for pair {pair.pair_id}; materialize anchor_responses first"
                )
            anchor = anchors[pair.pair_id]
        feature: dict[str, Any] = {"pair_id": pair.pair_id}
        for side, text in side_texts(pair, anchor).items():
            encoded = encode_response(tokenizer, pair.prompt, text, settings)
            weights = None
            if stored is not None:
                weights = stored.get((pair.pair_id, side))
                if weights is None:
                    raise KeyError(
                        f"no token weights for pair {pair.pair_id} side {side}; materialize token_weights first"
                    )
            feature.update(
                side_features(
                    side,
                    encoded,
                    weights,
                    lambda_=lambda_,
                    normalization=normalization,
                    uniform_weights=uniform_weights,
                    label=f"{pair.pair_id}/{side}",
                )
            )
        features.append(feature)
    return features


def side_features(
    side: str,
    encoded: EncodedSequence,
    weights: StoredWeights | None,
    *,
    lambda_: float,
    normalization: Normalization,
    uniform_weights: bool,
    label: str = "",
) -> dict[str, np.ndarray]:
    """One side's feature arrays: ids and response mask, and with weights their reference log-probs and
    hybrid token weights (recombined from the raw attribution with `lambda_`)."""
    input_ids = np.asarray(encoded.input_ids, dtype=np.int32)
    response_mask = np.asarray(encoded.response_mask, dtype=np.int8)
    out = {column_name(side, "input_ids"): input_ids, column_name(side, "response_mask"): response_mask}
    if weights is None:
        return out
    response_ids = input_ids[response_mask.astype(bool)]
    if not np.array_equal(np.asarray(weights.token_ids), response_ids):
        raise WeightMismatchError(
            f"stored weights of {label or side} were computed for other tokens "
            f"({len(weights.token_ids)} vs {len(response_ids)}): tokenizer or truncation changed"
        )
    out[column_name(side, "reference_logps")] = np.asarray(weights.reference_logp, dtype=np.float32)
    if weights.reference_topk_ids is not None:
        out[column_name(side, "reference_topk_ids")] = np.asarray(weights.reference_topk_ids, dtype=np.int32)
        out[column_name(side, "reference_topk_logp")] = np.asarray(
            weights.reference_topk_logp, dtype=np.float32
        )
    if uniform_weights:
        out[column_name(side, "weights")] = np.ones(len(response_ids), dtype=np.float32)
    else:
        attribution = torch.tensor(weights.attribution, dtype=torch.float32)
        out[column_name(side, "weights")] = hybrid_weights(attribution, lambda_, normalization).numpy()
    return out


# Per-response-token features the base collator does not know: (dtype, value outside the response).
# A cached top-k log-prob of -inf outside the response gives those positions no reference mass.
_RESPONSE_VALUES = {
    "reference_logps": (torch.float32, 0.0),
    "reference_topk_ids": (torch.int64, 0),
    "reference_topk_logp": (torch.float32, float("-inf")),
}


def token_weights_row(
    pair_id: str, side: str, text_digest: str, encoded: EncodedSequence, importance: TokenImportance
) -> dict[str, Any]:
    """One response's row for store.write_token_weights. The reference top-k cache is kept for the sides
    SeqKL runs over only: an anchor's would never be read."""
    keep_topk = side in REFERENCE_TOPK_SIDES
    return {
        "pair_id": pair_id,
        "side": side,
        "text_digest": text_digest,
        "token_ids": response_token_ids(encoded),
        "attribution": importance.attribution,
        "prior": importance.prior,
        "weight": importance.weight,
        "reference_logp": importance.reference_logp,
        "reference_topk_ids": importance.reference_topk_ids if keep_topk else None,
        "reference_topk_logp": importance.reference_topk_logp if keep_topk else None,
    }


class TrainingCollator:
    """PreferenceCollator plus per-token reference log-probs (and the cached reference top-k) scattered
    to their positions, as a TrainingBatch."""

    def __init__(self, pad_token_id: int, sides: Sequence[str]):
        self.sides = tuple(sides)
        self._base = PreferenceCollator(pad_token_id, sides=self.sides)

    def __call__(self, features: list[dict[str, Any]]) -> TrainingBatch:
        stripped = [{k: v for k, v in f.items() if not k.endswith(tuple(_RESPONSE_VALUES))} for f in features]
        batch = self._base(stripped)
        for side in self.sides:
            for name, (dtype, fill) in _RESPONSE_VALUES.items():
                key = column_name(side, name)
                if key in features[0]:
                    batch[key] = scatter_response_values(
                        [f[key] for f in features],
                        batch[column_name(side, "response_mask")],
                        dtype=dtype,
                        fill=fill,
                    )
        return TrainingBatch.of(batch)


def stack_sides(
    batch: TrainingBatch | Mapping[str, Any], sides: Sequence[str], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate the sides of a batch along the batch dimension so the model runs once per step.

    `batch` is a TrainingBatch or a mapping under its flat names (TrainingBatch.of)."""
    batch = TrainingBatch.of(batch)
    parts = [batch.sides[s] for s in sides]
    length = max(part.input_ids.shape[1] for part in parts)

    def cat(name: str, value: float, of: Sequence[SideBatch] = parts) -> torch.Tensor:
        padded = []
        for part in of:
            tensor = getattr(part, name)
            # Pad dimension 1 (positions); a [B, T, k] tensor keeps its last dimension.
            padding = (
                (0, length - tensor.shape[1]) if tensor.dim() == 2 else (0, 0, 0, length - tensor.shape[1])
            )
            padded.append(F.pad(tensor, padding, value=value))
        return torch.cat(padded, dim=0)

    stacked = {
        "input_ids": cat("input_ids", pad_token_id),
        "attention_mask": cat("attention_mask", 0),
        "response_mask": cat("response_mask", 0.0),
        "weights": cat("weights", 0.0),
    }
    if all(part.reference_logps is not None for part in parts):
        stacked["reference_logps"] = cat("reference_logps", 0.0)
    # The cached reference top-k serves SeqKL, which only chosen and rejected (the first 2B rows) need;
    # a re-sampled anchor has none.
    kl_parts = [batch.sides[s] for s in sides if s in REFERENCE_TOPK_SIDES]
    for name in ("reference_topk_ids", "reference_topk_logp"):
        if kl_parts and all(getattr(part, name) is not None for part in kl_parts):
            stacked[name] = cat(name, _RESPONSE_VALUES[name][1], kl_parts)
    return stacked
