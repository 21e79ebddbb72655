"""One side (chosen / rejected / anchor) of a batch as the losses see it, and its per-response sums.

Tensors follow tidpo_core.method.logps' conventions: ``[B,T]``, position-aligned with ``input_ids``,
summed under ``response_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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


def require_input(value: Tensor | None, what: str) -> Tensor:
    """`value`, or a ValueError naming the missing input `what` (rather than failing deep in a loss)."""
    if value is None:
        raise ValueError(f"missing input: {what}")
    return value


def logratios(side: SideTensors, name: str = "side") -> Tensor:
    """rho_t = log pi_theta - log pi_ref, zeroed outside the response."""
    reference = require_input(side.reference_logps, f"{name}.reference_logps")
    return (side.policy_logps - reference) * _mask(side)


def response_weights(side: SideTensors, uniform: bool) -> Tensor:
    """The token weights on the response, 0 elsewhere ``[B,T]``; the mask itself when ``uniform`` or unweighted."""
    # Multiplying by the mask keeps padding/prompt weights at 0 whatever the caller stored there;
    # for 0/1 masks mask*mask == mask exactly, which is what makes uniform TI-DPO equal DPO bit-for-bit.
    mask = _mask(side)
    if uniform or side.weights is None:
        return mask
    return side.weights.to(mask.dtype) * mask


def logratio_sum(side: SideTensors) -> Tensor:
    """Unweighted sum_t rho_t over the response ``[B]``."""
    return logratios(side).sum(-1)


def weighted_logratio_sum(side: SideTensors, uniform: bool) -> Tensor:
    """sum_t w_t rho_t over the response ``[B]``; ``uniform`` (or no weights) uses w = 1."""
    return (response_weights(side, uniform) * logratios(side)).sum(-1)


def summed_logps(side: SideTensors) -> Tensor:
    """Policy log-probability of the response, sum over response tokens ``[B]``."""
    return (side.policy_logps * _mask(side)).sum(-1)


def mean_logps(side: SideTensors) -> Tensor:
    """Length-normalised policy log-probability (SimPO's reward before scaling) ``[B]``."""
    return summed_logps(side) / _mask(side).sum(-1).clamp_min(1.0)
