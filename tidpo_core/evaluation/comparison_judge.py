"""The reward that judges a comparison's sampled answers: `reward_model_score` (their mean reward),
`judged_win_rate` (how often a run's answer out-scores the reference's answer to the same prompt) and
`judged_win_rate_length_controlled` (that win rate at equal answer lengths)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from tidpo_core.data.pairs import PreferencePair
from tidpo_core.evaluation.diversity import answer_tokens
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


def judged_answers(
    scorer: RewardFunction | None, samples: Any, stops: Collection[int]
) -> dict[str, list[Any]] | None:
    """The judge's reward of each sampled answer and its length in tokens without the `stops` tokens (None
    without a judge or samples): what a run keeps so that a later analysis can pair answers by prompt."""
    rewards = judge_rewards(scorer, samples)
    if rewards is None:
        return None
    return {"judge_rewards": rewards, "answer_lengths": [len(t) for t in answer_tokens(samples, stops)]}


def judged_metrics(answers: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> dict[str, float]:
    """reward_model_score (the mean reward), and against the baseline's answers to the same prompts
    judged_win_rate with its standard error and, where both kept their lengths,
    judged_win_rate_length_controlled."""
    rewards, baseline = answers["judge_rewards"], baseline or {}
    metrics = {"reward_model_score": float(np.mean(rewards))}
    reference = baseline.get("judge_rewards")
    if reference is None or len(reference) != len(rewards):
        return metrics
    metrics["judged_win_rate"], metrics["judged_win_rate_stderr"] = win_rate(rewards, reference)
    lengths, reference_lengths = answers.get("answer_lengths"), baseline.get("answer_lengths")
    if lengths is not None and reference_lengths is not None:
        metrics["judged_win_rate_length_controlled"] = length_controlled_win_rate(
            rewards, reference, lengths, reference_lengths
        )
    return metrics


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(win rate, its standard error): the share of prompts whose answer out-scores the baseline's answer to
    the same prompt, a tie counting half; the standard error is that of the mean of the per-prompt outcomes."""
    outcomes = outcomes_of(rewards, baseline)
    stderr = float(outcomes.std(ddof=1) / math.sqrt(len(outcomes))) if len(outcomes) > 1 else float("nan")
    return float(outcomes.mean()), stderr


def outcomes_of(rewards: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 where the answer out-scores the baseline's, 0.5 on a tie, else 0."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(
            f"one baseline reward per reward: {len(rewards)} rewards, {len(baseline)} baseline rewards"
        )
    return np.array(
        [1.0 if r > b else 0.5 if r == b else 0.0 for r, b in zip(rewards, baseline, strict=True)]
    )


def length_controlled_win_rate(
    rewards: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[int],
    baseline_lengths: Sequence[int],
) -> float:
    """The win rate over the baseline that the judge would give at equal answer lengths.

    AlpacaEval 2's length control (Dubois et al. 2024) for one model against one baseline: a logistic model
    P(win) = sigmoid(theta + phi * tanh(d / s)) of the per-prompt outcomes (a tie counts half), with d the
    answer's length minus the baseline's in tokens and s the standard deviation of d; the result is
    sigmoid(theta), the fitted win rate at d = 0. A judge that rewards length moves phi, not theta, so a
    method that wins only by answering longer (or shorter) drops towards 0.5.
    """
    outcomes = outcomes_of(rewards, baseline)
    if len(lengths) != len(outcomes) or len(baseline_lengths) != len(outcomes):
        raise ValueError(
            f"one length per answer: {len(outcomes)} answers, {len(lengths)} lengths, "
            f"{len(baseline_lengths)} baseline lengths"
        )
    difference = np.asarray(lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    spread = float(difference.std())
    if spread == 0.0:  # no length difference to control for
        return float(outcomes.mean())
    design = np.column_stack([np.ones_like(difference), np.tanh(difference / spread)])
    return float(_sigmoid(_logistic_fit(design, outcomes)[0]))


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x)))  # overflow-free logistic


def _logistic_fit(design: np.ndarray, outcomes: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood coefficients of a logistic regression with fractional outcomes (Newton's method,
    step-halving so that the log-likelihood never falls; on separable data the coefficients grow until the
    step is negligible, and the fitted rate tends to 0 or 1)."""

    def log_likelihood(beta: np.ndarray) -> float:
        z = design @ beta
        return float(np.sum(outcomes * z - np.logaddexp(0.0, z)))

    beta = np.zeros(design.shape[1])
    current = log_likelihood(beta)
    for _ in range(iterations):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (outcomes - p)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(design.shape[1])
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        improved = log_likelihood(beta + step)
        while scale > 1e-6 and improved < current:
            scale /= 2
            improved = log_likelihood(beta + scale * step)
        beta = beta + scale * step
        if abs(improved - current) < 1e-12:
            break
        current = improved
    return beta
