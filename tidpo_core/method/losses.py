"""Preference losses: DPO, IPO, SimPO and TI-DPO (arXiv 2505.19653), as specified in docs/method.md.

Conventions (shared with the rest of tidpo_core): batches are right-padded and every per-token
tensor is position-aligned with ``input_ids``: entry ``t`` is about token ``input_ids[:, t]``
predicted from the tokens before it, so entry 0 is always 0. Only response tokens are scored;
``response_mask`` selects them and every sum below is taken under it.

Functions return per-example losses ``[B]``; :func:`compute_loss` reduces them to the batch mean and
reports TRL-named statistics so that dashboards built for TRL read our runs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

LossType = Literal["dpo", "ipo", "simpo", "tidpo"]
TripletSpace = Literal["sequence", "weighted_mean", "hidden"]

LOSS_TYPES: tuple[str, ...] = get_args(LossType)
TRIPLET_SPACES: tuple[str, ...] = get_args(TripletSpace)

# Ablations the paper reports plus "uniform_weights". The two weight ablations live in the token
# weights (importance.py, via the hybrid lambda), so the loss configuration is unchanged by them.
ABLATIONS: tuple[str, ...] = (
    "none",
    "no_gradient_attribution",
    "no_gaussian_prior",
    "no_triplet",
    "uniform_weights",
)

# Guards divisions by a response length or a weight total; a real response has both >= 1.
_EPS = 1e-12


@dataclass(frozen=True)
class LossConfig:
    """Which loss to optimise and its hyperparameters (defaults: the paper's Table B12).

    ``alpha`` is TDPO's sequential-KL weight (docs/method.md section 2, inside beta as in TDPO2; 0 gives pure
    token-weighted DPO), ``gamma`` the triplet weight (0 is the "no triplet" ablation) and
    ``uniform_weights`` ignores the token weights (all 1 on the response). ``triplet_space`` picks the
    triplet distance: ``sequence`` (the paper's Eq. 13, default), ``weighted_mean`` (squared difference
    of the token-weighted mean log-ratios) or ``hidden`` (mean-pooled last hidden states).
    """

    loss_type: LossType = "tidpo"
    beta: float = 0.1
    alpha: float = 0.5
    gamma: float = 0.1
    triplet_margin: float = 0.01
    triplet_space: TripletSpace = "sequence"
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    uniform_weights: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.triplet_space not in TRIPLET_SPACES:
            raise ValueError(
                f"unknown triplet_space {self.triplet_space!r}; expected one of {TRIPLET_SPACES}"
            )
        # Written as "not (x > 0)" so that NaN is rejected too.
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.simpo_beta > 0:
            raise ValueError(f"simpo_beta must be > 0, got {self.simpo_beta}")
        for name in ("alpha", "gamma", "triplet_margin"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not math.isfinite(self.simpo_gamma):
            raise ValueError(f"simpo_gamma must be finite, got {self.simpo_gamma}")

    @property
    def needs_reference(self) -> bool:
        """SimPO is reference-free; every other loss scores log-ratios against pi_ref."""
        return self.loss_type != "simpo"

    @property
    def needs_anchor(self) -> bool:
        return self.loss_type == "tidpo" and self.gamma > 0

    @property
    def needs_kl(self) -> bool:
        """True when training needs the reference's full logits (for SeqKL), not just its logps."""
        return self.loss_type == "tidpo" and self.alpha > 0


def ablation_config(base: LossConfig, ablation: str) -> LossConfig:
    """The loss configuration for one of :data:`ABLATIONS`.

    ``no_gradient_attribution`` (lambda = 0) and ``no_gaussian_prior`` (lambda = 1) change the token
    weights, which importance.py computes; they return ``base`` unchanged here.
    ``uniform_weights`` also drops the triplet and the KL term so that it reproduces plain DPO.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    if ablation == "no_triplet":
        return replace(base, gamma=0.0)
    if ablation == "uniform_weights":
        return replace(base, uniform_weights=True, gamma=0.0, alpha=0.0)
    return base


# --------------------------------------------------------------------------- per-token quantities


def compute_dtype(t: Tensor) -> torch.dtype:
    # bf16/fp16 logits lose too much in logsumexp; float64 is kept so that gradcheck-style tests work.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token log-probabilities ``[B,T]``, position-aligned with ``input_ids`` (entry 0 is 0).

    Uses gathered logit minus logsumexp so that no ``[B,T,V]`` log-softmax is materialised.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B,T,V] and input_ids [B,T], got {tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    dtype = compute_dtype(logits)
    shifted = logits[:, :-1].to(dtype)
    targets = input_ids[:, 1:].long().unsqueeze(-1)
    picked = shifted.gather(-1, targets).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
    return F.pad(picked, (1, 0), value=0.0)


def kl_from_logits(reference_logits: Tensor, policy_logits: Tensor, policy_log_normalizer: Tensor | None = None) -> Tensor:
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
        raise ValueError(f"top-k ids {tuple(reference_topk_ids.shape)} and log-probs {tuple(reference_topk_logp.shape)} differ")
    shifted = policy_logits[:, :-1].to(compute_dtype(policy_logits))
    policy_top = shifted.gather(-1, reference_topk_ids[:, 1:].long()) - torch.logsumexp(shifted, dim=-1, keepdim=True)
    whole = reference_topk_ids.shape[-1] >= policy_logits.shape[-1]
    return F.pad(coarsened_kl(reference_topk_logp[:, 1:], policy_top, whole_vocabulary=whole), (1, 0), value=0.0)


def coarsened_kl(reference_topk_logp: Tensor, policy_topk_logp: Tensor, *, whole_vocabulary: bool) -> Tensor:
    """KL of two next-token distributions coarsened to the reference's k cached tokens plus one bucket for
    all other tokens, from the log-probs ``[..., k]`` both give those tokens: ``[...]``.

    It equals the full KL when the k tokens are the whole vocabulary (the bucket is empty) and is a lower
    bound otherwise (merging outcomes never increases a KL); the gap is what the tail mass hides.
    """
    dtype = compute_dtype(policy_topk_logp)
    ref_logp = reference_topk_logp.to(dtype)
    pol_top = policy_topk_logp.to(dtype)
    ref_p = ref_logp.exp()
    head = torch.where(ref_p > 0, ref_p * (ref_logp - pol_top), torch.zeros_like(ref_p)).sum(-1)
    if whole_vocabulary:
        # Whole vocabulary cached: no rest bucket (1 - sum of probs would be rounding noise, not mass).
        return head.clamp_min(0.0)
    # The rest bucket: 1 - (top-k mass), for each distribution; clamped so log(0) never appears.
    tiny = torch.finfo(dtype).tiny
    ref_rest = (1.0 - ref_p.sum(-1)).clamp_min(0.0)
    pol_rest = (1.0 - pol_top.exp().sum(-1)).clamp_min(tiny)
    rest = torch.where(ref_rest > 0, ref_rest * (ref_rest.clamp_min(tiny).log() - pol_rest.log()), torch.zeros_like(ref_rest))
    return (head + rest).clamp_min(0.0)


def sequence_kl(token_kl: Tensor, response_mask: Tensor) -> Tensor:
    """SeqKL(x, y): sum of the per-position KL over response positions ``[B]``."""
    return (token_kl * response_mask.to(token_kl.dtype)).sum(-1)


class TokenMap(Protocol):
    """Where a model's per-position outputs put each scored token: the batch layouts of
    tidpo_core.batching.packing (a view of chosen and rejected), written here as what the KL below needs."""

    def prefix(self, per_position: Tensor) -> Tensor: ...

    def per_token(self, per_position: Tensor) -> Tensor: ...

    def gather_vocabulary(self, per_position: Tensor, ids: Tensor) -> Tensor: ...

    def scored_only(self, values: Tensor) -> Tensor: ...


def pair_sequence_kl(
    pairs: TokenMap,
    policy_logits: Tensor,
    policy_log_normalizer: Tensor,
    response_mask: Tensor,
    *,
    reference_logits: Tensor | None = None,
    reference_topk_ids: Tensor | None = None,
    reference_topk_logp: Tensor | None = None,
) -> Tensor | None:
    """SeqKL ``[2B]`` of chosen and rejected from one forward's per-position outputs; None without a reference.

    `pairs` maps the positions of the logits (computed over the whole batch) to the stacked chosen and
    rejected tokens. The reference is its full logits (exact KL) or else its cached top-k (coarsened_kl,
    exact when k covers the vocabulary). The exact KL is taken per position and only then mapped to
    tokens, so no per-token ``[2B, T, V]`` gather of the logits is built.
    """
    if reference_logits is not None:
        per_position = kl_from_logits(
            pairs.prefix(reference_logits), pairs.prefix(policy_logits), pairs.prefix(policy_log_normalizer)
        )
        return sequence_kl(pairs.per_token(per_position), response_mask)
    if reference_topk_ids is None or reference_topk_logp is None:
        return None
    policy_top = pairs.gather_vocabulary(pairs.prefix(policy_logits), reference_topk_ids) - pairs.per_token(
        pairs.prefix(policy_log_normalizer)
    ).unsqueeze(-1)
    whole_vocabulary = reference_topk_ids.shape[-1] >= policy_logits.shape[-1]
    per_token = coarsened_kl(reference_topk_logp, policy_top, whole_vocabulary=whole_vocabulary)
    return sequence_kl(pairs.scored_only(per_token), response_mask)


# --------------------------------------------------------------------------- one side of a pair


@dataclass
class SideTensors:
    """What the losses need for one side (chosen / rejected / anchor) of a batch."""

    policy_logps: Tensor
    response_mask: Tensor
    reference_logps: Tensor | None = None
    weights: Tensor | None = None
    seq_kl: Tensor | None = None
    hidden: Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.policy_logps.shape
        if len(shape) != 2:
            raise ValueError(f"policy_logps must be [B,T], got {tuple(shape)}")
        for name in ("response_mask", "reference_logps", "weights"):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"{name} must match policy_logps {tuple(shape)}, got {tuple(value.shape)}")
        if self.seq_kl is not None and self.seq_kl.shape != shape[:1]:
            raise ValueError(f"seq_kl must be [B]={tuple(shape[:1])}, got {tuple(self.seq_kl.shape)}")
        if self.hidden is not None and (self.hidden.dim() != 2 or self.hidden.shape[0] != shape[0]):
            raise ValueError(f"hidden must be [B,H] with B={shape[0]}, got {tuple(self.hidden.shape)}")


def _mask(side: SideTensors) -> Tensor:
    return side.response_mask.to(side.policy_logps.dtype)


def _require(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise ValueError(f"missing input: {what}")
    return value


def _logratios(side: SideTensors, name: str = "side") -> Tensor:
    """rho_t = log pi_theta - log pi_ref, zeroed outside the response."""
    reference = _require(side.reference_logps, f"{name}.reference_logps")
    return (side.policy_logps - reference) * _mask(side)


def _token_weights(side: SideTensors, uniform: bool) -> Tensor:
    # Multiplying by the mask keeps padding/prompt weights at 0 whatever the caller stored there;
    # for 0/1 masks mask*mask == mask exactly, which is what makes uniform TI-DPO equal DPO bit-for-bit.
    mask = _mask(side)
    if uniform or side.weights is None:
        return mask
    return side.weights.to(mask.dtype) * mask


def logratio_sum(side: SideTensors) -> Tensor:
    """Unweighted sum_t rho_t over the response ``[B]``."""
    return _logratios(side).sum(-1)


def weighted_logratio_sum(side: SideTensors, uniform: bool) -> Tensor:
    """sum_t w_t rho_t over the response ``[B]``; ``uniform`` (or no weights) uses w = 1."""
    return (_token_weights(side, uniform) * _logratios(side)).sum(-1)


def summed_logps(side: SideTensors) -> Tensor:
    """Policy log-probability of the response, sum over response tokens ``[B]``."""
    return (side.policy_logps * _mask(side)).sum(-1)


def mean_logps(side: SideTensors) -> Tensor:
    """Length-normalised policy log-probability (SimPO's reward before scaling) ``[B]``."""
    return summed_logps(side) / _mask(side).sum(-1).clamp_min(1.0)


# --------------------------------------------------------------------------- losses (per example)


def dpo_loss(chosen: SideTensors, rejected: SideTensors, beta: float) -> Tensor:
    """-log sigmoid(beta * (sum rho(y_w) - sum rho(y_l))) ``[B]``."""
    # Same expression shape as weighted_dpo_loss (beta * (a - b)) so the two agree exactly.
    return -F.logsigmoid(beta * (logratio_sum(chosen) - logratio_sum(rejected)))


def ipo_loss(chosen: SideTensors, rejected: SideTensors, beta: float) -> Tensor:
    """(sum rho(y_w) - sum rho(y_l) - 1/(2 beta))^2 ``[B]`` (summed, not length-averaged, per docs/method.md)."""
    return (logratio_sum(chosen) - logratio_sum(rejected) - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen: SideTensors, rejected: SideTensors, beta_s: float, gamma_s: float) -> Tensor:
    """-log sigmoid(beta_s * (mean log pi(y_w) - mean log pi(y_l)) - gamma_s) ``[B]``; reference-free."""
    return -F.logsigmoid(beta_s * (mean_logps(chosen) - mean_logps(rejected)) - gamma_s)


def kl_delta(chosen: SideTensors, rejected: SideTensors, alpha: float) -> Tensor:
    """TDPO2's KL difference alpha * (SeqKL(y_l) - stopgrad(SeqKL(y_w))) ``[B]``, before the beta scale.

    The stop-gradient on the chosen side means the KL is only pushed down on the rejected response.
    """
    kl_w = _require(chosen.seq_kl, "chosen.seq_kl (needed when alpha > 0)")
    kl_l = _require(rejected.seq_kl, "rejected.seq_kl (needed when alpha > 0)")
    return alpha * (kl_l - kl_w.detach())


def weighted_dpo_loss(
    chosen: SideTensors, rejected: SideTensors, beta: float, alpha: float, uniform: bool
) -> Tensor:
    """docs/method.md section 2: -log sigmoid(beta * [sum w rho(y_w) - sum w rho(y_l) - delta]) ``[B]``.

    The KL difference sits inside beta, as in TDPO2 and the authors' trainer; the form with delta outside
    beta (tidpo before 2026-12) equals this one with alpha / beta in place of alpha (alpha 5 at beta 0.1).
    """
    margin = weighted_logratio_sum(chosen, uniform) - weighted_logratio_sum(rejected, uniform)
    if alpha > 0:
        # Skipped entirely at alpha = 0 so that SeqKL is not required (and u stays bit-identical to DPO).
        margin = margin - kl_delta(chosen, rejected, alpha)
    return -F.logsigmoid(beta * margin)


def response_aligned(values: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's response entries moved to the front: ``out[b, j]`` is the j-th response entry of row b
    (zero past the response), with the response lengths ``[B]``.

    Rows of a batch start their responses at different columns (prompt lengths differ, and so do the
    batch layouts); Eq. 13 pairs the responses' tokens by their index from the response start.
    """
    mask = response_mask != 0
    index = (mask.long().cumsum(-1) - 1).clamp_min(0)
    aligned = torch.zeros_like(values).scatter_add(-1, index, values * mask.to(values.dtype))
    return aligned, mask.sum(-1)


def sequence_distance(first: SideTensors, second: SideTensors, first_name: str = "first", second_name: str = "second") -> Tensor:
    """Paper Eq. 13: d(a, b) = sum_t (rho_t(a) - rho_t(b))^2 over the positions t both responses have,
    counted from the response start, unweighted ``[B]``."""
    rho_a, length_a = response_aligned(_logratios(first, first_name), first.response_mask)
    rho_b, length_b = response_aligned(_logratios(second, second_name), second.response_mask)
    width = max(rho_a.shape[-1], rho_b.shape[-1])
    rho_a, rho_b = F.pad(rho_a, (0, width - rho_a.shape[-1])), F.pad(rho_b, (0, width - rho_b.shape[-1]))
    shared = torch.arange(width, device=rho_a.device) < torch.minimum(length_a, length_b).unsqueeze(-1)
    diff = (rho_a - rho_b) * shared.to(rho_a.dtype)
    return (diff * diff).sum(-1)


def triplet_representation(
    side: SideTensors, space: TripletSpace, uniform: bool, name: str = "side"
) -> Tensor:
    """r(y) of the scalar and hidden spaces: the token-weighted mean log-ratio ``[B]`` (weighted_mean) or
    the pooled hidden state ``[B,H]`` (hidden)."""
    if space == "hidden":
        return _require(side.hidden, f"{name}.hidden (needed for triplet_space='hidden')")
    weights = _token_weights(side, uniform)
    return (weights * _logratios(side, name)).sum(-1) / weights.sum(-1).clamp_min(_EPS)


def _squared_distance(a: Tensor, b: Tensor) -> Tensor:
    diff = a - b
    return diff * diff if diff.dim() == 1 else (diff * diff).sum(-1)


def triplet_distances(
    anchor: SideTensors, chosen: SideTensors, rejected: SideTensors, space: TripletSpace, uniform: bool
) -> tuple[Tensor, Tensor]:
    """(d(y_a, y_w), d(y_a, y_l)) ``[B]`` each, in the chosen triplet space."""
    if space == "sequence":
        return (
            sequence_distance(anchor, chosen, "anchor", "chosen"),
            sequence_distance(anchor, rejected, "anchor", "rejected"),
        )
    r_a = triplet_representation(anchor, space, uniform, "anchor")
    r_w = triplet_representation(chosen, space, uniform, "chosen")
    r_l = triplet_representation(rejected, space, uniform, "rejected")
    return _squared_distance(r_a, r_w), _squared_distance(r_a, r_l)


def triplet_loss(
    anchor: SideTensors,
    chosen: SideTensors,
    rejected: SideTensors,
    margin: float,
    space: TripletSpace,
    uniform: bool,
) -> Tensor:
    """docs/method.md section 3: max(0, d(y_a, y_w) - d(y_a, y_l) + margin) ``[B]``.

    ``uniform`` matters only to ``weighted_mean``: Eq. 13's sequence distance is unweighted.
    """
    to_chosen, to_rejected = triplet_distances(anchor, chosen, rejected, space, uniform)
    return (to_chosen - to_rejected + margin).clamp_min(0.0)


# --------------------------------------------------------------------------- batch loss + stats


def _check_inputs(
    config: LossConfig, chosen: SideTensors, rejected: SideTensors, anchor: SideTensors | None
) -> None:
    """Fail early, naming the missing input, rather than deep inside a loss function."""
    needed: list[tuple[Tensor | None, str]] = []
    if config.needs_reference:
        needed += [
            (chosen.reference_logps, "chosen.reference_logps"),
            (rejected.reference_logps, "rejected.reference_logps"),
        ]
    if config.needs_kl:
        needed += [(chosen.seq_kl, "chosen.seq_kl"), (rejected.seq_kl, "rejected.seq_kl")]
    reason = f"for loss_type={config.loss_type!r}"
    if config.needs_anchor:
        if anchor is None:
            raise ValueError(f"missing input: anchor {reason} with gamma > 0")
        if config.triplet_space == "hidden":
            needed += [
                (s.hidden, f"{n}.hidden")
                for n, s in (("anchor", anchor), ("chosen", chosen), ("rejected", rejected))
            ]
        else:
            needed.append((anchor.reference_logps, "anchor.reference_logps"))
    missing = [name for value, name in needed if value is None]
    if missing:
        raise ValueError(f"missing input(s) {reason}: {', '.join(missing)}")


def _mean(x: Tensor) -> Tensor:
    # Averaged in float64 so a logged stat equals the float32 cast of the loss it mirrors.
    return x.detach().double().mean().float()


def compute_loss(
    config: LossConfig,
    chosen: SideTensors,
    rejected: SideTensors,
    anchor: SideTensors | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar batch-mean loss and detached batch-mean statistics under TRL's names."""
    _check_inputs(config, chosen, rejected, anchor)
    extra: dict[str, Tensor] = {}
    if config.loss_type == "dpo":
        losses = dpo_loss(chosen, rejected, config.beta)
        reward_w, reward_l = config.beta * logratio_sum(chosen), config.beta * logratio_sum(rejected)
    elif config.loss_type == "ipo":
        losses = ipo_loss(chosen, rejected, config.beta)
        reward_w, reward_l = config.beta * logratio_sum(chosen), config.beta * logratio_sum(rejected)
    elif config.loss_type == "simpo":
        losses = simpo_loss(chosen, rejected, config.simpo_beta, config.simpo_gamma)
        reward_w, reward_l = config.simpo_beta * mean_logps(chosen), config.simpo_beta * mean_logps(rejected)
    else:
        uniform = config.uniform_weights
        dpo_term = weighted_dpo_loss(chosen, rejected, config.beta, config.alpha, uniform)
        if config.gamma > 0:
            assert anchor is not None  # guaranteed by _check_inputs
            triplet = triplet_loss(
                anchor, chosen, rejected, config.triplet_margin, config.triplet_space, uniform
            )
            losses = dpo_term + config.gamma * triplet
        else:
            # No triplet at all (not 0 * triplet) so an anchor is not needed and the loss is the DPO term exactly.
            triplet = torch.zeros_like(dpo_term)
            losses = dpo_term
        reward_w = config.beta * weighted_logratio_sum(chosen, uniform)
        reward_l = config.beta * weighted_logratio_sum(rejected, uniform)
        extra["triplet"] = _mean(triplet)
        if chosen.seq_kl is not None:
            extra["seq_kl/chosen"] = _mean(chosen.seq_kl)
        if rejected.seq_kl is not None:
            extra["seq_kl/rejected"] = _mean(rejected.seq_kl)
        extra["loss/dpo_term"] = _mean(dpo_term)

    stats = {
        "rewards/chosen": _mean(reward_w),
        "rewards/rejected": _mean(reward_l),
        "rewards/accuracies": _mean((reward_w > reward_l).float()),
        "rewards/margins": _mean(reward_w - reward_l),
        "logps/chosen": _mean(summed_logps(chosen)),
        "logps/rejected": _mean(summed_logps(rejected)),
        **extra,
    }
    return losses.mean(), stats
