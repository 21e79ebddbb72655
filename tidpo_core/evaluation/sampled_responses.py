"""Responses sampled from a model together with the exact token ids that were sampled, which the
Monte-Carlo KL estimate (kl.py) and the diversity metrics (diversity.py) read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.chat import stop_token_ids
from tidpo_core.models.generation import SamplingSettings, sample_batches

# Pure ancestral sampling (no temperature, top-k or top-p): the samples then come from pi itself, which
# the Monte-Carlo KL estimate (kl.py) needs to be unbiased.
KL_SAMPLING = SamplingSettings(max_new_tokens=128, top_k=0, top_p=1.0, temperature=1.0, seed=0, batch_size=16)


def is_pure_sampling(settings: SamplingSettings) -> bool:
    return settings.temperature == 1.0 and settings.top_k in (0, None) and settings.top_p >= 1.0


@dataclass(frozen=True)
class SampledResponses:
    """Responses sampled from one model, with the exact token ids that were sampled.

    `response_ids` runs up to and including the first eos (if the model stopped within the budget);
    `texts` are those tokens decoded as `generation.sample_responses` decodes them (same prompts,
    same seeding, so the same texts).
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]


@torch.no_grad()
def sample_with_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings = KL_SAMPLING,
    progress: bool = False,
) -> SampledResponses:
    """`generation.sample_responses`, keeping the sampled token ids.

    Re-encoding decoded text would score a canonical tokenization rather than the sampled path, which
    biases a likelihood-ratio estimate; so the ids come straight from `generate`.
    """
    stops = set(stop_token_ids(tokenizer))  # eos, or a chat model's end-of-turn token
    out = SampledResponses([], [], [], [], [])
    for chunk, encoded, rows in sample_batches(model, tokenizer, prompts, settings, progress):
        for prompt, ids, row in zip(chunk, encoded, rows, strict=True):
            end = next((i for i, token in enumerate(row) if token in stops), None)
            finished = end is not None
            out.prompts.append(prompt)
            out.prompt_ids.append(ids)
            out.response_ids.append(row[: end + 1] if finished else row)
            out.finished.append(finished)
            out.texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
