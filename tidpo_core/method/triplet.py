"""The triplet term of TI-DPO (docs/method.md section 3): pull the policy's anchor response toward the
chosen one and away from the rejected one, in one of three spaces (:data:`TRIPLET_SPACES`)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from tidpo_core.method.sides import SideTensors, logratios, require_input, response_weights

TripletSpace = Literal["sequence", "weighted_mean", "hidden"]
TRIPLET_SPACES: tuple[str, ...] = get_args(TripletSpace)

# Guards divisions by a weight total; a real response has one >= 1.
_EPS = 1e-12


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


def sequence_distance(
    first: SideTensors, second: SideTensors, first_name: str = "first", second_name: str = "second"
) -> Tensor:
    """Paper Eq. 13: d(a, b) = sum_t (rho_t(a) - rho_t(b))^2 over the positions t both responses have,
    counted from the response start, unweighted ``[B]``."""
    rho_a, length_a = response_aligned(logratios(first, first_name), first.response_mask)
    rho_b, length_b = response_aligned(logratios(second, second_name), second.response_mask)
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
        return require_input(side.hidden, f"{name}.hidden (needed for triplet_space='hidden')")
    weights = response_weights(side, uniform)
    return (weights * logratios(side, name)).sum(-1) / weights.sum(-1).clamp_min(_EPS)


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
