"""A short supervised fine-tune that turns a freshly built tiny model into a usable reference policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.features import EncodingSettings, encode_response
from tidpo_core.batching.tokenization import pad_right
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.logps import token_logps
from tidpo_core.runtime.threads import threads_for


def sft_texts(pairs: Sequence[PreferencePair], on: Literal["chosen", "both"]) -> list[tuple[str, str]]:
    texts = [(p.prompt, p.chosen) for p in pairs]
    if on == "both":
        texts += [(p.prompt, p.rejected) for p in pairs]
    return texts


def supervised_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    settings: EncodingSettings = EncodingSettings(),
    progress: bool = False,
) -> list[float]:
    """Next-token loss on response tokens only; returns the loss per step."""
    if not examples:
        raise ValueError("supervised_finetune needs at least one (prompt, response) example")
    encoded = [encode_response(tokenizer, prompt, response, settings) for prompt, response in examples]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.05, 1 - s / steps)
    )
    model.train()
    losses = []
    with threads_for(model):
        _finetune_steps(
            model, tokenizer, encoded, steps, batch_size, generator, optimizer, scheduler, losses, progress
        )
    model.eval()
    return losses


def _finetune_steps(
    model, tokenizer, encoded, steps, batch_size, generator, optimizer, scheduler, losses, progress
) -> None:
    device = next(model.parameters()).device
    for _ in tqdm(range(steps), disable=not progress, desc="sft", unit="step"):
        index = torch.randint(len(encoded), (min(batch_size, len(encoded)),), generator=generator).tolist()
        batch = [encoded[i] for i in index]
        input_ids = pad_right([e.input_ids for e in batch], tokenizer.pad_token_id, torch.long).to(device)
        attention_mask = pad_right([[1] * len(e.input_ids) for e in batch], 0, torch.long).to(device)
        response_mask = pad_right([e.response_mask for e in batch], 0, torch.float32).to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        loss = -(token_logps(logits, input_ids) * response_mask).sum() / response_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
