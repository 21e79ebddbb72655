"""Evaluating one quality run: train a method on a prepared corpus and score it on the held-out pairs.

The Evaluator scores the shared reference once and every policy against it (preference accuracy from the
implicit DPO reward, the likelihood preferences, the critical-phrase rate of sampled answers, KL to the
reference); estimator_weights adds the other importance estimators' weight tables beside the stored
attribution one, so a method can train on any of them. bench_quality and bench_hh share this code.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench import common, preparation, training_runs

METRICS = ("reward_accuracy", "reward_margin", "likelihood_win_rate", "normalized_likelihood_win_rate")
ESTIMATOR_WEIGHTS = {"surprisal": {"estimator": "surprisal"}, "contrastive": {"estimator": "contrastive"}}


def _phrase_rate(samples: list[str], pairs: list[Any]) -> dict[str, Any] | str:
    rate = common.optional("tidpo_core.evaluation.critical_tokens", "critical_phrase_rate")
    usable = [
        (s, p)
        for s, p in zip(samples, pairs, strict=True)
        if p.meta.get("chosen_phrase") and p.meta.get("rejected_phrase")
    ]
    if rate is None:
        return "pending"
    if not usable:
        return "n/a (no critical phrases in this data)"
    return rate(
        [s for s, _ in usable],
        [p.meta["chosen_phrase"] for _, p in usable],
        [p.meta["rejected_phrase"] for _, p in usable],
    )


class Evaluator:
    """Held-out metrics of a policy against the shared reference (reference scores computed once)."""

    def __init__(
        self, prepared: preparation.Prepared, sample_new_tokens: int, phrases: bool, beta: float = 0.1
    ):
        from tidpo_core.batching.features import EncodingSettings
        from tidpo_core.evaluation.preference import preference_metrics, score_pairs
        from tidpo_core.models.generation import SamplingSettings
        from tidpo_core.models.modeling import load_model_and_tokenizer

        self.prepared = prepared
        self.beta = beta
        self.phrases = phrases
        self.pairs = preparation.eval_pairs(prepared)
        self.settings = EncodingSettings(prepared.max_prompt_tokens, prepared.max_response_tokens)
        self.sampling = SamplingSettings(
            max_new_tokens=sample_new_tokens,
            seed=1234,
            batch_size=32,
            max_prompt_tokens=prepared.max_prompt_tokens,
        )
        reference, self.tokenizer = load_model_and_tokenizer(prepared.reference_path)
        self.reference_model = reference
        self._score, self._metrics = score_pairs, preference_metrics
        self.reference_scores = score_pairs(reference, self.tokenizer, self.pairs, self.settings, 32)
        self.reference = self.evaluate_model(reference, is_reference=True)

    def evaluate_model(self, model, is_reference: bool = False) -> dict[str, Any]:
        from tidpo_core.models.generation import sample_responses

        scores = (
            self.reference_scores
            if is_reference
            else self._score(model, self.tokenizer, self.pairs, self.settings, 32)
        )
        metrics = self._metrics(scores, self.reference_scores, self.beta)
        out: dict[str, Any] = {k: metrics[k] for k in METRICS}
        out["eval_pairs"] = len(self.pairs)
        if self.phrases:
            samples = sample_responses(model, self.tokenizer, [p.prompt for p in self.pairs], self.sampling)
            out["critical_phrase"] = _phrase_rate(samples, self.pairs)
        if not is_reference and self.sampling.max_new_tokens > 0:
            # KL(pi || ref) on pure samples of the policy (temperature 1, no top-k/top-p: unbiased).
            from dataclasses import replace

            from tidpo_core.evaluation.kl_estimate import kl_to_reference
            from tidpo_core.evaluation.sampled_responses import KL_SAMPLING

            kl_sampling = replace(
                KL_SAMPLING,
                max_new_tokens=self.sampling.max_new_tokens,
                seed=1234,
                max_prompt_tokens=self.prepared.max_prompt_tokens,
            )
            estimate, _ = kl_to_reference(
                model, self.reference_model, self.tokenizer, [p.prompt for p in self.pairs], kl_sampling
            )
            out["kl"], out["kl_stderr"] = estimate.kl, estimate.stderr
        return out

    def evaluate_path(self, path: str | Path) -> dict[str, Any]:
        from tidpo_core.models.modeling import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(path)
        return self.evaluate_model(model)


def train_and_evaluate(
    prepared: preparation.Prepared,
    evaluator: Evaluator,
    name: str,
    overrides: dict[str, Any],
    seed: int,
    work: Path,
    max_steps: int,
) -> dict[str, Any]:
    out = work / f"{name.split()[0]}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    loss_type = overrides["loss_type"]
    extra = {k: v for k, v in overrides.items() if k not in ("loss_type", "weights")}
    if "weights" in overrides:
        extra["weights_fingerprint"] = prepared.extra_weights[overrides["weights"]]
    config = training_runs.train_config(prepared, loss_type, out, seed=seed, max_steps=max_steps, **extra)
    run = training_runs.run_training(config)
    result = {
        "method": name,
        "seed": seed,
        "train_s": run.summary.seconds,
        "steps": run.summary.steps,
        "first_loss": run.summary.first_loss,
        "last_loss": run.summary.last_loss,
        "train_reward_accuracy_last": run.summary.history[-1].get("rewards/accuracies")
        if run.summary.history
        else None,
        **evaluator.evaluate_path(run.summary.final_model_path),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def phrase_value(run: dict[str, Any], key: str) -> float | None:
    phrase = run.get("critical_phrase")
    if not isinstance(phrase, dict):
        return None
    if key == "chosen_of_all":
        # Share of ALL samples that use the safe phrase: chosen_rate is over the samples that use either
        # phrase, which hides a policy whose answers stopped using either (collapsed generation).
        return phrase["chosen_rate"] * (1.0 - phrase["neither_rate"]) if phrase["neither_rate"] < 1.0 else 0.0
    return phrase.get(key)


def estimator_weights(
    prepared: preparation.Prepared, sizes: dict[str, Any], methods: dict[str, Any]
) -> dict[str, float]:
    """The other estimators' weight tables beside the stored attribution one; seconds each took."""
    from bench.bench_importance import contrastive_pair_paths

    seconds = {}
    for estimator in sorted({m["weights"] for m in methods.values() if "weights" in m}):
        started = time.perf_counter()
        kwargs = dict(ESTIMATOR_WEIGHTS[estimator])
        if estimator == "contrastive":
            kwargs["contrastive_positive_path"], kwargs["contrastive_negative_path"] = contrastive_pair_paths(
                prepared, sizes
            )
        prepared.extra_weights[estimator] = preparation.add_weights(prepared, **kwargs)
        seconds[estimator] = time.perf_counter() - started
    return seconds
