"""The reward that judges a comparison's sampled answers: `reward_model_score` (their mean reward) and
`judged_win_rate` (how often a run's answer out-scores the reference's answer to the same prompt)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.grpo import RewardFunction, phrase_reward, reward_function
from tidpo_core.training import TrainConfig


def grpo_reward_setting(overrides: Mapping[str, Any]) -> tuple[str, str | None]:
    """(grpo_reward, grpo_reward_model) as the comparison's runs get them: the overrides, else TrainConfig's defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return str(overrides.get("grpo_reward", defaults["grpo_reward"])), overrides.get(
        "grpo_reward_model", defaults["grpo_reward_model"]
    )


def scoring_reward(
    overrides: Mapping[str, Any], eval_pairs: Sequence[PreferencePair]
) -> tuple[RewardFunction | None, str]:
    """The reward behind reward_model_score, and what it is: the reward model of grpo_reward: model, else
    the rule reward of the eval pairs' phrases (the built-in data), else none."""
    kind, path = grpo_reward_setting(overrides)
    if kind == "model":
        return reward_function(kind, path, eval_pairs), f"reward model {path}"
    try:
        return phrase_reward(eval_pairs), "rule reward of the built-in data (eval pairs' safe/risky phrases)"
    except ValueError:
        return None, ""


def judge_rewards(scorer: RewardFunction | None, samples: Any) -> list[float] | None:
    """The reward of each sampled answer (None without a reward or samples)."""
    if scorer is None or samples is None or not samples.texts:
        return None
    values = [float(v) for v in scorer(list(samples.prompts), list(samples.texts))]
    if len(values) != len(samples.texts):
        raise ValueError(f"the reward returned {len(values)} values for {len(samples.texts)} completions")
    return values


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(win rate, its standard error): the share of prompts whose answer out-scores the baseline's answer to
    the same prompt, a tie counting half; the standard error is that of the mean of the per-prompt outcomes."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(
            f"one baseline reward per reward: {len(rewards)} rewards, {len(baseline)} baseline rewards"
        )
    outcomes = np.array(
        [1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, baseline, strict=True)]
    )
    stderr = float(outcomes.std(ddof=1) / math.sqrt(len(outcomes))) if len(outcomes) > 1 else float("nan")
    return float(outcomes.mean()), stderr
