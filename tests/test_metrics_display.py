"""How metrics and pairs are shown to people: grouping, rounding, alignment, where two answers differ."""

import math

from tidpo_core.evaluation.metrics import (
    comparison_rows,
    grouped_comparison_rows,
    key_metric_lines,
    metric_group,
)
from tidpo_pipeline.metadata import where_they_differ


def test_metric_groups_by_prefix() -> None:
    assert metric_group("reward_accuracy") == "preference"
    assert metric_group("precision_at_k_hybrid_surprisal_start") == "importance"
    assert metric_group("kl_to_reference_stderr") == "generation"
    assert metric_group("critical_phrase_chosen_rate") == "generation"
    assert metric_group("truthfulqa_mc1") == "benchmarks"
    assert metric_group("something_new") == "other"


def test_comparison_rows_round_and_subtract_by_hand() -> None:
    rows = comparison_rows({"a": 0.91234, "b": math.nan}, {"a": 0.5, "c": 1.0})
    assert rows == [
        {"metric": "a", "policy": "0.912", "reference": "0.500", "policy - reference": "0.412"},
        {"metric": "b", "policy": "n/a", "reference": "n/a", "policy - reference": "n/a"},
        {"metric": "c", "policy": "n/a", "reference": "1.000", "policy - reference": "n/a"},
    ]
    grouped = grouped_comparison_rows(
        {"truthfulqa_mc1": 0.3, "reward_accuracy": 0.9, "zzz": 1.0}, {"reward_accuracy": 0.5}
    )
    assert list(grouped) == ["preference", "benchmarks", "other"]
    assert grouped["preference"][0]["policy - reference"] == "0.400"


def test_key_metric_lines_are_aligned_and_skip_what_was_not_measured() -> None:
    lines = key_metric_lines(
        {
            "eval/policy/reward_accuracy": 1.0,
            "eval/reference/reward_accuracy": 0.5,
            "eval/policy/kl_to_reference": 12.345,
        },
        indent="",
    )
    # Label column as wide as the longest label (26), then two spaces, then right-aligned 8 and 9 wide.
    assert lines == [
        "metric" + " " * 24 + "policy" + "  " + "reference",
        "held-out reward accuracy" + " " * 7 + "1.000" + " " * 6 + "0.500",
        "KL to the reference (nats)" + " " * 4 + "12.345" + " " * 11,
    ]
    assert key_metric_lines({"loss": 0.3}) == []


def test_where_they_differ_shows_the_differing_span_with_context() -> None:
    shared = "I can help with that. Please make sure you "
    chosen, rejected = (
        shared + "consult a doctor first." + " Thanks!",
        shared + "just take a double dose." + " Thanks!",
    )
    first, second = where_they_differ(chosen, rejected, context=10)
    assert first == "… sure you consult a doctor first. Thanks!"
    assert second == "… sure you just take a double dose. Thanks!"
    assert where_they_differ("abc", "abd", context=5) == ("abc", "abd")
    assert where_they_differ("same", "same", context=2) == ("…me", "…me")


def test_without_log_messages_drops_only_the_named_messages_and_only_inside(caplog) -> None:
    import logging

    from tidpo_core.runtime.quiet import without_log_messages

    logger = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO, logger="some.library"):
        with without_log_messages("some.library", "known noise"):
            logger.warning("this is known noise, every run")
            logger.warning("a real problem")
        logger.warning("known noise outside the block")
    assert [r.getMessage() for r in caplog.records] == ["a real problem", "known noise outside the block"]


def test_evaluation_by_model_splits_the_gate_s_three_way_comparison() -> None:
    from tidpo_core.evaluation.metrics import evaluation_by_model

    run = {
        "eval/policy/likelihood_win_rate": 0.75,
        "eval/reference/likelihood_win_rate": 0.5,
        "eval/champion/likelihood_win_rate": 0.7,
        "eval/policy/precision_at_k_hybrid_start": 0.25,
        "eval/gate_passed": 1.0,  # not a model's metric
        "loss": 0.3,
    }
    assert evaluation_by_model(run) == {
        "policy": {"likelihood_win_rate": 0.75, "precision_at_k_hybrid_start": 0.25},
        "reference": {"likelihood_win_rate": 0.5},
        "champion": {"likelihood_win_rate": 0.7},
    }
