"""Shared-prompt batches: one row per pair, ``[prompt | chosen | rejected | anchor]``, the prompt read once.

The sides of a pair have the same prompt tokens (tokenization.encode_prompt_response encodes the prompt
apart from its response), so a padded batch of one row per side reads every prompt two or three times.
Here each pair is one row: its prompt, then its responses one after another, padding at the end only.
A 4-D attention mask lets each response token see the prompt and the earlier tokens of its own
response, and position ids restart every response where the prompt ends, so every response token gets
the logits it would get in its own padded row (the same positions, the same keys), up to rounding.

Logits are computed from the last prompt column on only (`logits_to_keep`): prompt tokens are never
scored. The last prompt column predicts the first token of every response; each later response token is
predicted by the column before it. Results are handed back in the stacked padded layout of
features.stack_sides ([S*B, T], side s in rows s*B..(s+1)*B), so the losses do not see the difference.

What this costs: attention runs over rows about three responses long, and sdpa computes a 4-D mask's
masked entries too (about a fifth of a step's CPU time on the TRL benchmark; attending per segment
through a custom attention function measured only ~4 % faster, so it is not done; torch 2.13's
flex attention, which skips masked blocks, has no backward on CPU). What it saves: the
repeated prompts, most of the padding, and the vocabulary projection of every prompt token (0.75-0.88x
the padded layout's step time on the TRL benchmark). `batch_layout: padded` in TrainConfig keeps one padded row per side
(needed by attention kernels that take no 4-D mask, such as flash-attention 2): PaddedBatch.

Both layouts answer the same questions (model inputs; per-token values from per-position ones; the view
of the first sides, which SeqKL needs), so tidpo_core.training.forward runs one forward for either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tidpo_core.method.logps import compute_dtype

BatchLayout = Literal["shared_prompt", "padded"]
BATCH_LAYOUTS: tuple[str, ...] = ("shared_prompt", "padded")
# Attention implementations that accept a custom 4-D mask (sdpa: boolean; eager: additive).
MASKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model_config: Any) -> str:
    """The attention kernel a Hugging Face config selects: sdpa (transformers' default), eager, flash_attention_2, ..."""
    return str(getattr(model_config, "_attn_implementation", None) or "sdpa")


def shared_prompt_obstacle(model_config: Any, max_sequence_tokens: int) -> str | None:
    """Why a model cannot run shared-prompt rows exactly (None when it can).

    The 4-D mask replaces the one the model would build: attention kernels that take no such mask
    cannot run it, and a sliding window the model would apply inside a sequence is not applied.
    """
    attention = attention_implementation(model_config)
    if attention not in MASKED_ATTENTION:
        return f"the model runs {attention!r} attention, which takes no 4-D mask ({', '.join(MASKED_ATTENTION)} do)"
    window = getattr(model_config, "sliding_window", None)
    if getattr(model_config, "use_sliding_window", True) is False:
        window = None
    if window is not None and window < max_sequence_tokens:
        return (
            f"the model attends through a sliding window of {window} tokens, shorter than a sequence "
            f"({max_sequence_tokens} tokens), which the 4-D mask would not apply"
        )
    return None


class PromptMismatchError(ValueError):
    """The sides of a pair do not share their prompt tokens, so they cannot share one row."""


class _TokenMaps:
    """What both layouts derive from their maps between model outputs and stacked ``[S*B, T]`` tokens."""

    scored: Tensor

    def per_token(self, per_position: Tensor) -> Tensor:
        raise NotImplementedError

    def gather_vocabulary(self, per_position: Tensor, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def scored_only(self, values: Tensor) -> Tensor:
        """`values` ``[S*B, T, ...]`` with 0 wherever no token is scored."""
        scored = self.scored.view(*self.scored.shape, *([1] * (values.dim() - 2)))
        return torch.where(scored, values, torch.zeros((), dtype=values.dtype, device=values.device))

    def token_logps(
        self, logits: Tensor, stacked_input_ids: Tensor, log_normalizer: Tensor | None = None
    ) -> Tensor:
        """Per-token log-probabilities ``[S*B, T]`` aligned like logps.token_logps (0 off-response).

        `log_normalizer`: the logits' logsumexp over the vocabulary, when the caller has it.
        """
        return self.vocabulary_logps(logits, stacked_input_ids.unsqueeze(-1), log_normalizer).squeeze(-1)

    def vocabulary_logps(self, logits: Tensor, ids: Tensor, log_normalizer: Tensor | None = None) -> Tensor:
        """Log-probabilities ``[S*B, T, m]`` of the vocabulary ids ``[S*B, T, m]`` at each stacked token's
        predicting position (0 off-response). Asking for every id at once (the tokens and the reference's
        cached top-k) makes one gather of the logits, so the backward builds one gradient of them.
        """
        logits = logits.to(compute_dtype(logits))
        if log_normalizer is None:
            log_normalizer = torch.logsumexp(logits, dim=-1)
        picked = self.gather_vocabulary(logits, ids)
        return self.scored_only(picked - self.per_token(log_normalizer).unsqueeze(-1))


@dataclass(frozen=True)
class SharedPromptBatch(_TokenMaps):
    """A packed batch and the maps from stacked (per-side, padded) positions into it."""

    input_ids: Tensor
    """[B, L] prompt, then each side's response; pad_token_id after the last response."""
    position_ids: Tensor
    """[B, L] 0.. over the prompt; every response continues from the prompt's length."""
    attention_mask: Tensor
    """[B, 1, L, L]: bool (True = may attend) for sdpa, additive (0 / dtype min) for eager."""
    first_kept: int
    """First column whose logits are computed: the shortest prompt's last column."""
    rows: Tensor
    """[S*B] packed row of each stacked row."""
    predictor: Tensor
    """[S*B, T] kept-logit index whose distribution predicts the stacked token (0 where not scored)."""
    columns: Tensor
    """[S*B, T] packed column of each stacked response token (0 elsewhere)."""
    scored: Tensor
    """[S*B, T] bool: a response token with a predictor (all of them unless a prompt is empty)."""
    tokens: int
    """Tokens the model reads (padding excluded)."""
    batch_size: int
    """Pairs in the batch (B)."""
    end: int
    """Columns the model reads: all of them, or for a view of the first sides, up to their last token."""
    side_ends: tuple[int, ...]
    """Entry s: the columns up to the last token of sides 0..s in any row (known at packing, on the CPU)."""

    @property
    def logits_to_keep(self) -> int:
        return self.end - self.first_kept

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face causal LM (logits for the kept columns only)."""
        end = self.end
        return {
            "input_ids": self.input_ids[:, :end],
            "position_ids": self.position_ids[:, :end],
            "attention_mask": self.attention_mask[:, :, :end, :end],
            "logits_to_keep": end - self.first_kept,
        }

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        return SharedPromptBatch(
            **{
                name: value.to(device) if isinstance(value, Tensor) else value
                for name, value in vars(self).items()
            }
        )

    def first_sides(self, count: int) -> SharedPromptBatch:
        """A view of the first `count` sides (chosen and rejected for SeqKL): the packed rows cut after the
        last of their tokens. A token's logits depend on the columns up to it alone (causal mask), so the
        cut row gives the sides packed first the same logits."""
        stacked_rows = slice(0, count * self.batch_size)
        return replace(
            self,
            rows=self.rows[stacked_rows],
            predictor=self.predictor[stacked_rows],
            columns=self.columns[stacked_rows],
            scored=self.scored[stacked_rows],
            end=self.side_ends[count - 1],
        )

    def prefix(self, per_position: Tensor) -> Tensor:
        """This view's part ``[B, K', ...]`` of values computed on the whole batch (or on a larger view)."""
        return per_position[:, : self.logits_to_keep]

    def _flat_positions(self, kept: int) -> Tensor:
        return self.rows.unsqueeze(1) * kept + self.predictor

    def per_token(self, per_position: Tensor) -> Tensor:
        """[B, K] values of the kept columns -> [S*B, T] values of the tokens they predict (0 off-response)."""
        return self.scored_only(per_position.reshape(-1)[self._flat_positions(per_position.shape[1])])

    def gather_vocabulary(self, per_position: Tensor, ids: Tensor) -> Tensor:
        """[B, K, V] values and [S*B, T, k] vocabulary ids -> [S*B, T, k] values at the predicting column."""
        batch, kept, vocabulary = per_position.shape
        flat = (self._flat_positions(kept).unsqueeze(-1) * vocabulary + ids.long()).reshape(-1)
        return per_position.reshape(-1).gather(0, flat).reshape(ids.shape)

    def hidden_per_token(self, hidden: Tensor) -> Tensor:
        """Hidden states ``[B, L, H]`` at each stacked token's packed column: ``[S*B, T, H]`` (the stacked
        padded layout; what lies off the response is column 0's and is for the caller's mask to drop)."""
        batch, length, width = hidden.shape
        flat = (self.rows.unsqueeze(1) * length + self.columns).reshape(-1)
        return hidden.reshape(batch * length, width).index_select(0, flat).reshape(*self.columns.shape, width)


@dataclass(frozen=True)
class PaddedBatch(_TokenMaps):
    """One padded row per side: features.stack_sides as is, for attention kernels that take no 4-D mask.

    It answers what SharedPromptBatch answers, so one forward serves both layouts; a side's logits are
    its own row's, and position t's distribution predicts token t + 1.
    """

    input_ids: Tensor
    """[S*B, T] as stacked."""
    attention_mask: Tensor
    """[S*B, T] 1 on tokens, 0 on padding."""
    scored: Tensor
    """[S*B, T] bool: a response token with a predictor (position > 0)."""
    tokens: int
    batch_size: int

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def first_sides(self, count: int) -> PaddedBatch:
        """A view of the first `count` sides' rows."""
        rows = slice(0, count * self.batch_size)
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            scored=self.scored[rows],
        )

    def prefix(self, per_position: Tensor) -> Tensor:
        """This view's rows of values computed on the whole batch (or on a larger view)."""
        return per_position[: self.input_ids.shape[0]]

    def per_token(self, per_position: Tensor) -> Tensor:
        """[R, T] values per position -> [R, T] values of the tokens they predict (0 off-response)."""
        return self.scored_only(F.pad(per_position[:, :-1], (1, 0)))

    def gather_vocabulary(self, per_position: Tensor, ids: Tensor) -> Tensor:
        """[R, T, V] values and [R, T, k] vocabulary ids -> [R, T, k] values at the predicting position."""
        return F.pad(per_position[:, :-1].gather(-1, ids[:, 1:].long()), (0, 0, 1, 0))

    def hidden_per_token(self, hidden: Tensor) -> Tensor:
        return hidden


def lay_out(
    stacked: dict[str, Tensor],
    num_sides: int,
    pad_token_id: int,
    layout: BatchLayout,
    attention: str = "sdpa",
) -> SharedPromptBatch | PaddedBatch:
    """A stacked batch (features.stack_sides) in `layout`."""
    if layout == "shared_prompt":
        return pack_shared_prompt(stacked, num_sides, pad_token_id, attention)
    if layout == "padded":
        response = stacked["response_mask"] != 0
        positions = torch.arange(response.shape[1], device=response.device)
        return PaddedBatch(
            input_ids=stacked["input_ids"],
            attention_mask=stacked["attention_mask"],
            scored=response & (positions > 0).unsqueeze(0),
            tokens=int(stacked["attention_mask"].sum()),
            batch_size=stacked["input_ids"].shape[0] // num_sides,
        )
    raise ValueError(f"batch_layout must be one of {BATCH_LAYOUTS}, got {layout!r}")


def pack_shared_prompt(
    stacked: dict[str, Tensor],
    num_sides: int,
    pad_token_id: int,
    attention: str = "sdpa",
) -> SharedPromptBatch:
    """Pack features.stack_sides output (`num_sides` sides of B rows each) into one row per pair.

    Raises PromptMismatchError when the sides of a pair do not start with the same prompt tokens.
    """
    if attention not in MASKED_ATTENTION:
        raise ValueError(
            f"batch_layout 'shared_prompt' needs an attention that takes a 4-D mask ({', '.join(MASKED_ATTENTION)}), "
            f"not {attention!r}; set batch_layout: padded"
        )
    total = stacked["input_ids"].shape[0]
    if total % num_sides:
        raise ValueError(f"{total} stacked rows do not split into {num_sides} sides")
    batch = total // num_sides
    ids = stacked["input_ids"].cpu()
    response = stacked["response_mask"].cpu() != 0
    response_lengths = response.sum(1)
    prompt_lengths = stacked["attention_mask"].cpu().sum(1) - response_lengths

    per_row = prompt_lengths.view(num_sides, batch)
    if not (per_row == per_row[0]).all():
        raise PromptMismatchError(f"the sides of a pair have different prompt lengths: {per_row.tolist()}")
    prompts = prompt_lengths[:batch]
    side_lengths = response_lengths.view(num_sides, batch)
    row_lengths = prompts + side_lengths.sum(0)
    length = int(row_lengths.max())
    first_kept = max(int(prompts.min()) - 1, 0)

    packed = _PackedColumns.empty(batch, length, total, ids.shape[1], ids.dtype, pad_token_id)
    for row in range(batch):
        packed.fill_row(ids, row, int(prompts[row]), side_lengths[:, row].tolist(), first_kept)

    device = stacked["input_ids"].device
    return SharedPromptBatch(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=_segment_attention_mask(packed.segment.to(device), attention),
        first_kept=first_kept,
        rows=torch.arange(total) % batch,
        predictor=packed.predictor,
        columns=packed.columns,
        scored=response & (torch.arange(ids.shape[1]) > 0).unsqueeze(0),
        tokens=int(row_lengths.sum()),
        batch_size=batch,
        end=length,
        # At least one kept column each: logits_to_keep=0 would mean "all" to the model.
        side_ends=tuple(
            max(int(end), first_kept + 1) for end in (prompts + side_lengths.cumsum(0)).max(1).values
        ),
    ).to(device)


# Segment of each packed column: PROMPT_SEGMENT, s for side s's response, or PADDING_SEGMENT.
PROMPT_SEGMENT = -1
PADDING_SEGMENT = -2


@dataclass(frozen=True)
class _PackedColumns:
    """The packed rows being built: per packed column ``[B, L]`` and per stacked token ``[S*B, T]``."""

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    predictor: Tensor
    columns: Tensor

    @classmethod
    def empty(
        cls, batch: int, length: int, total: int, width: int, dtype: torch.dtype, pad_token_id: int
    ) -> _PackedColumns:
        return cls(
            input_ids=torch.full((batch, length), pad_token_id, dtype=dtype),
            position_ids=torch.zeros((batch, length), dtype=torch.long),
            segment=torch.full((batch, length), PADDING_SEGMENT, dtype=torch.long),
            predictor=torch.zeros((total, width), dtype=torch.long),
            columns=torch.zeros((total, width), dtype=torch.long),
        )

    def fill_row(self, ids: Tensor, row: int, prompt: int, side_lengths: list[int], first_kept: int) -> None:
        """Packed row `row`: the prompt of stacked row `row` (side 0), then each side's response in turn."""
        batch = self.input_ids.shape[0]
        for side in range(1, len(side_lengths)):
            if not torch.equal(ids[side * batch + row, :prompt], ids[row, :prompt]):
                raise PromptMismatchError(f"pair {row}: side {side} has other prompt tokens than side 0")
        self.input_ids[row, :prompt] = ids[row, :prompt]
        self.position_ids[row, :prompt] = torch.arange(prompt)
        self.segment[row, :prompt] = PROMPT_SEGMENT
        start = prompt
        for side, n in enumerate(side_lengths):
            if n == 0:
                continue
            stacked_row = side * batch + row
            self.input_ids[row, start : start + n] = ids[stacked_row, prompt : prompt + n]
            self.position_ids[row, start : start + n] = torch.arange(prompt, prompt + n)
            self.segment[row, start : start + n] = side
            self.columns[stacked_row, prompt : prompt + n] = torch.arange(start, start + n)
            # Token j of the response is predicted by the prompt's last column (j = 0) or by the column of
            # token j - 1; kept indices count from first_kept.
            predicting = torch.arange(start - 1, start + n - 1)
            predicting[0] = prompt - 1
            self.predictor[stacked_row, prompt : prompt + n] = (predicting - first_kept).clamp_min(0)
            start += n


def _segment_attention_mask(segment: Tensor, attention: str) -> Tensor:
    """The ``[B, 1, L, L]`` mask of packed rows from their column segments ``[B, L]``: a token sees the prompt
    and the earlier tokens of its own segment; bool for sdpa, additive for eager.

    Built where the model runs (`segment`'s device): only the [B, L] segments cross to the device.
    """
    device, length = segment.device, segment.shape[1]
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = allowed & (query != PADDING_SEGMENT) & (key != PADDING_SEGMENT)
    allowed = allowed & ((key == PROMPT_SEGMENT) | (key == query))
    # Padding columns attend to themselves: a row with no allowed key would turn into NaN.
    allowed = (allowed | torch.eye(length, dtype=torch.bool, device=device)).unsqueeze(1)
    if attention == "eager":
        mask = torch.zeros(allowed.shape, device=device)
        mask.masked_fill_(~allowed, torch.finfo(mask.dtype).min)
        return mask
    return allowed
