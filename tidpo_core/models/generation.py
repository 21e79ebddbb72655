"""Sampling responses from a policy: the triplet loss's anchors and the evaluation's samples.

Two ways to seed the randomness:
- per batch (no `seeds`; the evaluation): torch's global generator, seeded from the settings' seed and
  the batch's prompts, drawn by HF's multinomial sampling;
- per row (`seeds`, one per prompt; the anchors): each row has its own torch.Generator and its token is
  drawn with the Gumbel-max trick (argmax of the warped scores plus the row's Gumbel noise, under greedy
  decoding), so a row's sample depends on its own seed only, not on its batch-mates' draws, on which
  process sampled it or on how the prompts were cut into batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tidpo_core.batching.chat import stop_token_ids
from tidpo_core.batching.tokenization import encode_prompt
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.threads import threads_for


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
    """The prompt exactly as training sees it (`tokenization.encode_prompt`: the chat template, if any)."""
    return encode_prompt(tokenizer, prompt, max_prompt_tokens)


def warpers(settings: SamplingSettings) -> list[LogitsProcessor]:
    """The warpers HF's sampling applies for these settings, in HF's order (temperature, top-k, top-p):
    what the Gumbel-max draw must see so that it samples the same distribution."""
    out: list[LogitsProcessor] = []
    if settings.temperature != 1.0:
        out.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        out.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
    if settings.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
    return out


def gumbel_noise(size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` independent Gumbel(0, 1) values from `generator` (float32, on the CPU)."""
    uniform = torch.rand(size, generator=generator, dtype=torch.float32)
    # rand may return exactly 0; log(0) would make the noise -inf and drop a kept token.
    uniform = uniform.clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


class RowGumbelNoise(LogitsProcessor):
    """Adds each row's own Gumbel noise to its (warped) scores, one draw of the row's generator per step.

    argmax(log p + g) with g ~ Gumbel(0, 1) is a sample of softmax(log p): under greedy decoding this is
    sampling, with each row's randomness its own. A token warped to -inf stays at -inf (never drawn).
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        noise = torch.stack([gumbel_noise(scores.shape[-1], g) for g in self.generators])
        return scores + noise.to(device=scores.device, dtype=scores.dtype)


def _decoding(settings: SamplingSettings, seeds: Sequence[int] | None) -> dict[str, Any]:
    """generate()'s sampling arguments: HF's multinomial sampling, or warpers + row noise under greedy."""
    if seeds is None:
        return {
            "do_sample": True,
            "top_k": settings.top_k,
            "top_p": settings.top_p,
            "temperature": settings.temperature,
        }
    return {
        "do_sample": False,
        "logits_processor": LogitsProcessorList([*warpers(settings), RowGumbelNoise(seeds)]),
    }


@torch.no_grad()
def sample_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings = SamplingSettings(),
    progress: bool = False,
    seeds: Sequence[int] | None = None,
) -> Iterator[tuple[list[str], list[list[int]], list[list[int]]]]:
    """Sample one response per prompt, batched with left padding; yields (prompts, prompt ids, new ids).

    Without `seeds`, each batch is seeded from the settings' seed and its prompts, so a prompt's sample
    does not depend on which other prompts were still missing when the asset re-ran. With `seeds` (one
    per prompt), each row is drawn from its own generator (see the module's docstring). The new ids
    run to max_new_tokens, the stop token and padding included.
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    try:
        with threads_for(model):  # the thread plan (tidpo_core.runtime.threads), held across the yields
            batches = range(0, len(prompts), settings.batch_size)
            for start in tqdm(batches, disable=not progress, desc="sample", unit="batch"):
                chunk = list(prompts[start : start + settings.batch_size])
                encoded = [prompt_ids(tokenizer, p, settings.max_prompt_tokens) for p in chunk]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
                )
                chunk_seeds = None if seeds is None else seeds[start : start + settings.batch_size]
                if chunk_seeds is None:
                    torch.manual_seed(settings.seed + int(digest(chunk, 8), 16))
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    **_decoding(settings, chunk_seeds),
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=pad,
                    # A chat model stops at its end-of-turn token (and eos, where that differs).
                    eos_token_id=stop_token_ids(tokenizer),
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
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """One sampled response text per prompt (see `sample_batches`)."""
    return [
        tokenizer.decode(row, skip_special_tokens=True)
        for _, _, rows in sample_batches(model, tokenizer, prompts, settings, progress, seeds)
        for row in rows
    ]
