"""KL(pi_ref || pi_theta) per position and SeqKL, TDPO's sequential KL (docs/method.md section 2).

The reference is either its full logits (exact KL) or its cached top-k next tokens (coarsened_kl, a
lower bound that is exact when k covers the vocabulary). Tensors follow tidpo_core.method.logps'
conventions (position-aligned with ``input_ids``, entry 0 is 0).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tidpo_core.method.logps import compute_dtype


def kl_from_logits(
    reference_logits: Tensor, policy_logits: Tensor, policy_log_normalizer: Tensor | None = None
) -> Tensor:
    """``KL(pi_ref || pi_theta)`` of the next-token distributions given by two logit tensors ``[..., V]``.

    Written as ``sum_v p_ref (z_ref - z_theta) + logsumexp(z_theta) - logsumexp(z_ref)`` so that no policy
    log-softmax ``[..., V]`` is built, forward or backward (pass the policy's logsumexp when the caller
    has it). Both terms shrink with the difference of the two distributions, so the KL of nearly equal
    ones keeps its precision (exactly 0 for equal logits).
    """
    dtype = compute_dtype(policy_logits)
    reference_logits, policy_logits = reference_logits.to(dtype), policy_logits.to(dtype)
    reference_log_normalizer = torch.logsumexp(reference_logits, dim=-1)
    reference_probs = (reference_logits - reference_log_normalizer.unsqueeze(-1)).exp()
    if policy_log_normalizer is None:
        policy_log_normalizer = torch.logsumexp(policy_logits, dim=-1)
    kl = torch.linalg.vecdot(reference_probs, reference_logits - policy_logits) + (
        policy_log_normalizer.to(dtype) - reference_log_normalizer
    )
    # KL is non-negative; rounding can leave ~-1e-9 where the two distributions (nearly) coincide.
    return kl.clamp_min(0.0)


def token_kl(reference_logits: Tensor, policy_logits: Tensor) -> Tensor:
    """Per-position ``KL(pi_ref || pi_theta)`` over the vocabulary ``[B,T]``, aligned like token_logps.

    The per-row form for plain padded tensors; the training engine maps kl_from_logits through its batch
    layout (tidpo_core.batching.packing) instead (pair_sequence_kl), and tests hold the two equal."""
    if reference_logits.shape != policy_logits.shape or policy_logits.dim() != 3:
        raise ValueError(
            "expected reference and policy logits of the same shape [B,T,V], got "
            f"{tuple(reference_logits.shape)} and {tuple(policy_logits.shape)}"
        )
    return F.pad(kl_from_logits(reference_logits[:, :-1], policy_logits[:, :-1]), (1, 0), value=0.0)


def reference_topk(reference_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The reference's k most likely next tokens per position: ids ``[B,T,k]`` (int) and their
    log-probabilities ``[B,T,k]``, aligned like token_logps (position t holds the distribution that
    predicts token t; position 0 is empty: ids 0, log-probs -inf)."""
    if reference_logits.dim() != 3:
        raise ValueError(f"expected logits [B,T,V], got {tuple(reference_logits.shape)}")
    k = min(k, reference_logits.shape[-1])
    logp = F.log_softmax(reference_logits[:, :-1].to(compute_dtype(reference_logits)), dim=-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    ids = F.pad(top_ids, (0, 0, 1, 0), value=0)
    return ids, F.pad(top_logp, (0, 0, 1, 0), value=float("-inf"))


def token_kl_topk(reference_topk_ids: Tensor, reference_topk_logp: Tensor, policy_logits: Tensor) -> Tensor:
    """Per-position KL(pi_ref || pi_theta) from the reference's cached top-k ``[B,T]`` (docs/method.md's
    SeqKL with the reference distribution stored instead of recomputed: `reference_kl: cached`).

    Both distributions are coarsened to the k cached tokens plus one bucket for all other tokens, and
    the KL of the coarsened pair is returned (see coarsened_kl). Positions whose cached log-probs are
    all -inf (position 0, padding) give 0. Per-row form, like token_kl.
    """
    if policy_logits.dim() != 3 or reference_topk_ids.shape[:2] != policy_logits.shape[:2]:
        raise ValueError(
            f"expected policy logits [B,T,V] and top-k [B,T,k], got {tuple(policy_logits.shape)} and "
            f"{tuple(reference_topk_ids.shape)}"
        )
    if reference_topk_logp.shape != reference_topk_ids.shape:
        raise ValueError(
            f"top-k ids {tuple(reference_topk_ids.shape)} and log-probs {tuple(reference_topk_logp.shape)} differ"
        )
    shifted = policy_logits[:, :-1].to(compute_dtype(policy_logits))
    policy_top = shifted.gather(-1, reference_topk_ids[:, 1:].long()) - torch.logsumexp(
        shifted, dim=-1, keepdim=True
    )
    whole = reference_topk_ids.shape[-1] >= policy_logits.shape[-1]
    return F.pad(
        coarsened_kl(reference_topk_logp[:, 1:], policy_top, whole_vocabulary=whole), (1, 0), value=0.0
    )


def coarsened_kl(reference_topk_logp: Tensor, policy_topk_logp: Tensor, *, whole_vocabulary: bool) -> Tensor:
    """KL of two next-token distributions coarsened to the reference's k cached tokens plus one bucket for
    all other tokens, from the log-probs ``[..., k]`` both give those tokens: ``[...]``.

    It equals the full KL when the k tokens are the whole vocabulary (the bucket is empty) and is a lower
    bound otherwise (merging outcomes never increases a KL); the gap is what the tail mass hides.
    """
    dtype = compute_dtype(policy_topk_logp)
    # A cached log-prob of -inf (no reference mass) becomes the most negative finite value, so its
    # term is 0 * finite = 0 without a mask: 0 * -inf would be nan.
    ref_logp = reference_topk_logp.to(dtype).clamp_min(torch.finfo(dtype).min)
    pol_top = policy_topk_logp.to(dtype)
    ref_p = ref_logp.exp()
    head = (ref_p * (ref_logp - pol_top)).sum(-1)
    if whole_vocabulary:
        # Whole vocabulary cached: no rest bucket (1 - sum of probs would be rounding noise, not mass).
        return head.clamp_min(0.0)
    # The rest bucket: 1 - (top-k mass), for each distribution; clamped so log(0) never appears (an
    # empty reference bucket then gives 0 * finite = 0).
    tiny = torch.finfo(dtype).tiny
    ref_rest = (1.0 - ref_p.sum(-1)).clamp_min(0.0)
    pol_rest = (1.0 - pol_top.exp().sum(-1)).clamp_min(tiny)
    rest = ref_rest * (ref_rest.clamp_min(tiny).log() - pol_rest.log())
    return (head + rest).clamp_min(0.0)


def sequence_kl(token_kl: Tensor, response_mask: Tensor) -> Tensor:
    """SeqKL(x, y): sum of the per-position KL over response positions ``[B]``."""
    return (token_kl * response_mask.to(token_kl.dtype)).sum(-1)


class TokenMap(Protocol):
    """Where a model's per-position outputs put each scored token: the batch layouts of
    tidpo_core.batching.packing (a view of chosen and rejected), written here as what the KL below needs."""

    def prefix(self, per_position: Tensor) -> Tensor: ...

    def per_token(self, per_position: Tensor) -> Tensor: ...

    def scored_only(self, values: Tensor) -> Tensor: ...


def pair_sequence_kl(
    pairs: TokenMap,
    policy_logits: Tensor,
    policy_log_normalizer: Tensor,
    response_mask: Tensor,
    *,
    reference_logits: Tensor | None = None,
    reference_topk_logp: Tensor | None = None,
    policy_topk_logp: Tensor | None = None,
) -> Tensor | None:
    """SeqKL ``[2B]`` of chosen and rejected from one forward's per-position outputs; None without a reference.

    `pairs` maps the positions of the logits (computed over the whole batch) to the stacked chosen and
    rejected tokens. The reference is its full logits (exact KL) or else its cached top-k log-probs
    ``[2B, T, k]`` beside the policy's log-probs of the same ids (`policy_topk_logp`, taken by the caller
    in the gather that also reads the tokens' log-probs; coarsened_kl, exact when k covers the
    vocabulary). The exact KL is taken per position and only then mapped to tokens, so no per-token
    ``[2B, T, V]`` gather of the logits is built.
    """
    if reference_logits is not None:
        per_position = kl_from_logits(
            pairs.prefix(reference_logits), pairs.prefix(policy_logits), pairs.prefix(policy_log_normalizer)
        )
        return sequence_kl(pairs.per_token(per_position), response_mask)
    if reference_topk_logp is None or policy_topk_logp is None:
        return None
    whole_vocabulary = reference_topk_logp.shape[-1] >= policy_logits.shape[-1]
    per_token = coarsened_kl(reference_topk_logp, policy_topk_logp, whole_vocabulary=whole_vocabulary)
    return sequence_kl(pairs.scored_only(per_token), response_mask)
