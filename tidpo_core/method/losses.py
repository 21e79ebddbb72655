"""Preference losses: DPO, IPO, SimPO and TI-DPO (arXiv 2505.19653), as specified in docs/method.md.

The per-token tensors follow tidpo_core.method.logps' conventions; one side of a pair is a
tidpo_core.method.sides.SideTensors, SeqKL comes from tidpo_core.method.kl and the triplet term from
tidpo_core.method.triplet.

Functions return per-example losses ``[B]``; :func:`compute_loss` reduces them to the batch mean and
reports TRL-named statistics so that dashboards built for TRL read our runs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from tidpo_core.method.sides import (
    SideTensors,
    logratio_sum,
    mean_logps,
    require_input,
    summed_logps,
    weighted_logratio_sum,
)
from tidpo_core.method.triplet import TRIPLET_SPACES, TripletSpace, triplet_loss

LossType = Literal["dpo", "ipo", "simpo", "tidpo"]

LOSS_TYPES: tuple[str, ...] = get_args(LossType)

# Ablations the paper reports plus "uniform_weights". The two weight ablations live in the token
# weights (importance.py, via the hybrid lambda), so the loss configuration is unchanged by them.
ABLATIONS: tuple[str, ...] = (
    "none",
    "no_gradient_attribution",
    "no_gaussian_prior",
    "no_triplet",
    "uniform_weights",
)


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
    kl_w = require_input(chosen.seq_kl, "chosen.seq_kl (needed when alpha > 0)")
    kl_l = require_input(rejected.seq_kl, "rejected.seq_kl (needed when alpha > 0)")
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
