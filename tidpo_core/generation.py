"""Sampling responses from a policy: the triplet loss's anchors and the evaluation's samples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.fingerprint import digest
from tidpo_core.threads import threads_for


@dataclass(frozen=True)
class SamplingSettings:
    """The reference code's anchor sampling: top_k 50, top_p 0.95, temperature 0.8, 64 new tokens."""

    max_new_tokens: int = 64
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 0.8
    seed: int = 0
    batch_size: int = 16
    max_prompt_tokens: int = 192

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_tokens: int) -> list[int]:
    """The prompt exactly as training sees it: bos + prompt tokens, keeping the prompt's end."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def sample_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings = SamplingSettings(),
    progress: bool = False,
) -> Iterator[tuple[list[str], list[list[int]], list[list[int]]]]:
    """Sample one response per prompt, batched with left padding; yields (prompts, prompt ids, new ids).

    Each batch is seeded from the settings' seed and its prompts, so a prompt's sample does not depend
    on which other prompts were still missing when the asset re-ran. The new ids run to
    max_new_tokens, eos and padding included.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    try:
        with threads_for(model):  # the thread policy (tidpo_core.threads), held across the yields
            batches = range(0, len(prompts), settings.batch_size)
            for start in tqdm(batches, disable=not progress, desc="sample", unit="batch"):
                chunk = list(prompts[start : start + settings.batch_size])
                encoded = [prompt_ids(tokenizer, p, settings.max_prompt_tokens) for p in chunk]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
                attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
                torch.manual_seed(settings.seed + int(digest(chunk, 8), 16))
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    top_k=settings.top_k,
                    top_p=settings.top_p,
                    temperature=settings.temperature,
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
                yield chunk, encoded, output[:, width:].tolist()
    finally:
        model.train(was_training)


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings = SamplingSettings(),
    progress: bool = False,
) -> list[str]:
    """One sampled response text per prompt (see `sample_batches`)."""
    return [
        tokenizer.decode(row, skip_special_tokens=True)
        for _, _, rows in sample_batches(model, tokenizer, prompts, settings, progress)
        for row in rows
    ]
