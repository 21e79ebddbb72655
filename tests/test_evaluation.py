"""Every evaluation metric against a hand-made case with a known answer, then on a tiny model."""

import copy
import math

import numpy as np
import pytest
import torch

from tidpo_core.batching.features import EncodingSettings
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.evaluation import importance_estimators
from tidpo_core.evaluation.critical_tokens import (
    critical_phrase_rate,
    critical_token_precision,
    importance_precision_at_k,
    precision_table,
    span_responses,
    span_third,
)
from tidpo_core.evaluation.diversity import distinct_n
from tidpo_core.evaluation.evaluate import evaluate_model
from tidpo_core.evaluation.gate import gate_decision, not_worse_than_champion, promotion_decision
from tidpo_core.evaluation.importance_estimators import parse_importance_estimator
from tidpo_core.evaluation.kl_estimate import kl_from_logps, kl_to_reference
from tidpo_core.evaluation.preference import PairScores, preference_metrics
from tidpo_core.evaluation.sampled_responses import sample_with_tokens
from tidpo_core.evaluation.settings import ModelEvalSettings
from tidpo_core.evaluation.training_health import training_health
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

ENCODING = EncodingSettings(max_prompt_tokens=64, max_response_tokens=96)
FAST_SAMPLING = SamplingSettings(max_new_tokens=12, top_k=0, top_p=1.0, temperature=1.0, seed=3, batch_size=4)


@pytest.fixture(scope="module")
def pairs():
    return generate_synthetic_pairs(10, seed=7)


@pytest.fixture(scope="module")
def tiny(pairs):
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=400)
    config = TinyModelConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return build_tiny_model(tokenizer, config, seed=0), build_tiny_model(tokenizer, config, seed=1), tokenizer


# --- preference metrics and the gate ----------------------------------------------------------------------


def _scores(chosen, rejected, tokens=10):
    n = len(chosen)
    return PairScores(
        np.asarray(chosen, float), np.asarray(rejected, float), np.full(n, tokens), np.full(n, tokens)
    )


def test_a_policy_that_always_prefers_chosen_has_accuracy_one():
    reference = _scores([-10.0, -12.0, -9.0], [-10.0, -11.0, -9.5])
    policy = _scores([-8.0, -10.0, -7.0], [-13.0, -12.0, -11.5])
    metrics = preference_metrics(policy, reference, beta=0.1)
    assert metrics["reward_accuracy"] == 1.0
    assert metrics["likelihood_win_rate"] == 1.0
    # margins: 0.1 * ((2 - -3) , (2 - -1), (2 - -2)) = 0.5, 0.3, 0.4
    assert metrics["reward_margin"] == pytest.approx(0.4)
    against_itself = preference_metrics(reference, reference, beta=0.1)
    assert against_itself["reward_accuracy"] == 0.5 and against_itself["reward_margin"] == 0.0
    assert gate_decision(metrics, against_itself, "reward_accuracy", 0.1).passed
    assert not gate_decision(against_itself, metrics, "reward_accuracy", 0.0).passed
    # A tie is not an improvement: a policy equal to its reference never becomes champion.
    assert not gate_decision(against_itself, against_itself, "reward_accuracy", 0.0).passed
    assert not gate_decision(against_itself, against_itself, "reward_accuracy", 0.0, tiebreak=None).passed
    assert gate_decision(
        {**against_itself, "reward_accuracy": 0.51}, against_itself, "reward_accuracy", 0.0
    ).passed
    assert not gate_decision(
        {**against_itself, "reward_accuracy": float("nan")}, against_itself, "reward_accuracy", -1.0
    ).passed
    # On an exact tie the tie-break metric decides, strictly.
    tied_but_better = {**against_itself, "reward_margin": 0.2}
    assert gate_decision(tied_but_better, against_itself, "reward_accuracy", 0.0).passed
    assert (
        "tie-break reward_margin"
        in gate_decision(tied_but_better, against_itself, "reward_accuracy", 0.0).description
    )
    assert not gate_decision(tied_but_better, against_itself, "reward_accuracy", 0.0, tiebreak=None).passed
    assert not gate_decision(
        {**against_itself, "reward_margin": -0.2}, against_itself, "reward_accuracy", 0.0
    ).passed
    with pytest.raises(KeyError, match="nope"):
        gate_decision(metrics, against_itself, "reward_accuracy", 0.0, tiebreak="nope")


# --- importance precision@k ----------------------------------------------------------------------------


def test_precision_of_weights_concentrated_on_the_span_is_one():
    weights = [0.1, 0.2, 5.0, 4.0, 6.0, 0.3, 0.1]
    assert importance_precision_at_k(weights, [2, 3, 4]) == 1.0
    assert importance_precision_at_k(weights, [0, 1]) == 0.0
    # k = 4 over a 3-token span: at most 3 of the 4 places can hit
    assert importance_precision_at_k(weights, [2, 3, 4], k=4) == pytest.approx(0.75)
    # k larger than the response is capped at T
    assert importance_precision_at_k(weights, [2, 3, 4], k=100) == pytest.approx(3 / 7)


def test_uniform_weights_give_the_chance_level_and_ties_are_expected_values():
    assert importance_precision_at_k([1.0] * 10, [3, 4]) == pytest.approx(0.2)
    assert importance_precision_at_k([1.0] * 10, [3, 4], k=5) == pytest.approx(0.2)
    # top-2 of [3, 1, 1, 1]: position 0 surely, then one of three tied -> span {1} hit with prob 1/3
    assert importance_precision_at_k([3.0, 1.0, 1.0, 1.0], [0, 1]) == pytest.approx((1 + 1 / 3) / 2)


def test_precision_rejects_bad_input():
    with pytest.raises(ValueError):
        importance_precision_at_k([1.0, 2.0], [])
    with pytest.raises(ValueError):
        importance_precision_at_k([1.0, 2.0], [2])
    with pytest.raises(ValueError):
        importance_precision_at_k([1.0, float("nan")], [0])
    with pytest.raises(ValueError):
        importance_precision_at_k([1.0, 2.0], [0], k=0)


# --- distinct-n, critical phrases, KL by hand -------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> 3 unique of 6; bigrams: ab ba ab, ac -> 3 unique of 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n([[1, 2, 3], [1, 2]], 2) == pytest.approx(2 / 3)  # token ids work too
    assert math.isnan(distinct_n(["a"], 2))
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_critical_phrase_rate_by_hand():
    samples = [
        "You should Call  an ambulance now.",  # chosen (case and spaces ignored)
        "Just wait a few days.",  # rejected
        "call an ambulance, or wait a few days",  # both
        "Drink some water.",  # neither
        "call an ambulance",  # chosen
    ]
    chosen = ["call an ambulance"] * 5
    rejected = ["wait a few days"] * 5
    rates = critical_phrase_rate(samples, chosen, rejected)
    assert rates["chosen_rate"] == pytest.approx(2 / 4)
    assert rates["rejected_rate"] == pytest.approx(1 / 4)
    assert rates["both_rate"] == pytest.approx(1 / 4)
    assert rates["neither_rate"] == pytest.approx(1 / 5)
    assert rates["chosen_rate"] + rates["rejected_rate"] + rates["both_rate"] == pytest.approx(1.0)
    empty = critical_phrase_rate(["nothing"], ["x y"], ["z w"])
    assert math.isnan(empty["chosen_rate"]) and empty["neither_rate"] == 1.0
    with pytest.raises(ValueError):
        critical_phrase_rate(["a"], [], ["b"])


def test_kl_from_logps_by_hand():
    estimate = kl_from_logps([[-1.0, -2.0], [-1.0]], [[-1.5, -2.5], [-3.0]])
    # per-sample sums: 1.0 and 2.0 -> mean 1.5, sd 0.7071, se 0.5; 3 nats over 3 tokens
    assert estimate.kl == pytest.approx(1.5)
    assert estimate.stderr == pytest.approx(0.5)
    assert estimate.kl_per_token == pytest.approx(1.0)
    assert estimate.samples == 2


# --- on a tiny model ---------------------------------------------------------------------------------------


def test_kl_of_a_model_against_itself_is_zero(tiny, pairs):
    model, _, tokenizer = tiny
    prompts = [p.prompt for p in pairs[:4]]
    estimate, samples = kl_to_reference(model, model, tokenizer, prompts, FAST_SAMPLING)
    assert estimate.kl == 0.0 and estimate.stderr == 0.0 and estimate.samples == 4
    twin = copy.deepcopy(model)  # identical weights, a different object: still exactly 0
    estimate_twin, _ = kl_to_reference(model, twin, tokenizer, samples=samples)
    assert estimate_twin.kl == 0.0
    other = tiny[1]
    estimate_other, _ = kl_to_reference(model, other, tokenizer, samples=samples)
    assert math.isfinite(estimate_other.kl) and estimate_other.kl != 0.0


def test_sampled_tokens_match_sample_responses(tiny, pairs):
    model, _, tokenizer = tiny
    prompts = [p.prompt for p in pairs[:5]]
    sampled = sample_with_tokens(model, tokenizer, prompts, FAST_SAMPLING)
    assert sampled.texts == sample_responses(model, tokenizer, prompts, FAST_SAMPLING)
    for ids, finished in zip(sampled.response_ids, sampled.finished, strict=True):
        assert 1 <= len(ids) <= FAST_SAMPLING.max_new_tokens
        assert (ids[-1] == tokenizer.eos_token_id) == finished
        assert tokenizer.eos_token_id not in ids[:-1]


def test_critical_token_precision_on_synthetic_pairs(tiny, pairs):
    model, _, tokenizer = tiny
    metrics = critical_token_precision(model, tokenizer, pairs, ENCODING)
    responses = span_responses(tokenizer, pairs, ENCODING)
    assert metrics["critical_responses"] == len(responses) == 2 * len(pairs)
    for method in ("attribution", "prior", "hybrid", "uniform"):
        assert 0.0 <= metrics[f"precision_at_k_{method}"] <= 1.0
    chance = np.mean([len(r.span_tokens) / r.encoded.response_length for r in responses])
    assert metrics["precision_at_k_uniform"] == pytest.approx(chance)
    # The synthetic span sits mid-answer, where the Gaussian prior peaks: better than chance.
    assert metrics["precision_at_k_prior"] > metrics["precision_at_k_uniform"]
    without_spans = [PreferencePair(p.pair_id, p.prompt, p.chosen, p.rejected, "file", {}) for p in pairs]
    assert critical_token_precision(model, tokenizer, without_spans, ENCODING) == {}
    # Further estimators add their raw and hybrid rows, and every row comes per third of the response.
    more = critical_token_precision(
        model, tokenizer, pairs, ENCODING, estimators=("surprisal", "attribution_no_eos")
    )
    for method in ("surprisal", "hybrid_surprisal", "attribution_no_eos", "hybrid_attribution_no_eos"):
        assert 0.0 <= more[f"precision_at_k_{method}"] <= 1.0
    assert more["precision_at_k_hybrid"] == metrics["precision_at_k_hybrid"]
    # Each estimator runs once; its _no_eos estimator is derived, not recomputed.
    calls: list[str] = []
    real = importance_estimators.compute_token_importance

    def counting(*args, **kwargs):
        calls.append(kwargs["estimator"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importance_estimators, "compute_token_importance", counting)
        again = critical_token_precision(
            model,
            tokenizer,
            pairs,
            ENCODING,
            estimators=("surprisal", "attribution_no_eos", "surprisal_no_eos"),
        )
    assert sorted(calls) == ["attribution", "surprisal"]
    assert (
        again["precision_at_k_hybrid_attribution_no_eos"] == more["precision_at_k_hybrid_attribution_no_eos"]
    )
    assert sum(more.get(f"critical_responses_{third}", 0) for third in ("start", "middle", "end")) == len(
        responses
    )


def test_span_third_and_precision_table_by_hand():
    assert (
        span_third([0, 1], 9) == "start" and span_third([4], 9) == "middle" and span_third([7, 8], 9) == "end"
    )
    assert span_third([2, 3], 9) == "middle"  # centre 3 / 9 = 1/3 exactly: the middle third begins there
    with pytest.raises(ValueError):
        span_third([], 4)
    # Two responses of 6 tokens: span {0, 1} (start) and {4, 5} (end); k = 2.
    weights = {
        "good": [np.array([5.0, 4, 0, 0, 0, 0]), np.array([0.0, 0, 0, 0, 3, 2])],  # both spans found: 1, 1
        "half": [np.array([5.0, 0, 4, 0, 0, 0]), np.array([0.0, 0, 0, 9, 9, 9])],  # 1/2, and a 3-way tie: 2/3
    }
    table = precision_table(weights, [[0, 1], [4, 5]])
    assert table["precision_at_k_good"] == 1.0 and table["precision_at_k_good_start"] == 1.0
    assert table["precision_at_k_half_start"] == 0.5
    assert table["precision_at_k_half_end"] == pytest.approx(2 / 3)
    assert table["precision_at_k_half"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert "precision_at_k_half_middle" not in table and table["critical_responses_middle"] == 0.0
    assert parse_importance_estimator("surprisal_no_eos") == ("surprisal", True)
    assert parse_importance_estimator("contrastive") == ("contrastive", False)
    with pytest.raises(ValueError, match="unknown importance estimator"):
        parse_importance_estimator("saliency")


def test_evaluate_model_reports_every_metric_and_skips_without_spans(tiny, pairs):
    model, other, tokenizer = tiny
    settings = ModelEvalSettings(batch_size=8, encoding=ENCODING, sample_prompts=4, sampling=FAST_SAMPLING)
    torch.manual_seed(0)
    reference_eval = evaluate_model(model, model, tokenizer, pairs, settings)
    policy_eval = evaluate_model(other, model, tokenizer, pairs, settings)
    for key in (
        "reward_accuracy",
        "reward_margin",
        "likelihood_win_rate",
        "kl_to_reference",
        "kl_to_reference_stderr",
        "distinct_1",
        "distinct_2",
        "mean_length",
        "precision_at_k_attribution",
        "precision_at_k_prior",
        "precision_at_k_hybrid",
        "precision_at_k_uniform",
        "critical_phrase_chosen_rate",
        "critical_phrase_rejected_rate",
        "critical_phrase_neither_rate",
    ):
        assert key in policy_eval.metrics, key
    assert reference_eval.metrics["kl_to_reference"] == 0.0
    assert reference_eval.metrics["reward_accuracy"] == 0.5
    assert policy_eval.skipped == {}
    plain = [PreferencePair(p.pair_id, p.prompt, p.chosen, p.rejected, "file", {}) for p in pairs]
    no_spans = evaluate_model(other, model, tokenizer, plain, settings)
    assert "precision_at_k_hybrid" not in no_spans.metrics
    assert "critical_tokens" in no_spans.skipped and "critical_phrases" in no_spans.skipped
    assert "non-synthetic" in no_spans.skipped["critical_tokens"]
    capped = evaluate_model(
        other,
        model,
        tokenizer,
        pairs,
        ModelEvalSettings(batch_size=8, encoding=ENCODING, sample_prompts=0, critical_pairs=1),
    )
    assert capped.metrics["critical_responses"] == 2 and "sampling" in capped.skipped
    assert policy_eval.metrics["critical_responses"] == 2 * len(pairs)
    biased = evaluate_model(
        other,
        model,
        tokenizer,
        pairs,
        ModelEvalSettings(
            batch_size=8, encoding=ENCODING, sample_prompts=2, sampling=SamplingSettings(max_new_tokens=4)
        ),
    )
    assert "kl_exactness" in biased.skipped


def test_small_models_are_evaluated_under_the_thread_plan(tiny, monkeypatch):
    from tidpo_core.runtime.threads import threads_for

    monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    model = tiny[0]
    torch.set_num_threads(2)
    try:
        with threads_for(model):
            assert torch.get_num_threads() == 1  # a small model: one thread
        assert torch.get_num_threads() == 2  # restored
        monkeypatch.setenv("TIDPO_NUM_THREADS", "2")
        with threads_for(model):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def _history(losses: list[float], margins: list[float]) -> list[dict[str, float]]:
    return [{"loss": loss, "rewards/margins": margin} for loss, margin in zip(losses, margins, strict=True)]


def test_training_health_judges_the_margin_not_the_loss() -> None:
    # KL inside beta: the loss can rise while the preference is learned (SeqKL(y_l) grows).
    rising_loss = training_health(_history([0.69, 0.70, 0.80, 0.90], [0.0, 0.2, 0.5, 0.9]))
    assert rising_loss.passed
    assert rising_loss.mean_margin_first_window == 0.0 and rising_loss.mean_margin_last_window == 0.9
    assert rising_loss.mean_loss_last_window == 0.9
    # 8 steps: quarter windows of 2 steps, means by hand.
    health = training_health(_history([1.0] * 8, [0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.05, 0.15]))
    assert health.mean_margin_first_window == pytest.approx(0.2)
    assert health.mean_margin_last_window == pytest.approx(0.1)
    assert not health.passed  # the margin shrank even though the loss did not move


def test_training_health_fails_on_nan_inf_or_no_steps() -> None:
    assert not training_health(_history([0.7, float("nan"), 0.5, 0.4], [0.0, 0.1, 0.2, 0.3])).passed
    assert not training_health(_history([0.7, 0.6, 0.5, 0.4], [0.0, 0.1, float("inf"), 0.3])).passed
    empty = training_health([])
    assert not empty.passed and empty.steps == 0 and not empty.all_finite


def _m(win: float, margin: float = 0.0) -> dict[str, float]:
    return {"likelihood_win_rate": win, "reward_margin": margin}


def test_promotion_with_no_champion_is_the_reference_gate() -> None:
    decision = promotion_decision(_m(0.6, 0.2), _m(0.4), None, "likelihood_win_rate")
    assert decision.passed and decision.versus_champion is None and decision.compared_with == "reference"
    assert decision.description.endswith("; no champion yet")
    assert not promotion_decision(
        _m(0.4), _m(0.4), None, "likelihood_win_rate"
    ).passed  # a tie with 0 tie-break


def test_promotion_needs_the_reference_and_the_champion() -> None:
    reference, champion = _m(0.40, 0.0), _m(0.70, 0.30)
    better_than_both = promotion_decision(
        _m(0.75, 0.2), reference, champion, "likelihood_win_rate", champion_version="3"
    )
    assert better_than_both.passed and better_than_both.compared_with == "reference, champion v3"
    # Beats the reference, trails the champion: refused (the scheduled-retraining regression).
    weaker = promotion_decision(
        _m(0.60, 0.5), reference, champion, "likelihood_win_rate", champion_version="3"
    )
    assert not weaker.passed and weaker.versus_reference.passed and not weaker.versus_champion.passed
    assert "worse than the champion" in weaker.description
    # ... unless it trails by less than the configured margin.
    assert promotion_decision(
        _m(0.65), reference, champion, "likelihood_win_rate", champion_margin=0.1, champion_version="3"
    ).passed
    # Better than the champion but not than its reference: refused too.
    assert not promotion_decision(
        _m(0.80), _m(0.90), champion, "likelihood_win_rate", champion_version="3"
    ).passed


def test_ties_with_the_champion_go_to_the_tie_break() -> None:
    champion = _m(0.70, 0.30)
    assert not_worse_than_champion(
        _m(0.70, 0.30), champion, "likelihood_win_rate"
    ).passed  # equal on both: kept
    assert not_worse_than_champion(_m(0.70, 0.31), champion, "likelihood_win_rate").passed
    tie_lost = not_worse_than_champion(_m(0.70, 0.29), champion, "likelihood_win_rate")
    assert not tie_lost.passed and "tie-break reward_margin 0.2900 vs champion 0.3000" in tie_lost.description
    assert not_worse_than_champion(_m(0.70, 0.29), champion, "likelihood_win_rate", tiebreak=None).passed
    # At the margin's boundary exactly (0.6 = 0.7 - 0.1): the tie-break decides as well.
    assert not not_worse_than_champion(_m(0.6, 0.0), champion, "likelihood_win_rate", margin=0.1).passed
    assert not not_worse_than_champion(_m(float("nan")), champion, "likelihood_win_rate").passed
    with pytest.raises(KeyError, match="kl"):
        not_worse_than_champion(_m(0.7), champion, "kl")
