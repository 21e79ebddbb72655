"""Tests for tidpo_core.method.losses: hand-computed values, an independent reimplementation, identities."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tidpo_core.method.kl import sequence_kl, token_kl
from tidpo_core.method.logps import token_logps
from tidpo_core.method.losses import (
    ABLATIONS,
    LossConfig,
    ablation_config,
    compute_loss,
    dpo_loss,
    ipo_loss,
    simpo_loss,
    weighted_dpo_loss,
)
from tidpo_core.method.sides import SideTensors, weighted_logratio_sum
from tidpo_core.method.triplet import sequence_distance, triplet_loss


def softplus_neg(u: float) -> float:
    """-log sigmoid(u), written out by hand."""
    return math.log(1.0 + math.exp(-u))


def t(*rows: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=dtype)


# --------------------------------------------------------------------------- tiny hand-computed pair
# T = 4: position 0 is the prompt, positions 1-2 the response, position 3 right padding. The prompt and
# padding entries hold junk values to show that they are never scored.
MASK = [0.0, 1.0, 1.0, 0.0]


def hand_chosen(**kw: torch.Tensor) -> SideTensors:
    return SideTensors(
        policy_logps=t([0.0, -1.0, -2.0, -9.0]),
        reference_logps=t([0.0, -1.5, -1.8, -4.0]),
        response_mask=t(MASK),
        weights=t([0.0, 1.5, 0.5, 0.0]),
        **kw,
    )


def hand_rejected(**kw: torch.Tensor) -> SideTensors:
    return SideTensors(
        policy_logps=t([0.0, -2.0, -3.0, -7.0]),
        reference_logps=t([0.0, -1.0, -2.5, -1.0]),
        response_mask=t(MASK),
        weights=t([0.0, 0.8, 1.2, 0.0]),
        **kw,
    )


def hand_anchor() -> SideTensors:
    # rho = [0.2, 0.4] on the response, unit weights -> r(a) = 0.3
    return SideTensors(
        policy_logps=t([0.0, -0.8, -0.6, -3.0]),
        reference_logps=t([0.0, -1.0, -1.0, -3.3]),
        response_mask=t(MASK),
        weights=t([0.0, 1.0, 1.0, 0.0]),
    )


# rho(y_w) = [-1.0 + 1.5, -2.0 + 1.8] = [0.5, -0.2]; rho(y_l) = [-2.0 + 1.0, -3.0 + 2.5] = [-1.0, -0.5]
RHO_W_SUM = 0.5 + -0.2
RHO_L_SUM = -1.0 + -0.5
WRHO_W_SUM = 1.5 * 0.5 + 0.5 * -0.2  # 0.65
WRHO_L_SUM = 0.8 * -1.0 + 1.2 * -0.5  # -1.4


def test_dpo_by_hand() -> None:
    expected = softplus_neg(0.1 * (RHO_W_SUM - RHO_L_SUM))  # -log sigmoid(0.18)
    assert dpo_loss(hand_chosen(), hand_rejected(), beta=0.1).item() == pytest.approx(expected, abs=1e-12)


def test_ipo_by_hand() -> None:
    expected = (RHO_W_SUM - RHO_L_SUM - 1.0 / (2 * 0.1)) ** 2  # (1.8 - 5)^2 = 10.24
    assert expected == pytest.approx(10.24)
    assert ipo_loss(hand_chosen(), hand_rejected(), beta=0.1).item() == pytest.approx(expected, abs=1e-12)


def test_simpo_by_hand() -> None:
    mean_w = (-1.0 + -2.0) / 2
    mean_l = (-2.0 + -3.0) / 2
    expected = softplus_neg(2.0 * (mean_w - mean_l) - 0.5)  # -log sigmoid(1.5)
    got = simpo_loss(hand_chosen(), hand_rejected(), beta_s=2.0, gamma_s=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_simpo_ignores_reference() -> None:
    chosen = replace(hand_chosen(), reference_logps=None)
    rejected = replace(hand_rejected(), reference_logps=None)
    loss, _ = compute_loss(LossConfig(loss_type="simpo"), chosen, rejected)
    assert torch.isfinite(loss)


def test_weighted_logratio_sum_by_hand() -> None:
    assert weighted_logratio_sum(hand_chosen(), uniform=False).item() == pytest.approx(WRHO_W_SUM)
    assert weighted_logratio_sum(hand_chosen(), uniform=True).item() == pytest.approx(RHO_W_SUM)


def test_weighted_dpo_alpha0_by_hand() -> None:
    expected = softplus_neg(0.1 * WRHO_W_SUM - 0.1 * WRHO_L_SUM)  # -log sigmoid(0.205)
    got = weighted_dpo_loss(hand_chosen(), hand_rejected(), beta=0.1, alpha=0.0, uniform=False)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_weighted_dpo_alpha_positive_by_hand() -> None:
    chosen = hand_chosen(seq_kl=t(0.4))
    rejected = hand_rejected(seq_kl=t(1.0))
    delta = 0.5 * (1.0 - 0.4)
    # The KL difference sits inside beta (docs/method.md section 2): -log sigmoid(0.1 * (2.05 - 0.3)) = -log sigmoid(0.175)
    expected = softplus_neg(0.1 * (WRHO_W_SUM - WRHO_L_SUM - delta))
    assert expected == pytest.approx(softplus_neg(0.175), abs=1e-12)
    got = weighted_dpo_loss(chosen, rejected, beta=0.1, alpha=0.5, uniform=False)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # The form used before 2026-12 (delta outside beta) is this one with alpha / beta: alpha 5 at beta 0.1.
    old_form = softplus_neg(0.1 * WRHO_W_SUM - 0.1 * WRHO_L_SUM - delta)
    assert weighted_dpo_loss(chosen, rejected, beta=0.1, alpha=5.0, uniform=False).item() == pytest.approx(
        old_form, abs=1e-12
    )


def test_triplet_sequence_by_hand() -> None:
    """Eq. 13 on the hand pair: rho(a) = [0.2, 0.4], rho(w) = [0.5, -0.2], rho(l) = [-1.0, -0.5], unweighted."""
    d_aw = (0.2 - 0.5) ** 2 + (0.4 + 0.2) ** 2  # 0.45
    d_al = (0.2 + 1.0) ** 2 + (0.4 + 0.5) ** 2  # 2.25
    assert (
        triplet_loss(hand_anchor(), hand_chosen(), hand_rejected(), 0.01, "sequence", uniform=False).item()
        == 0.0
    )
    swapped = triplet_loss(hand_anchor(), hand_rejected(), hand_chosen(), 0.01, "sequence", uniform=False)
    assert swapped.item() == pytest.approx(d_al - d_aw + 0.01, abs=1e-12)  # 1.81
    # The weights do not enter Eq. 13.
    assert (
        triplet_loss(hand_anchor(), hand_rejected(), hand_chosen(), 0.01, "sequence", uniform=True).item()
        == swapped.item()
    )


def _side(policy: list[float], reference: list[float], mask: list[float]) -> SideTensors:
    return SideTensors(
        policy_logps=t(policy), reference_logps=t(reference), response_mask=t(mask), weights=t(mask)
    )


def test_triplet_sequence_unequal_lengths_by_hand() -> None:
    """Responses of 3 (anchor), 2 (chosen) and 4 (rejected) tokens starting at different columns: position t
    of one is paired with position t of the other, and the longer one's tail is ignored."""
    # rho(a) = [0.1, -0.2, 0.3] from column 1; rho(w) = [0.4, 0.0] from column 3; rho(l) = [-0.5, 0.2, 0.1, 9.0]
    # from column 2 (the 9.0 has no anchor token to pair with, so it must not count).
    anchor = _side([0, 0.1, -0.2, 0.3, 7, 7], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0])
    chosen = _side([5, 5, 5, -0.6, -1.0, 3], [0, 0, 0, -1.0, -1.0, 0], [0, 0, 0, 1, 1, 0])
    rejected = _side([5, 5, -0.5, 0.2, 0.1, 9.0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1])
    d_aw = (0.1 - 0.4) ** 2 + (-0.2 - 0.0) ** 2  # 0.13 over the 2 shared positions
    d_al = (0.1 + 0.5) ** 2 + (-0.2 - 0.2) ** 2 + (0.3 - 0.1) ** 2  # 0.56 over 3
    assert sequence_distance(anchor, chosen).item() == pytest.approx(d_aw, abs=1e-12)
    assert sequence_distance(anchor, rejected).item() == pytest.approx(d_al, abs=1e-12)
    assert sequence_distance(chosen, anchor).item() == pytest.approx(d_aw, abs=1e-12)  # symmetric
    assert triplet_loss(anchor, chosen, rejected, 0.01, "sequence", uniform=False).item() == 0.0
    swapped = triplet_loss(anchor, rejected, chosen, 0.5, "sequence", uniform=False)
    assert swapped.item() == pytest.approx(d_al - d_aw + 0.5, abs=1e-12)
    # Gradient by hand of d(a, l) - d(a, w) (the swapped hinge is active): d/d rho_t(a) is 2 (rho_t(w) - rho_t(l))
    # where both are paired (t < 2) and 2 (rho_t(a) - rho_t(l)) where only the 4-token side reaches (t = 2).
    policy = anchor.policy_logps.clone().requires_grad_(True)
    triplet_loss(
        replace(anchor, policy_logps=policy), rejected, chosen, 0.5, "sequence", uniform=False
    ).backward()
    expected = [0.0, 2 * (0.4 + 0.5), 2 * (0.0 - 0.2), 2 * (0.3 - 0.1), 0.0, 0.0]
    torch.testing.assert_close(policy.grad, t(expected), atol=1e-12, rtol=0)


def test_triplet_logratio_inactive_by_hand() -> None:
    r_a, r_w, r_l = 0.3, WRHO_W_SUM / 2.0, WRHO_L_SUM / 2.0  # weight totals are 2.0 on both sides
    raw = (r_a - r_w) ** 2 - (r_a - r_l) ** 2 + 0.01
    assert raw < 0
    got = triplet_loss(hand_anchor(), hand_chosen(), hand_rejected(), 0.01, "weighted_mean", uniform=False)
    assert got.item() == 0.0


def test_triplet_logratio_active_by_hand() -> None:
    # Swapping chosen and rejected puts the anchor nearer the negative: the hinge is active.
    r_a, r_w, r_l = 0.3, WRHO_L_SUM / 2.0, WRHO_W_SUM / 2.0
    expected = (r_a - r_w) ** 2 - (r_a - r_l) ** 2 + 0.01  # 1.0 - 0.000625 + 0.01
    assert expected == pytest.approx(1.009375)
    got = triplet_loss(hand_anchor(), hand_rejected(), hand_chosen(), 0.01, "weighted_mean", uniform=False)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_triplet_logratio_uniform_by_hand() -> None:
    r_a, r_w, r_l = 0.3, RHO_L_SUM / 2.0, RHO_W_SUM / 2.0
    expected = max(0.0, (r_a - r_w) ** 2 - (r_a - r_l) ** 2 + 0.01)
    got = triplet_loss(hand_anchor(), hand_rejected(), hand_chosen(), 0.01, "weighted_mean", uniform=True)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_triplet_hidden_by_hand() -> None:
    a = replace(hand_anchor(), hidden=t([1.0, 0.0]))
    w = replace(hand_chosen(), hidden=t([0.0, 1.0]))
    l_ = replace(hand_rejected(), hidden=t([1.0, 1.0]))
    # d(a, w) = 1 + 1 = 2, d(a, l) = 0 + 1 = 1: active, 2 - 1 + 0.01
    assert triplet_loss(a, w, l_, 0.01, "hidden", uniform=False).item() == pytest.approx(1.01)
    # swapped: 1 - 2 + 0.01 < 0: inactive
    assert triplet_loss(a, l_, w, 0.01, "hidden", uniform=False).item() == 0.0


def test_total_tidpo_by_hand() -> None:
    """B = 2: example 0 is the hand pair, example 1 the swapped pair (active hinge)."""
    pairs = [(hand_chosen(), hand_rejected()), (hand_rejected(), hand_chosen())]
    kls = [(0.4, 1.0), (0.3, 0.1)]

    def stack(sides: list[SideTensors], kl: list[float]) -> SideTensors:
        return SideTensors(
            policy_logps=torch.cat([s.policy_logps for s in sides]),
            reference_logps=torch.cat([s.reference_logps for s in sides]),  # type: ignore[misc]
            response_mask=torch.cat([s.response_mask for s in sides]),
            weights=torch.cat([s.weights for s in sides]),  # type: ignore[misc]
            seq_kl=torch.tensor(kl, dtype=torch.float64),
        )

    chosen = stack([p[0] for p in pairs], [k[0] for k in kls])
    rejected = stack([p[1] for p in pairs], [k[1] for k in kls])
    anchor = stack([hand_anchor(), hand_anchor()], [0.0, 0.0])
    cfg = LossConfig()  # beta 0.1, alpha 0.5, gamma 0.1, margin 0.01

    dpo0 = softplus_neg(0.1 * (WRHO_W_SUM - WRHO_L_SUM - 0.5 * (1.0 - 0.4)))
    dpo1 = softplus_neg(0.1 * (WRHO_L_SUM - WRHO_W_SUM - 0.5 * (0.1 - 0.3)))
    trip0 = 0.0  # Eq. 13: d(a, w) = 0.45 < d(a, l) = 2.25
    trip1 = 2.25 - 0.45 + 0.01
    expected = ((dpo0 + 0.1 * trip0) + (dpo1 + 0.1 * trip1)) / 2

    loss, stats = compute_loss(cfg, chosen, rejected, anchor)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["triplet"].item() == pytest.approx((trip0 + trip1) / 2)
    assert stats["loss/dpo_term"].item() == pytest.approx((dpo0 + dpo1) / 2)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1 * (WRHO_W_SUM + WRHO_L_SUM) / 2)
    assert stats["rewards/accuracies"].item() == pytest.approx(0.5)
    assert stats["rewards/margins"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["logps/chosen"].item() == pytest.approx(((-1.0 - 2.0) + (-2.0 - 3.0)) / 2)
    assert stats["seq_kl/chosen"].item() == pytest.approx(0.35)
    assert stats["seq_kl/rejected"].item() == pytest.approx(0.55)


# --------------------------------------------------------------------------- random batches
B, T, V = 4, 7, 11


def random_batch(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, SideTensors]:
    """Right-padded batch with varied prompt and response lengths (response never at position 0)."""
    g = torch.Generator().manual_seed(seed)
    sides: dict[str, SideTensors] = {}
    for name in ("chosen", "rejected", "anchor"):
        mask = torch.zeros(B, T, dtype=dtype)
        for b in range(B):
            start = int(torch.randint(1, 3, (1,), generator=g))
            length = int(torch.randint(1, T - start + 1, (1,), generator=g))
            mask[b, start : start + length] = 1.0
        weights = torch.rand(B, T, generator=g, dtype=dtype) * 2 * mask
        sides[name] = SideTensors(
            policy_logps=-torch.rand(B, T, generator=g, dtype=dtype) * 3,
            reference_logps=-torch.rand(B, T, generator=g, dtype=dtype) * 3,
            response_mask=mask,
            weights=weights,
            seq_kl=torch.rand(B, generator=g, dtype=dtype),
            hidden=torch.randn(B, 5, generator=g, dtype=dtype),
        )
    return sides


def np_side(side: SideTensors) -> dict[str, np.ndarray]:
    return {
        k: getattr(side, k).detach().numpy()
        for k in ("policy_logps", "reference_logps", "response_mask", "weights", "seq_kl", "hidden")
    }


def ref_example_terms(
    side: dict[str, np.ndarray], b: int, uniform: bool
) -> tuple[float, float, float, float]:
    """(sum rho, sum w rho, sum w, sum logp) over the response of example b, in plain Python loops."""
    s_rho = s_wrho = s_w = s_logp = 0.0
    for i in range(side["policy_logps"].shape[1]):
        if side["response_mask"][b, i] == 0:
            continue
        rho = float(side["policy_logps"][b, i]) - float(side["reference_logps"][b, i])
        w = 1.0 if uniform else float(side["weights"][b, i])
        s_rho += rho
        s_wrho += w * rho
        s_w += w
        s_logp += float(side["policy_logps"][b, i])
    return s_rho, s_wrho, s_w, s_logp


def ref_response_logratios(side: dict[str, np.ndarray], b: int) -> list[float]:
    return [
        float(side["policy_logps"][b, i]) - float(side["reference_logps"][b, i])
        for i in range(side["policy_logps"].shape[1])
        if side["response_mask"][b, i] != 0
    ]


def ref_eq13(first: dict[str, np.ndarray], second: dict[str, np.ndarray], b: int) -> float:
    """Paper Eq. 13 written from docs/method.md alone: the two log-ratio sequences from their response starts,
    zipped (zip stops at the shorter one), squared differences summed, no weights."""
    return sum(
        (x - y) ** 2
        for x, y in zip(ref_response_logratios(first, b), ref_response_logratios(second, b), strict=False)
    )


def ref_losses(cfg: LossConfig, sides: dict[str, SideTensors]) -> list[float]:
    """Independent per-example reimplementation of every loss type."""
    c, r, a = (np_side(sides[k]) for k in ("chosen", "rejected", "anchor"))
    out = []
    for b in range(B):
        rw, wrw, sw_w, lw = ref_example_terms(c, b, cfg.uniform_weights)
        rl, wrl, sw_l, ll = ref_example_terms(r, b, cfg.uniform_weights)
        if cfg.loss_type == "dpo":
            out.append(softplus_neg(cfg.beta * (rw - rl)))
        elif cfg.loss_type == "ipo":
            out.append((rw - rl - 1 / (2 * cfg.beta)) ** 2)
        elif cfg.loss_type == "simpo":
            n_w, n_l = c["response_mask"][b].sum(), r["response_mask"][b].sum()
            out.append(softplus_neg(cfg.simpo_beta * (lw / n_w - ll / n_l) - cfg.simpo_gamma))
        else:
            delta = cfg.alpha * (float(r["seq_kl"][b]) - float(c["seq_kl"][b]))
            term = softplus_neg(cfg.beta * (wrw - wrl - delta))
            if cfg.triplet_space == "sequence":
                d_aw, d_al = ref_eq13(a, c, b), ref_eq13(a, r, b)
            elif cfg.triplet_space == "hidden":
                d_aw = sum((x - y) ** 2 for x, y in zip(a["hidden"][b], c["hidden"][b], strict=True))
                d_al = sum((x - y) ** 2 for x, y in zip(a["hidden"][b], r["hidden"][b], strict=True))
            else:
                _, wra, sw_a, _ = ref_example_terms(a, b, cfg.uniform_weights)
                d_aw = (wra / sw_a - wrw / sw_w) ** 2
                d_al = (wra / sw_a - wrl / sw_l) ** 2
            out.append(term + cfg.gamma * max(0.0, d_aw - d_al + cfg.triplet_margin))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(loss_type="dpo"),
        LossConfig(loss_type="ipo", beta=0.5),
        LossConfig(loss_type="simpo"),
        LossConfig(),
        LossConfig(alpha=0.0),
        LossConfig(gamma=2.0, triplet_margin=1.5),
        LossConfig(uniform_weights=True, gamma=1.0, triplet_margin=0.5),
        LossConfig(triplet_space="weighted_mean", gamma=1.0, triplet_margin=0.5),
        LossConfig(triplet_space="hidden", gamma=0.3, triplet_margin=2.0),
    ],
    ids=lambda c: f"{c.loss_type}-a{c.alpha}-g{c.gamma}-u{c.uniform_weights}-{c.triplet_space}",
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_loss_matches_independent_reimplementation(cfg: LossConfig, seed: int) -> None:
    sides = random_batch(seed)
    loss, _ = compute_loss(cfg, sides["chosen"], sides["rejected"], sides["anchor"])
    expected = ref_losses(cfg, sides)
    assert loss.item() == pytest.approx(sum(expected) / B, rel=1e-10, abs=1e-12)


def ref_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            out[b, i] = logp[b, i - 1, ids[b, i]]
    return out


def test_token_logps_matches_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    got = token_logps(logits, ids)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert torch.all(got[:, 0] == 0)
    torch.testing.assert_close(got.double(), ref_token_logps(logits, ids), atol=1e-5, rtol=1e-5)


def test_token_logps_upcasts_half_precision() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=g)
    got = token_logps(logits, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_token_logps(logits.float(), ids), atol=1e-5, rtol=1e-5)


def test_token_kl_matches_kl_div() -> None:
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(B, T, V, generator=g) * 2
    pol = torch.randn(B, T, V, generator=g) * 2
    got = token_kl(ref, pol)
    expected = F.kl_div(
        torch.log_softmax(pol.double(), -1),
        torch.log_softmax(ref.double(), -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    expected = torch.cat([torch.zeros(B, 1, dtype=torch.float64), expected[:, :-1]], dim=1)
    assert got.shape == (B, T)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(got >= 0)
    assert torch.all(got[:, 0] == 0)


def test_token_kl_zero_for_equal_logits() -> None:
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(3))
    assert torch.all(token_kl(logits, logits.clone()) == 0)


def test_sequence_kl_sums_response_positions() -> None:
    kl = torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 8.0, 16.0, 32.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(sequence_kl(kl, mask), torch.tensor([3.0, 48.0]))


# --------------------------------------------------------------------------- identities and ablations


def test_uniform_tidpo_equals_dpo_exactly() -> None:
    sides = random_batch(4, dtype=torch.float32)
    dpo, dpo_stats = compute_loss(LossConfig(loss_type="dpo"), sides["chosen"], sides["rejected"])
    uni_cfg = LossConfig(uniform_weights=True, gamma=0.0, alpha=0.0)
    uni, uni_stats = compute_loss(uni_cfg, sides["chosen"], sides["rejected"])
    assert torch.equal(dpo, uni)
    for key in dpo_stats:
        assert torch.equal(dpo_stats[key], uni_stats[key]), key
    # the uniform_weights ablation from the paper's defaults is the same thing
    abl, _ = compute_loss(
        ablation_config(LossConfig(), "uniform_weights"), sides["chosen"], sides["rejected"]
    )
    assert torch.equal(dpo, abl)
    # unit weights on the response (non-uniform mode) also give DPO bit for bit
    ones = {k: replace(s, weights=s.response_mask.clone()) for k, s in sides.items()}
    unit, _ = compute_loss(LossConfig(gamma=0.0, alpha=0.0), ones["chosen"], ones["rejected"])
    assert torch.equal(dpo, unit)
    per_example = weighted_dpo_loss(sides["chosen"], sides["rejected"], 0.1, 0.0, uniform=True)
    assert (per_example - dpo_loss(sides["chosen"], sides["rejected"], 0.1)).abs().max().item() <= 1e-7


def test_uniform_tidpo_with_alpha_is_tdpo2() -> None:
    sides = random_batch(5)
    c, r = sides["chosen"], sides["rejected"]
    cfg = LossConfig(uniform_weights=True, gamma=0.0, alpha=0.7, beta=0.2)
    loss, _ = compute_loss(cfg, c, r)
    # TDPO2 as written: -log sigmoid(beta (sum rho_w - sum rho_l - alpha (SeqKL_l - SeqKL_w)))
    rho_w = ((c.policy_logps - c.reference_logps) * c.response_mask).sum(-1)  # type: ignore[operator]
    rho_l = ((r.policy_logps - r.reference_logps) * r.response_mask).sum(-1)  # type: ignore[operator]
    u = 0.2 * ((rho_w - rho_l) - 0.7 * (r.seq_kl - c.seq_kl))  # type: ignore[operator]
    expected = torch.log1p(torch.exp(-u)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_no_triplet_ablation_changes_only_triplet_term() -> None:
    sides = random_batch(6)
    base = LossConfig(gamma=5.0, triplet_margin=3.0)  # large enough that the hinge is active
    args = (sides["chosen"], sides["rejected"], sides["anchor"])
    full, full_stats = compute_loss(base, *args)
    assert full_stats["triplet"].item() > 0
    assert full.item() == pytest.approx(
        full_stats["loss/dpo_term"].item() + 5.0 * full_stats["triplet"].item()
    )
    ablated, stats = compute_loss(ablation_config(base, "no_triplet"), *args)
    assert stats["triplet"].item() == 0.0
    assert torch.equal(ablated.float(), stats["loss/dpo_term"])
    assert stats["loss/dpo_term"].item() == full_stats["loss/dpo_term"].item()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert torch.equal(stats[key], full_stats[key])
    # without a triplet the anchor is optional
    compute_loss(ablation_config(base, "no_triplet"), sides["chosen"], sides["rejected"])


def test_uniform_weights_changes_rewards_unless_weights_are_ones() -> None:
    sides = random_batch(7)
    cfg = LossConfig(gamma=0.0, alpha=0.0)
    _, weighted = compute_loss(cfg, sides["chosen"], sides["rejected"])
    _, uniform = compute_loss(replace(cfg, uniform_weights=True), sides["chosen"], sides["rejected"])
    assert not torch.equal(weighted["rewards/chosen"], uniform["rewards/chosen"])
    assert torch.equal(weighted["logps/chosen"], uniform["logps/chosen"])

    ones = {k: replace(s, weights=s.response_mask.clone()) for k, s in sides.items()}
    _, w1 = compute_loss(cfg, ones["chosen"], ones["rejected"])
    _, u1 = compute_loss(replace(cfg, uniform_weights=True), ones["chosen"], ones["rejected"])
    for key in w1:
        assert torch.equal(w1[key], u1[key]), key


def test_alpha_changes_only_dpo_term() -> None:
    sides = random_batch(8)
    args = (sides["chosen"], sides["rejected"], sides["anchor"])
    _, with_kl = compute_loss(LossConfig(alpha=0.5), *args)
    _, no_kl = compute_loss(LossConfig(alpha=0.0), *args)
    assert with_kl["loss/dpo_term"].item() != no_kl["loss/dpo_term"].item()
    for key in ("triplet", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert torch.equal(with_kl[key], no_kl[key]), key


def test_ablation_config() -> None:
    base = LossConfig()
    assert ablation_config(base, "none") == base
    assert ablation_config(base, "no_gradient_attribution") == base
    assert ablation_config(base, "no_gaussian_prior") == base
    assert ablation_config(base, "no_triplet") == replace(base, gamma=0.0)
    uni = ablation_config(base, "uniform_weights")
    assert (uni.uniform_weights, uni.gamma, uni.alpha, uni.beta) == (True, 0.0, 0.0, base.beta)
    assert set(ABLATIONS) == {
        "none",
        "no_gradient_attribution",
        "no_gaussian_prior",
        "no_triplet",
        "uniform_weights",
    }
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_config(base, "no_such_thing")


# --------------------------------------------------------------------------- gradients


def test_gradcheck_weighted_dpo() -> None:
    sides = random_batch(9)
    c, r = sides["chosen"], sides["rejected"]
    pw = c.policy_logps.clone().requires_grad_(True)
    pl = r.policy_logps.clone().requires_grad_(True)
    kl_l = r.seq_kl.clone().requires_grad_(True)  # type: ignore[union-attr]

    def f(pw: torch.Tensor, pl: torch.Tensor, kl_l: torch.Tensor) -> torch.Tensor:
        return weighted_dpo_loss(
            replace(c, policy_logps=pw), replace(r, policy_logps=pl, seq_kl=kl_l), 0.1, 0.5, uniform=False
        )

    assert torch.autograd.gradcheck(f, (pw, pl, kl_l))


def test_seq_kl_stop_gradient() -> None:
    sides = random_batch(10)
    kl_w = sides["chosen"].seq_kl.clone().requires_grad_(True)  # type: ignore[union-attr]
    kl_l = sides["rejected"].seq_kl.clone().requires_grad_(True)  # type: ignore[union-attr]
    chosen = replace(sides["chosen"], seq_kl=kl_w)
    rejected = replace(sides["rejected"], seq_kl=kl_l)
    loss, _ = compute_loss(LossConfig(gamma=0.0), chosen, rejected)
    loss.backward()
    assert kl_w.grad is None or torch.all(kl_w.grad == 0)
    assert kl_l.grad is not None and torch.all(kl_l.grad > 0)  # raising SeqKL_l lowers u, raising the loss


def test_token_kl_gradient_flows_to_policy_only_through_logits() -> None:
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    pol = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: token_kl(ref, p), (pol,))


# --------------------------------------------------------------------------- stats


def test_stats_keys_and_accuracy() -> None:
    sides = random_batch(12)
    # make the chosen side clearly better than the rejected one on every example
    chosen = replace(
        sides["chosen"], policy_logps=sides["chosen"].reference_logps + 1.0 * sides["chosen"].response_mask
    )  # type: ignore[operator]
    rejected = replace(
        sides["rejected"],
        policy_logps=sides["rejected"].reference_logps - 1.0 * sides["rejected"].response_mask,
    )  # type: ignore[operator]
    base = {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    tidpo = base | {"triplet", "seq_kl/chosen", "seq_kl/rejected", "loss/dpo_term"}
    for cfg, keys in [
        (LossConfig(loss_type="dpo"), base),
        (LossConfig(loss_type="ipo"), base),
        (LossConfig(), tidpo),
    ]:
        loss, stats = compute_loss(cfg, chosen, rejected, sides["anchor"])
        assert set(stats) == keys
        assert stats["rewards/accuracies"].item() == 1.0
        assert stats["rewards/margins"].item() > 0
        assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
        assert loss.dim() == 0
    # SimPO rewards come from policy logps alone
    better = replace(chosen, policy_logps=torch.full_like(chosen.policy_logps, -0.1))
    worse = replace(rejected, policy_logps=torch.full_like(rejected.policy_logps, -3.0))
    _, stats = compute_loss(LossConfig(loss_type="simpo"), better, worse)
    assert set(stats) == base and stats["rewards/accuracies"].item() == 1.0
    # seq_kl stats appear only when SeqKL was provided
    no_kl = {k: replace(s, seq_kl=None) for k, s in sides.items()}
    _, stats = compute_loss(LossConfig(alpha=0.0), no_kl["chosen"], no_kl["rejected"], no_kl["anchor"])
    assert set(stats) == base | {"triplet", "loss/dpo_term"}


def test_stats_are_detached_and_loss_backpropagates() -> None:
    sides = random_batch(13)
    pw = sides["chosen"].policy_logps.clone().requires_grad_(True)
    loss, stats = compute_loss(
        LossConfig(), replace(sides["chosen"], policy_logps=pw), sides["rejected"], sides["anchor"]
    )
    loss.backward()
    assert pw.grad is not None and torch.isfinite(pw.grad).all()
    # no gradient reaches prompt or padding positions
    assert torch.all(pw.grad[sides["chosen"].response_mask == 0] == 0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be > 0"),
        ({"alpha": -0.1}, "alpha must be >= 0"),
        ({"gamma": -0.1}, "gamma must be >= 0"),
        ({"triplet_margin": -0.01}, "triplet_margin must be >= 0"),
        ({"simpo_beta": 0.0}, "simpo_beta must be > 0"),
        ({"loss_type": "kto"}, "unknown loss_type"),
        ({"triplet_space": "cosine"}, "unknown triplet_space"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)  # type: ignore[arg-type]


def test_config_properties() -> None:
    assert LossConfig().needs_reference and LossConfig().needs_anchor and LossConfig().needs_kl
    assert not LossConfig(loss_type="simpo").needs_reference
    assert not LossConfig(gamma=0.0).needs_anchor
    assert not LossConfig(alpha=0.0).needs_kl
    for lt in ("dpo", "ipo", "simpo"):
        cfg = LossConfig(loss_type=lt)  # type: ignore[arg-type]
        assert not cfg.needs_anchor and not cfg.needs_kl


def test_missing_inputs_are_named() -> None:
    sides = random_batch(14)
    c, r, a = sides["chosen"], sides["rejected"], sides["anchor"]
    no_ref = replace(c, reference_logps=None)
    with pytest.raises(ValueError, match="chosen.reference_logps"):
        compute_loss(LossConfig(loss_type="dpo"), no_ref, r)
    with pytest.raises(ValueError, match="rejected.reference_logps"):
        compute_loss(LossConfig(loss_type="ipo"), c, replace(r, reference_logps=None))
    with pytest.raises(ValueError, match="anchor"):
        compute_loss(LossConfig(), c, r)
    with pytest.raises(ValueError, match="rejected.seq_kl"):
        compute_loss(LossConfig(), c, replace(r, seq_kl=None), a)
    with pytest.raises(ValueError, match="anchor.reference_logps"):
        compute_loss(LossConfig(), c, r, replace(a, reference_logps=None))
    with pytest.raises(ValueError, match="chosen.hidden"):
        compute_loss(LossConfig(triplet_space="hidden"), replace(c, hidden=None), r, a)
    with pytest.raises(ValueError, match="seq_kl"):
        weighted_dpo_loss(c, replace(r, seq_kl=None), 0.1, 0.5, uniform=False)


def test_side_tensors_shape_validation() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="response_mask"):
        SideTensors(policy_logps=x, response_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="seq_kl"):
        SideTensors(policy_logps=x, response_mask=x, seq_kl=torch.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        SideTensors(policy_logps=x, response_mask=x, hidden=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="policy_logps"):
        SideTensors(policy_logps=torch.zeros(2), response_mask=torch.zeros(2))


# --------------------------------------------------------------------------- cached reference top-k


def test_token_kl_topk_by_hand_one_cached_token_of_three() -> None:
    from tidpo_core.method.kl import reference_topk, token_kl_topk

    ref = torch.tensor(
        [[[0.0, 0.0, 0.0], [math.log(0.7), math.log(0.2), math.log(0.1)]]], dtype=torch.float64
    )
    pol = torch.tensor(
        [[[0.0, 0.0, 0.0], [math.log(0.5), math.log(0.3), math.log(0.2)]]], dtype=torch.float64
    )
    # Position 1 is predicted by the logits at position 0: shift the distributions one step right.
    ref_logits, pol_logits = ref.roll(-1, dims=1), pol.roll(-1, dims=1)
    ids, logp = reference_topk(ref_logits, 1)
    assert ids[0, 1].tolist() == [0] and logp[0, 1, 0].item() == pytest.approx(math.log(0.7))
    # Coarsened: reference (0.7 | 0.3), policy (0.5 | 0.5).
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    kl = token_kl_topk(ids, logp, pol_logits)
    assert kl[0, 0].item() == 0.0
    assert kl[0, 1].item() == pytest.approx(expected, abs=1e-12)


def test_token_kl_topk_over_the_whole_vocabulary_is_token_kl_values_and_gradients() -> None:
    from tidpo_core.method.kl import reference_topk, token_kl, token_kl_topk

    torch.manual_seed(0)
    ref = torch.randn(3, 7, 11)
    pol = torch.randn(3, 7, 11, requires_grad=True)
    ids, logp = reference_topk(ref, 11)
    cached = token_kl_topk(ids, logp, pol)
    full = token_kl(ref, pol)
    assert torch.allclose(cached, full, atol=1e-6)
    (g_cached,) = torch.autograd.grad(cached.sum(), pol)
    (g_full,) = torch.autograd.grad(full.sum(), pol)
    assert torch.allclose(g_cached, g_full, atol=1e-6)


def test_token_kl_topk_is_a_lower_bound_that_grows_with_k() -> None:
    from tidpo_core.method.kl import reference_topk, token_kl, token_kl_topk

    torch.manual_seed(1)
    ref, pol = torch.randn(4, 9, 16, dtype=torch.float64) * 2, torch.randn(4, 9, 16, dtype=torch.float64) * 2
    full = token_kl(ref, pol)
    previous = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 16):
        cached = token_kl_topk(*reference_topk(ref, k), pol)
        assert (cached >= 0).all() and (cached <= full + 1e-12).all()
        assert (cached >= previous - 1e-12).all()
        previous = cached
    assert torch.allclose(previous, full, atol=1e-12)


def test_token_kl_topk_rejects_mismatched_shapes() -> None:
    from tidpo_core.method.kl import token_kl_topk

    with pytest.raises(ValueError, match="top-k"):
        token_kl_topk(torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, 3), torch.zeros(2, 4, 10))
