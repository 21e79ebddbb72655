"""KL(pi || ref) estimated by Monte Carlo on responses sampled from pi, with its standard error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.evaluation.sampled_responses import KL_SAMPLING, SampledResponses, sample_with_tokens
from tidpo_core.method.logps import token_logps
from tidpo_core.models.generation import SamplingSettings


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """log pi(y_t | x, y_<t) of every response token, one array per (prompt, response), right-padded batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result: list[np.ndarray] = []
    for start in range(0, len(prompt_token_ids), batch_size):
        prompts = prompt_token_ids[start : start + batch_size]
        responses = response_token_ids[start : start + batch_size]
        rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logps = token_logps(logits, input_ids).cpu().numpy()
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            result.append(logps[i, len(p) : len(p) + len(r)].astype(np.float64))
    model.train(was_training)
    return result


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[sum_t log pi(y_t|.) - log ref(y_t|.)] over sampled responses,
    with the standard error of that mean (`stderr`, NaN for fewer than two samples)."""

    kl: float
    stderr: float
    kl_per_token: float
    samples: int
    per_sample: np.ndarray

    def as_metrics(self) -> dict[str, float]:
        return {
            "kl_to_reference": self.kl,
            "kl_to_reference_stderr": self.stderr,
            "kl_per_token": self.kl_per_token,
            "kl_samples": float(self.samples),
        }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of Monte-Carlo samples: std(values, ddof=1) / sqrt(n).

    NaN mean and stderr for no values; a single value has a mean but no stderr (NaN).
    """
    x = np.asarray(values, np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    stderr = float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), stderr


def kl_from_logps(
    policy_logps: Sequence[Sequence[float]], reference_logps: Sequence[Sequence[float]]
) -> KLEstimate:
    """The estimate from per-token log-probs of responses sampled from the policy.

    Each sample contributes s_i = sum_t [log pi - log ref]; the estimate is mean(s_i), its standard error
    std(s_i, ddof=1) / sqrt(n) (`mean_and_stderr`). The estimate can be negative by sampling noise (the
    true KL cannot), which is why it is always reported with its standard error.
    """
    sums, tokens = [], 0
    for p, r in zip(policy_logps, reference_logps, strict=True):
        p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
        if p.shape != r.shape:
            raise ValueError(f"policy and reference log-probs differ in length: {p.shape} vs {r.shape}")
        sums.append(float(np.sum(p - r)))
        tokens += p.size
    per_sample = np.asarray(sums, np.float64)
    n = per_sample.size
    kl, stderr = mean_and_stderr(per_sample)
    per_token = float(per_sample.sum() / max(tokens, 1)) if n else float("nan")
    return KLEstimate(kl, stderr, per_token, n, per_sample)


def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | None = None,
    settings: SamplingSettings = KL_SAMPLING,
    *,
    samples: SampledResponses | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[KLEstimate, SampledResponses]:
    """Sample from the policy (or take given samples of it) and estimate KL(pi || ref) on them.

    With `settings` other than pure sampling (temperature 1, no top-k/top-p) the samples come from a
    modified distribution and the estimate is only an approximation; callers should say so.
    """
    if samples is None:
        if prompts is None:
            raise ValueError("give prompts to sample from, or samples")
        samples = sample_with_tokens(policy, tokenizer, prompts, settings, progress=progress)
    pad = tokenizer.pad_token_id
    policy_logps = response_logps(policy, samples.prompt_ids, samples.response_ids, pad, batch_size)
    if reference is policy:
        reference_logps = policy_logps
    else:
        reference_logps = response_logps(reference, samples.prompt_ids, samples.response_ids, pad, batch_size)
    return kl_from_logps(policy_logps, reference_logps), samples
