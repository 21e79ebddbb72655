"""One micro-batch's forward and loss: the policy (and where needed the reference) over the batch in
either layout (tidpo_core.batching.packing), then tidpo_core.method.losses."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tidpo_core.batching.batch import TrainingBatch
from tidpo_core.batching.features import stack_sides
from tidpo_core.batching.packing import BatchLayout, attention_implementation, lay_out
from tidpo_core.method.importance import Normalization, gradient_attribution, hybrid_weights
from tidpo_core.method.kl import pair_sequence_kl
from tidpo_core.method.logps import compute_dtype
from tidpo_core.method.losses import LossConfig, compute_loss
from tidpo_core.method.sides import SideTensors

ReferenceFn = Callable[..., torch.Tensor]
"""Logits of the frozen reference for a model's keyword inputs (input_ids, attention_mask, ...)."""
WeightsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _pooled_hidden(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def frozen_reference(model: torch.nn.Module, autocast: Callable[[], Any] | None = None) -> ReferenceFn:
    """Logits of a separate frozen reference model (no grad, eval mode)."""
    # Two calls: a DeepSpeed engine's eval() returns None, not the module.
    model.eval()
    model.requires_grad_(False)

    def logits(**inputs: Any) -> torch.Tensor:
        with torch.no_grad(), autocast() if autocast is not None else nullcontext():
            return model(**inputs).logits

    return logits


def adapter_disabled_reference(policy: torch.nn.Module, peft_model: Any) -> ReferenceFn:
    """Logits of the policy's base model with its LoRA adapter disabled: the reference, at no memory cost.

    The forward goes through `policy` (the DDP/FSDP wrapper, if any) so sharded models gather their
    parameters as usual; eval mode for the duration so dropout never touches the reference.
    """

    def logits(**inputs: Any) -> torch.Tensor:
        was_training = peft_model.training
        peft_model.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                return policy(**inputs).logits
        finally:
            peft_model.train(was_training)

    return logits


def online_weights(model: torch.nn.Module, lambda_: float, normalization: Normalization) -> WeightsFn:
    """`weights: online` (docs/method.md section 1): hybrid weights from the current policy's attribution.

    Gradients are taken with respect to the input embeddings only, so the parameters' .grad (the training
    gradient being accumulated) is untouched. `model` is the unwrapped policy.
    """

    def weights(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = stacked["response_mask"] != 0
        attribution = gradient_attribution(
            model, stacked["input_ids"], stacked["attention_mask"], mask.long()
        ).detach()
        out = torch.zeros_like(stacked["weights"])
        for row in range(out.shape[0]):
            if mask[row].any():
                out[row, mask[row]] = hybrid_weights(
                    attribution[row][mask[row]].float().cpu(), lambda_, normalization
                ).to(out.device, out.dtype)
        return out

    return weights


@dataclass
class _ForwardResult:
    """A forward's per-token quantities in the stacked padded layout, whatever the batch layout was."""

    policy_logps: torch.Tensor
    reference_logps: torch.Tensor | None
    seq_kl: torch.Tensor | None
    pooled_hidden: torch.Tensor | None
    tokens: int


def _token_and_topk_ids(input_ids: torch.Tensor, topk_ids: torch.Tensor | None) -> torch.Tensor:
    """``[S*B, T, 1 + k]``: each token's id, then the reference's cached top-k ids (chosen and rejected
    rows; the anchor rows, which SeqKL skips, ask for id 0), read from the logits in one gather."""
    ids = input_ids.unsqueeze(-1)
    if topk_ids is None:
        return ids
    topk_ids = topk_ids.to(ids.dtype)
    unused = topk_ids.new_zeros((ids.shape[0] - topk_ids.shape[0], *topk_ids.shape[1:]))
    return torch.cat([ids, torch.cat([topk_ids, unused])], dim=-1)


def _forward(policy, reference, layout, stacked, loss_config, want_hidden) -> _ForwardResult:
    """The policy (and where needed the reference) over one batch in either layout (tidpo_core.batching.packing)."""
    pairs = layout.first_sides(2)
    pair_mask = stacked["response_mask"][: 2 * layout.batch_size]
    reference_logps = stacked.get("reference_logps")
    ref_logits = None
    if reference is not None and (reference_logps is None or loss_config.needs_kl):
        # Missing log-probs need every side. SeqKL needs chosen and rejected only: they come first, so the
        # reference reads their rows (padded) or the columns up to their last token (shared prompt).
        ref_logits = reference(**(layout if reference_logps is None else pairs).model_inputs())
        ref_logits = ref_logits.to(compute_dtype(ref_logits))
        if reference_logps is None:
            reference_logps = layout.token_logps(ref_logits, stacked["input_ids"])
    out = policy(**layout.model_inputs(), output_hidden_states=want_hidden)
    # float32 at least (bf16 logits lose too much in logsumexp); a float64 model stays float64 (tests).
    logits = out.logits.to(compute_dtype(out.logits))
    # One logsumexp serves the log-probs and the KL: no log-softmax of the policy's logits is built.
    log_normalizer = torch.logsumexp(logits, dim=-1)
    topk_ids = stacked.get("reference_topk_ids") if loss_config.needs_kl and ref_logits is None else None
    logps = layout.vocabulary_logps(
        logits, _token_and_topk_ids(stacked["input_ids"], topk_ids), log_normalizer
    )
    kl = None
    if loss_config.needs_kl:
        kl = pair_sequence_kl(
            pairs,
            logits,
            log_normalizer,
            pair_mask,
            reference_logits=ref_logits,
            reference_topk_logp=stacked.get("reference_topk_logp"),
            policy_topk_logp=None if topk_ids is None else logps[: topk_ids.shape[0], :, 1:],
        )
    return _ForwardResult(
        policy_logps=logps[..., 0],
        reference_logps=reference_logps,
        seq_kl=kl,
        pooled_hidden=_pooled_hidden(
            layout.hidden_per_token(out.hidden_states[-1].to(compute_dtype(out.hidden_states[-1]))),
            stacked["response_mask"],
        )
        if want_hidden
        else None,
        tokens=layout.tokens,
    )


def compute_batch_loss(
    policy: torch.nn.Module,
    reference: ReferenceFn | torch.nn.Module | None,
    batch: TrainingBatch | Mapping[str, Any],
    loss_config: LossConfig,
    sides: Sequence[str],
    pad_token_id: int,
    weights_fn: WeightsFn | None = None,
    batch_layout: BatchLayout = "shared_prompt",
    attention: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss and statistics of one micro-batch; the model runs once over all sides.

    `batch` is a TrainingBatch (features.TrainingCollator) or a mapping under its flat names.
    `reference` gives full reference logits (needed for SeqKL when alpha > 0): a function of the model's
    keyword inputs, or a module used as a frozen reference. Without it SeqKL comes from the batch's cached
    reference top-k. The log-ratios use the batch's precomputed reference log-probs (DuckDB) where it has
    them, and the reference's otherwise.
    `batch_layout` picks one row per pair with the prompt read once (`shared_prompt`, tidpo_core.batching.packing)
    or one padded row per side (`padded`); the two give the same loss up to rounding. `attention` is the
    policy's attention implementation (read from the model when not given).
    """
    if isinstance(reference, torch.nn.Module):
        reference = frozen_reference(reference)
    stacked = stack_sides(batch, sides, pad_token_id)
    if weights_fn is not None:
        stacked["weights"] = weights_fn(stacked)
    want_hidden = loss_config.loss_type == "tidpo" and loss_config.triplet_space == "hidden"
    attention = attention or attention_implementation(getattr(policy, "config", None))
    layout = lay_out(stacked, len(sides), pad_token_id, batch_layout, attention)
    result = _forward(policy, reference, layout, stacked, loss_config, want_hidden)
    batch_size = layout.batch_size

    def side(i: int) -> SideTensors:
        part = slice(i * batch_size, (i + 1) * batch_size)
        return SideTensors(
            policy_logps=result.policy_logps[part],
            response_mask=stacked["response_mask"][part],
            reference_logps=None if result.reference_logps is None else result.reference_logps[part],
            weights=stacked["weights"][part],
            seq_kl=None if result.seq_kl is None or i >= 2 else result.seq_kl[part],
            hidden=None if result.pooled_hidden is None else result.pooled_hidden[part],
        )

    chosen, rejected = side(0), side(1)
    anchor = side(2) if len(sides) > 2 else None
    loss, stats = compute_loss(loss_config, chosen, rejected, anchor)
    return loss, stats, result.tokens
