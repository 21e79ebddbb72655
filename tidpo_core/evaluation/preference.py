"""Preference metrics of a policy against its reference on the held-out pairs: each pair's summed
response log-probs under one model (`score_pairs`), then implicit-reward accuracy and margin and the
likelihood win rates (`preference_metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.features import EncodingSettings, TrainingCollator, build_features, stack_sides
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.logps import token_logps


@dataclass(frozen=True)
class PairScores:
    """Summed response log-probs of each eval pair under one model."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    batch_size: int = 16,
    progress: bool = False,
) -> PairScores:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sides = ("chosen", "rejected")
    features = build_features(tokenizer, pairs, settings)
    collate = TrainingCollator(tokenizer.pad_token_id, sides)
    sums: dict[str, list[float]] = {s: [] for s in sides}
    counts: dict[str, list[float]] = {s: [] for s in sides}
    for start in tqdm(range(0, len(features), batch_size), disable=not progress, desc="score", unit="batch"):
        batch = collate(features[start : start + batch_size])
        stacked = stack_sides(batch, sides, tokenizer.pad_token_id)
        stacked = {k: v.to(device) for k, v in stacked.items()}
        logits = model(
            input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]
        ).logits.float()
        per_token = token_logps(logits, stacked["input_ids"]) * stacked["response_mask"]
        n = batch.sides["chosen"].input_ids.shape[0]
        for i, side in enumerate(sides):
            sums[side].extend(per_token[i * n : (i + 1) * n].sum(1).tolist())
            counts[side].extend(stacked["response_mask"][i * n : (i + 1) * n].sum(1).tolist())
    model.train(was_training)
    return PairScores(
        chosen=np.asarray(sums["chosen"]),
        rejected=np.asarray(sums["rejected"]),
        chosen_tokens=np.asarray(counts["chosen"]),
        rejected_tokens=np.asarray(counts["rejected"]),
    )


def _win_rate(better: np.ndarray, worse: np.ndarray) -> float:
    """Share of pairs where `better` > `worse`, a tie counting half (so a model against itself is 0.5)."""
    if len(better) == 0:
        return float("nan")
    return float(np.mean((better > worse) + 0.5 * (better == worse)))


def preference_metrics(policy: PairScores, reference: PairScores, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy and margin relative to the reference, and likelihood win rates.

    rewards are beta * (log pi(y) - log pi_ref(y)) summed over the response, as in DPO/TRL.
    """
    reward_chosen = beta * (policy.chosen - reference.chosen)
    reward_rejected = beta * (policy.rejected - reference.rejected)
    margin = reward_chosen - reward_rejected
    return {
        "reward_accuracy": _win_rate(reward_chosen, reward_rejected),
        "reward_margin": float(np.mean(margin)) if len(margin) else float("nan"),
        "reward_chosen": float(np.mean(reward_chosen)) if len(margin) else float("nan"),
        "reward_rejected": float(np.mean(reward_rejected)) if len(margin) else float("nan"),
        "likelihood_win_rate": _win_rate(policy.chosen, policy.rejected),
        "normalized_likelihood_win_rate": _win_rate(
            policy.chosen / np.maximum(policy.chosen_tokens, 1),
            policy.rejected / np.maximum(policy.rejected_tokens, 1),
        ),
        "logps_chosen": float(np.mean(policy.chosen)) if len(margin) else float("nan"),
        "logps_rejected": float(np.mean(policy.rejected)) if len(margin) else float("nan"),
        "eval_pairs": float(len(margin)),
    }
