"""Encoding of (prompt, response) pairs with an exact response boundary, and batching of preference pairs.

Only response tokens are scored by TI-DPO, so every encoded sequence carries a response mask and the
character offsets of its response tokens (the latter let tests and reports map weights back to text).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tidpo_core.batching.batch import column_name
from tidpo_core.batching.chat import closing_token_id, has_chat_template, prompt_messages

__all__ = [
    "EncodedSequence",
    "PreferenceCollator",
    "encode_prompt",
    "encode_prompt_response",
    "pad_right",
    "response_token_ids",
    "scatter_response_values",
    "tokens_overlapping",
]


@dataclass(frozen=True)
class EncodedSequence:
    """One prompt+response sequence: ids, which of them are the response, and where those come from."""

    input_ids: list[int]
    # 1 on response tokens including the closing eos / end-of-turn (the model is trained to stop), 0 on the prompt.
    response_mask: list[int]
    # One (start, end) character span in the response string per response token; the closing token gets an empty span
    # at the end of the response.
    response_offsets: list[tuple[int, int]]

    @property
    def response_length(self) -> int:
        return sum(self.response_mask)

    @property
    def prompt_length(self) -> int:
        """Tokens before the response: the encoded prompt (`encode_prompt`)."""
        return len(self.input_ids) - self.response_length


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_tokens: int) -> list[int]:
    """The prompt's ids exactly as every stage feeds them to a model (sampling, weights, training, evaluation).

    With a chat template: the prompt's turns (`chat.prompt_messages`) rendered with the template and its
    generation prompt; the template writes its own begin-of-text markers. A prompt over the budget loses
    its oldest turns first, then the start of its oldest remaining turn. Without one: bos + the prompt's
    tokens, keeping the prompt's end (nearest the response).
    """
    if max_prompt_tokens < 0:
        raise ValueError(f"max_prompt_tokens must be >= 0, got {max_prompt_tokens}")
    if has_chat_template(tokenizer):
        return _templated_prompt_ids(tokenizer, prompt_messages(prompt), max_prompt_tokens)
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-max_prompt_tokens:] if max_prompt_tokens else []
    head: list[int] = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return head + [int(t) for t in prompt_ids]


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _templated_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], budget: int
) -> list[int]:
    ids = _render_ids(tokenizer, messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    # Whole turns first: a conversation that starts mid-turn reads worse than one that starts later.
    while len(ids) > budget and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        ids = _render_ids(tokenizer, system + turns)
    if len(ids) > budget and turns:
        content_ids = tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"]
        keep = max(0, len(content_ids) - (len(ids) - budget))
        shortened = tokenizer.decode(content_ids[len(content_ids) - keep :]) if keep else ""
        ids = _render_ids(tokenizer, system + [{**turns[0], "content": shortened}] + turns[1:])
    # Decoding and re-encoding a cut can merge tokens differently; the budget is a hard limit all the same.
    return ids[-budget:] if len(ids) > budget else ids


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 128,
    add_eos: bool = True,
) -> EncodedSequence:
    """Encode `prompt` then `response` into one sequence: prompt ids (`encode_prompt`) + response + closing token.

    The two texts are tokenized separately so no token straddles the boundary (a joint tokenization could
    merge the prompt's last characters with the response's first). A long response keeps its start.
    `max_response_tokens` bounds the response part including its closing token, so a truncated response
    still ends in it. The closing token is eos, or with a chat template the template's end-of-turn token
    (the token the model learns to stop on); it is part of the response mask and scored. With a chat
    template the response is the assistant turn's content: its surrounding whitespace (HH's leading
    space) is left out, and its offsets still index the given string.
    """
    closing_id = closing_token_id(tokenizer)
    if add_eos and closing_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")
    min_response = 1 if add_eos else 0
    if max_response_tokens < min_response:
        raise ValueError(f"max_response_tokens must be >= {min_response}, got {max_response_tokens}")

    head = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    lead = 0
    content = response
    if has_chat_template(tokenizer):
        lead = len(response) - len(response.lstrip())
        content = response.strip()
    # Offsets need a fast (Rust-backed) tokenizer; slow ones raise NotImplementedError here, which is clear.
    encoded_response = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
    response_budget = max_response_tokens - (1 if add_eos else 0)
    response_ids: list[int] = list(encoded_response["input_ids"][:response_budget])
    offsets: list[tuple[int, int]] = [
        (int(s) + lead, int(e) + lead) for s, e in encoded_response["offset_mapping"][:response_budget]
    ]
    if add_eos:
        response_ids.append(int(closing_id))
        offsets.append((len(response), len(response)))

    return EncodedSequence(
        input_ids=head + [int(t) for t in response_ids],
        response_mask=[0] * len(head) + [1] * len(response_ids),
        response_offsets=offsets,
    )


def response_token_ids(encoded: EncodedSequence) -> list[int]:
    """The ids of the response tokens (eos included), in order."""
    return [t for t, m in zip(encoded.input_ids, encoded.response_mask, strict=True) if m]


def tokens_overlapping(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the response tokens whose character span overlaps the half-open span [start, end)."""
    start, end = span
    # Strict overlap: zero-width spans (the eos) and tokens that only touch the span's edge are excluded.
    return [i for i, (s, e) in enumerate(offsets) if max(s, start) < min(e, end)]


def pad_right(
    sequences: Sequence[Sequence[float | int]], pad_value: float | int, dtype: torch.dtype
) -> Tensor:
    """Stack variable-length rows into a [B, max_len] tensor, filling the right end with `pad_value`."""
    max_len = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max_len), pad_value, dtype=dtype)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, : len(seq)] = torch.as_tensor(np.asarray(seq), dtype=dtype)
    return out


def scatter_response_values(
    values: Sequence[Any], response_mask: Tensor, *, dtype: torch.dtype = torch.float32, fill: float = 0.0
) -> Tensor:
    """Place per-response-token values at the response positions of a [B, T] mask; `fill` elsewhere.

    Rows are 1-D (one value per token, giving [B, T]) or 2-D [tokens, k] (giving [B, T, k]).
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    if len(values) != response_mask.shape[0]:
        raise ValueError(f"{len(values)} value rows for a batch of {response_mask.shape[0]}")
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    # A copy of each row: stored rows are read-only Arrow views.
    rows = [np.array(row_values, dtype=numpy_dtype) for row_values in values]
    trailing = next((r.shape[1:] for r in rows if r.size), ())
    out = torch.full((*response_mask.shape, *trailing), fill, dtype=dtype)
    for row, row_values in enumerate(rows):
        positions = torch.nonzero(response_mask[row] != 0, as_tuple=True)[0]
        if len(row_values) != positions.numel():
            raise ValueError(f"row {row}: {len(row_values)} values for {positions.numel()} response tokens")
        if positions.numel():
            out[row, positions] = torch.from_numpy(row_values)
    return out


def _is_number(value: Any) -> bool:
    # numbers.Number covers Python and NumPy scalars; complex values have no use in a batch.
    return isinstance(value, numbers.Number) and not isinstance(value, complex)


class PreferenceCollator:
    """Batch preference pairs: per side, right-padded ids, attention and response masks, token weights.

    Right padding keeps every real token at the same position as in its unpadded sequence, so causal
    log-probs and attributions do not depend on the batch. With `pad_to_common_length`, all sides share
    one T so that they can be concatenated into a single forward pass.
    """

    def __init__(
        self,
        pad_token_id: int,
        sides: Sequence[str] = ("chosen", "rejected"),
        *,
        pad_to_common_length: bool = False,
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.sides = tuple(sides)
        self.pad_to_common_length = pad_to_common_length

    def _side_keys(self) -> set[str]:
        suffixes = ("input_ids", "response_mask", "weights")
        return {column_name(side, suffix) for side in self.sides for suffix in suffixes}

    def _collate_side(self, features: list[dict[str, Any]], side: str, length: int) -> dict[str, Tensor]:
        ids = [f[column_name(side, "input_ids")] for f in features]
        masks = [f[column_name(side, "response_mask")] for f in features]
        for row, (row_ids, row_mask) in enumerate(zip(ids, masks, strict=True)):
            if len(row_ids) != len(row_mask):
                raise ValueError(
                    f"row {row} side {side!r}: {len(row_ids)} ids but {len(row_mask)} mask values"
                )

        def fit(t: Tensor, pad_value: float | int) -> Tensor:
            extra = length - t.shape[1]
            return torch.nn.functional.pad(t, (0, extra), value=pad_value) if extra > 0 else t

        input_ids = fit(pad_right(ids, self.pad_token_id, torch.long), self.pad_token_id)
        attention_mask = fit(pad_right([[1] * len(r) for r in ids], 0, torch.long), 0)
        response_mask = fit(pad_right(masks, 0, torch.float32), 0)
        weight_rows: list[Sequence[float]] = []
        for f, row_mask in zip(features, masks, strict=True):
            weights = f.get(column_name(side, "weights"))
            # Without stored weights every response token counts once: plain DPO.
            weight_rows.append([1.0] * int(sum(row_mask)) if weights is None else weights)
        return {
            column_name(side, "input_ids"): input_ids,
            column_name(side, "attention_mask"): attention_mask,
            column_name(side, "response_mask"): response_mask,
            column_name(side, "weights"): scatter_response_values(weight_rows, response_mask),
        }

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        lengths = {s: max(len(f[column_name(s, "input_ids")]) for f in features) for s in self.sides}
        common = max(lengths.values(), default=0)
        batch: dict[str, Any] = {}
        for side in self.sides:
            length = common if self.pad_to_common_length else lengths[side]
            batch.update(self._collate_side(features, side, length))

        handled = self._side_keys()
        extra_keys = {k for f in features for k in f} - handled
        for key in sorted(extra_keys):
            if key == "pair_id":
                batch["pair_id"] = [str(f.get("pair_id")) for f in features]
                continue
            values = [f.get(key) for f in features]
            # Scalars such as precomputed reference log-probs travel along; text and ragged lists do not.
            if all(_is_number(v) for v in values):
                batch[key] = torch.tensor(values)
        return batch
