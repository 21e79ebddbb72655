"""Anchors re-sampled from the policy during training (anchor_refresh_every), weighed by the reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tidpo_core import store
from tidpo_core.batching.batch import TrainingBatch
from tidpo_core.batching.features import EncodingSettings, TrainingCollator, encode_response, side_features
from tidpo_core.method.importance import compute_token_importance
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.training.config import TrainConfig
from tidpo_core.training.setup import _load_reference


def sample_anchor_features(
    policy: torch.nn.Module,
    weigher: torch.nn.Module,
    tokenizer: Any,
    prompts: dict[str, str],
    config: TrainConfig,
    seed: int,
    texts: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, np.ndarray]]]:
    """Anchors for the given prompts, sampled from `policy` (or the given texts), with their weights.

    `weigher` computes the attribution and the reference log-probs of the anchors: the reference model,
    so that a refreshed anchor's log-ratio means what a stored one's does. An empty sample keeps no
    anchor (the pair's previous one stays).
    """
    ids = sorted(prompts)
    if texts is None:
        settings = SamplingSettings(seed=seed, max_prompt_tokens=config.max_prompt_tokens)
        sampled = sample_responses(policy, tokenizer, [prompts[i] for i in ids], settings)
        texts = {i: t for i, t in zip(ids, sampled, strict=True) if t.strip()}
    encoding = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    keep = [i for i in ids if i in texts]
    encoded = [encode_response(tokenizer, prompts[i], texts[i], encoding) for i in keep]
    importances = compute_token_importance(
        weigher, encoded, lambda_=config.weight_lambda, normalization=config.weight_normalization
    )
    sides: dict[str, dict[str, np.ndarray]] = {}
    for pair_id, enc, imp in zip(keep, encoded, importances, strict=True):
        response_ids = np.asarray(enc.input_ids)[np.asarray(enc.response_mask, dtype=bool)]
        weights = store.StoredWeights(
            response_ids, imp.attribution, imp.prior, imp.weight, imp.reference_logp
        )
        sides[pair_id] = side_features(
            "anchor",
            enc,
            weights,
            lambda_=config.weight_lambda,
            normalization=config.weight_normalization,
            uniform_weights=config.uniform_token_weights,
            label=f"{pair_id}/anchor",
        )
    return texts, sides


@dataclass
class _AnchorRefresh:
    """State of periodic anchor re-sampling: the texts of the current anchors, and how to weigh new ones."""

    config: TrainConfig
    weigher: torch.nn.Module
    tokenizer: Any
    prompts: dict[str, str]
    collator: TrainingCollator
    texts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, config, loss_config, reference_module, tokenizer, pad_token_id) -> _AnchorRefresh | None:
        if config.anchor_refresh_every <= 0:
            return None
        if not loss_config.needs_anchor:
            raise ValueError(
                "anchor_refresh_every needs a loss with a triplet term (loss_type tidpo, gamma > 0)"
            )
        weigher = reference_module if reference_module is not None else _load_reference(config)[0]
        con = store.connect(config.duckdb_path, read_only=True)
        try:
            prompts = {p.pair_id: p.prompt for p in store.read_pairs(con, split="train")}
        finally:
            con.close()
        return cls(config, weigher, tokenizer, prompts, TrainingCollator(pad_token_id, ("anchor",)))

    def apply(self, policy, features_by_id, *, seed: int = 0, texts: dict[str, str] | None = None) -> int:
        """Sample (or restore) the anchors and put them into the features; returns how many changed."""
        self.weigher.to(next(policy.parameters()).device)
        new_texts, sides = sample_anchor_features(
            policy, self.weigher, self.tokenizer, self.prompts, self.config, seed, texts
        )
        for pair_id, side in sides.items():
            if pair_id in features_by_id:
                features_by_id[pair_id].update(side)
        self.texts.update(new_texts)
        return len(sides)

    def for_batch(self, policy, batch: TrainingBatch, features_by_id, device, *, seed: int) -> TrainingBatch:
        """The batch with fresh anchors for its own prompts, sampled from `policy` now (anchor_refresh_every 1)."""
        self.weigher.to(next(policy.parameters()).device)
        prompts = {pair_id: self.prompts[pair_id] for pair_id in batch.pair_ids}
        new_texts, sides = sample_anchor_features(
            policy, self.weigher, self.tokenizer, prompts, self.config, seed
        )
        for pair_id, side in sides.items():
            features_by_id[pair_id].update(side)
        self.texts.update(new_texts)
        return self.override(batch, features_by_id, device)

    def override(self, batch: TrainingBatch, features_by_id, device) -> TrainingBatch:
        """The batch with its anchor side rebuilt from the current features: the data loader may have
        collated it before the last refresh."""
        fresh = self.collator([features_by_id[p] for p in batch.pair_ids])
        return batch.with_side("anchor", fresh.sides["anchor"].to(device))
