"""GRPO (Shao et al. 2024, DeepSeekMath) as TRL's GRPOTrainer computes it: group advantages, the clipped
importance-ratio objective with the optional k3 KL to the reference, and the rewards (docs/method.md section 8,
the baselines).

Plain functions over tensors and strings (no model, no TRL): the training itself runs in TRL's
GRPOTrainer (tidpo_core.training.grpo_loop), and these functions state what it computes; tests/test_grpo.py
checks them against hand computations, an independent loop and TRL's own loss on the same tensors.

For each prompt the policy samples a group of G completions; each gets a reward r_i and the advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)                      (within its group of G)

and every completion token t maximises the clipped importance-ratio objective, with an optional KL
penalty to the reference,

    l_{i,t} = -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - epsilon, 1 + epsilon) A_i) + beta KL_{i,t}
    rho_{i,t} = exp(log pi(y_t) - log pi_old(y_t)),   KL_{i,t} = exp(q) - q - 1,  q = log pi_ref(y_t) - log pi(y_t)

(the k3 estimator of KL(pi || pi_ref)); the loss is the mean over completions of each completion's
token mean (TRL's loss_type "grpo", the paper's 1/G sum_i 1/|o_i| sum_t).

A reward is any callable `(prompts, completions) -> rewards`, one float per (prompt, completion): the
rule reward of the built-in data (`phrase_reward`) or a trained reward model
(`tidpo_core.models.reward.load_reward_function(model_dir)`, loaded by `reward_function`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from tidpo_core.data.pairs import PreferencePair
from tidpo_core.data.synthetic import contains_phrase, critical_phrases

RewardFunction = Callable[[list[str], list[str]], list[float]]
"""`(prompts, completions) -> rewards`: one reward per (prompt, completion), the lists of equal length."""

GrpoReward = Literal["phrases", "model"]
GRPO_REWARDS: tuple[str, ...] = get_args(GrpoReward)

# TRL's GRPOTrainer divides by std + 1e-4 (a constant in its code, not an option).
ADVANTAGE_EPS = 1e-4


# --- advantages ---------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> Tensor:
    """A_i = (r_i - mean) / (std + eps) within each group of `group_size` consecutive rewards.

    `rewards` is [N] with N a multiple of the group size, the G completions of one prompt next to each
    other (TRL's layout). std is the **unbiased** sample standard deviation (Bessel's correction, divisor
    G - 1), as TRL's GRPOTrainer computes it (`nanstd`, which equals `torch.std` on rewards without NaN;
    scale_rewards "group", its default). A group whose rewards are all equal carries no signal and gets
    exactly zero advantage (TRL's arithmetic gives 0 / eps there, zero up to the rounding of the mean).
    TRL additionally treats NaN rewards (a completion no reward function scored) as absent; here every
    reward must be a number.
    """
    if group_size < 2:
        raise ValueError(
            f"a group needs at least 2 completions (the std of one is undefined), got {group_size}"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"expected [N] rewards with N a multiple of {group_size}, got shape {tuple(rewards.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    advantages = (grouped - mean) / (std + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages).view(-1)


# --- the clipped objective ----------------------------------------------------------------------------


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) at the sampled tokens: exp(q) - q - 1, q = log pi_ref - log pi
    (Schulman's estimator; non-negative, zero where the two agree; TRL's per_token_kl)."""
    q = ref_logps - logps
    return torch.exp(q) - q - 1


@dataclass(frozen=True)
class GrpoLoss:
    """The loss and the statistics TRL logs under the same names."""

    loss: Tensor
    """Scalar: mean over completions of each completion's token-mean loss (TRL's loss_type "grpo")."""
    per_token_loss: Tensor
    """[B, T] before masking."""
    kl: Tensor
    """Token mean of the k3 KL over the batch (NaN when beta is 0: TRL neither computes nor logs it then)."""
    clip_ratio_low: Tensor
    """Share of tokens clipped below (ratio < 1 - epsilon with A < 0): TRL's clip_ratio/low_mean."""
    clip_ratio_high: Tensor
    """Share clipped above (ratio > 1 + epsilon with A > 0): clip_ratio/high_mean."""
    clip_ratio_region: Tensor
    """Either: clip_ratio/region_mean."""

    def metrics(self) -> dict[str, float]:
        values = {
            "clip_ratio/low_mean": float(self.clip_ratio_low),
            "clip_ratio/high_mean": float(self.clip_ratio_high),
            "clip_ratio/region_mean": float(self.clip_ratio_region),
        }
        if not bool(torch.isnan(self.kl)):
            values["kl"] = float(self.kl)
        return values


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    *,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    epsilon_high: float | None = None,
) -> GrpoLoss:
    """The clipped importance-ratio objective per token, with the k3 KL to the reference when beta > 0.

    logps, old_logps, ref_logps, mask: [B, T] over completion tokens (log-probs of the sampled tokens under
    the policy being trained, under the policy that sampled them, under the reference; mask 1 on real
    completion tokens). advantages: [B], one per completion (or [B, T]). epsilon clips the ratio to
    [1 - epsilon, 1 + epsilon_high] (epsilon_high defaults to epsilon, TRL's DAPO-style option). With beta 0
    the reference is not used (TRL then loads none). With old_logps = logps.detach() (one optimisation pass
    per batch of samples, TRL's num_iterations 1) the ratio is 1 and only the advantage-weighted gradient of
    log pi remains.
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(
            f"logps, old_logps and mask must share one shape, got {logps.shape}, {old_logps.shape}, {mask.shape}"
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference's log-probs (ref_logps)")
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl_per_token = k3_kl(logps, ref_logps) if beta != 0.0 and ref_logps is not None else None
    if kl_per_token is not None:
        per_token = per_token + beta * kl_per_token
    lengths = mask.sum(-1).clamp(min=1.0)
    loss = ((per_token * mask).sum(-1) / lengths).mean()

    def token_mean(x: Tensor) -> Tensor:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    low = (ratio < 1 - epsilon) & (adv < 0)
    up = (ratio > 1 + high) & (adv > 0)
    with torch.no_grad():
        kl = token_mean(kl_per_token) if kl_per_token is not None else torch.tensor(float("nan"))
        return GrpoLoss(
            loss=loss,
            per_token_loss=per_token,
            kl=kl,
            clip_ratio_low=token_mean(low.to(logps.dtype)),
            clip_ratio_high=token_mean(up.to(logps.dtype)),
            clip_ratio_region=token_mean((low | up).to(logps.dtype)),
        )


# --- rewards ------------------------------------------------------------------------------------------


def phrase_score(completion: str, safe: Iterable[str], risky: Iterable[str]) -> float:
    """The rule reward of one completion: +1 if it contains a safe phrase, -1 if a risky one, 0 if neither
    (and 0 if both: the two cancel). Matching ignores case and runs of whitespace (as the evaluation's
    critical-phrase rate does)."""
    has_safe = any(contains_phrase(completion, phrase) for phrase in safe)
    has_risky = any(contains_phrase(completion, phrase) for phrase in risky)
    return float(has_safe) - float(has_risky)


class PhraseReward:
    """The rule reward of the built-in data: each prompt's safe phrases (the chosen answers' critical
    phrases) score +1, its risky ones (the rejected answers') -1.

    A prompt that several pairs share (the built-in questions repeat with other answers) has the phrases
    of all of them. A prompt the reward does not know is an error, not a silent 0.
    """

    def __init__(self, pairs: Iterable[PreferencePair]):
        self.safe: dict[str, set[str]] = {}
        self.risky: dict[str, set[str]] = {}
        for pair in pairs:
            phrases = critical_phrases(pair)
            if phrases is None:
                continue
            self.safe.setdefault(pair.prompt, set()).add(phrases[0])
            self.risky.setdefault(pair.prompt, set()).add(phrases[1])
        if not self.safe:
            raise ValueError(
                "grpo_reward: phrases needs pairs whose meta carries chosen_phrase/rejected_phrase (the built-in "
                "synthetic data); for other data use grpo_reward: model with a trained reward model (grpo_reward_model)"
            )
        self.__name__ = "phrases"  # TRL names the reward's metrics after it: rewards/phrases/mean

    @property
    def prompts(self) -> list[str]:
        return list(self.safe)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"one prompt per completion: {len(prompts)} prompts, {len(completions)} completions"
            )
        unknown = [p for p in prompts if p not in self.safe]
        if unknown:
            raise ValueError(
                f"the phrase reward knows no phrases for {len(unknown)} prompt(s), e.g. {unknown[0][:80]!r}"
            )
        return [
            phrase_score(c, self.safe[p], self.risky[p]) for p, c in zip(prompts, completions, strict=True)
        ]


def phrase_reward(pairs: Iterable[PreferencePair]) -> PhraseReward:
    """The rule reward over these pairs' prompts (see PhraseReward)."""
    return PhraseReward(pairs)


def reward_model_function(model_dir: str) -> RewardFunction:
    """The reward model in `model_dir` as a reward function (tidpo_core.models.reward, imported only when asked for)."""
    from tidpo_core.models.reward import load_reward_function

    return load_reward_function(model_dir)


def reward_function(kind: str, model_dir: str | None, pairs: Sequence[PreferencePair]) -> RewardFunction:
    """The reward GRPO trains on: `phrases` (the rule reward over `pairs`) or `model` (the reward model in
    `model_dir`)."""
    if kind == "phrases":
        return phrase_reward(pairs)
    if kind == "model":
        if not model_dir:
            raise ValueError("grpo_reward: model needs grpo_reward_model, the reward model's folder")
        return reward_model_function(model_dir)
    raise ValueError(f"unknown grpo_reward {kind!r}; expected one of {GRPO_REWARDS}")


def mean_reward(reward: RewardFunction, prompts: Sequence[str], completions: Sequence[str]) -> float:
    """The mean reward of the completions (completion i answers prompt i)."""
    if len(prompts) != len(completions):
        raise ValueError(f"one prompt per completion: {len(prompts)} prompts, {len(completions)} completions")
    if not completions:
        return float("nan")
    values = [float(v) for v in reward(list(prompts), list(completions))]
    if len(values) != len(completions):
        raise ValueError(f"the reward returned {len(values)} values for {len(completions)} completions")
    return sum(values) / len(values)
