"""Tests for tidpo_core.data.synthetic: size, determinism, critical spans and validity."""

from __future__ import annotations

import statistics

import pytest

from tidpo_core.data.pairs import PreferencePair, make_pair_id
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.data.validation import validate_rows


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    return generate_synthetic_pairs(2000, seed=0)


def test_size_and_distinct_ids(pairs: list[PreferencePair]) -> None:
    assert len(pairs) == 2000
    assert len({p.pair_id for p in pairs}) == 2000
    assert all(p.pair_id == make_pair_id(p.prompt, p.chosen, p.rejected) for p in pairs)
    assert all(p.source == "synthetic" for p in pairs)


def test_small_and_zero_n() -> None:
    assert generate_synthetic_pairs(0) == []
    assert len(generate_synthetic_pairs(7, seed=3)) == 7


def test_large_n_stays_distinct() -> None:
    many = generate_synthetic_pairs(20_000, seed=1)
    assert len({p.pair_id for p in many}) == 20_000


def test_deterministic_per_seed_and_different_across_seeds(pairs: list[PreferencePair]) -> None:
    assert [p.pair_id for p in generate_synthetic_pairs(2000, seed=0)] == [p.pair_id for p in pairs]
    other = generate_synthetic_pairs(2000, seed=1)
    assert [p.pair_id for p in other] != [p.pair_id for p in pairs]
    assert len({p.pair_id for p in other} & {p.pair_id for p in pairs}) < 1000


def test_spans_locate_phrases_and_responses_differ_only_there(pairs: list[PreferencePair]) -> None:
    for p in pairs:
        cs, ce = p.meta["chosen_span"]
        rs, re_ = p.meta["rejected_span"]
        assert p.chosen[cs:ce] == p.meta["chosen_phrase"]
        assert p.rejected[rs:re_] == p.meta["rejected_phrase"]
        assert p.chosen[:cs] == p.rejected[:rs]
        assert p.chosen[ce:] == p.rejected[re_:]
        assert p.meta["chosen_phrase"] != p.meta["rejected_phrase"]
        assert 2 <= len(p.meta["chosen_phrase"].split()) <= 10


def test_span_sits_mostly_in_the_middle(pairs: list[PreferencePair]) -> None:
    centres = [sum(p.meta["chosen_span"]) / 2 / len(p.chosen) for p in pairs]
    assert 0.35 <= statistics.mean(centres) <= 0.65
    # The position varies: it is not pinned to one spot.
    assert statistics.pstdev(centres) > 0.03


def test_format_and_lengths(pairs: list[PreferencePair]) -> None:
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman: ") and p.prompt.endswith("\n\nAssistant:")
        for response in (p.chosen, p.rejected):
            assert response.startswith(" ") and not response.startswith("  ")
            assert 20 <= len(response.split()) <= 70
    words = [len(p.chosen.split()) for p in pairs]
    assert 25 <= statistics.mean(words) <= 70


def test_topics(pairs: list[PreferencePair]) -> None:
    topics = {p.meta["topic"] for p in pairs}
    assert len(topics) >= 6
    assert {"medical", "medication_dosage", "electrical_safety", "finance_scams", "cybersecurity"} <= topics


def test_all_pairs_pass_validation(pairs: list[PreferencePair]) -> None:
    result = validate_rows(enumerate(p.to_row() for p in pairs), source="synthetic")
    assert result.quarantined == []
    assert result.pairs == pairs


def test_uniform_span_position_reaches_every_third_and_keeps_the_corpus_rules() -> None:
    uniform = generate_synthetic_pairs(600, seed=0, span_position="uniform")
    thirds = [0, 0, 0]
    for p in uniform:
        cs, ce = p.meta["chosen_span"]
        rs, re_ = p.meta["rejected_span"]
        assert p.chosen[cs:ce] == p.meta["chosen_phrase"] and p.rejected[rs:re_] == p.meta["rejected_phrase"]
        assert p.chosen[:cs] == p.rejected[:rs] and p.chosen[ce:] == p.rejected[re_:]
        assert p.chosen.startswith(" ") and not p.chosen.startswith("  ") and "  " not in p.chosen
        assert len(p.chosen.split()) <= 70
        thirds[min(int(3 * (cs + ce) / 2 / len(p.chosen)), 2)] += 1
    # Every third holds a fair share of the spans (the middle setting puts almost none in the first third).
    assert min(thirds) >= 0.2 * len(uniform), thirds
    middle = generate_synthetic_pairs(600, seed=0)
    assert sum(sum(p.meta["chosen_span"]) / 2 / len(p.chosen) < 1 / 3 for p in middle) < 0.01 * len(middle)
    assert [p.pair_id for p in generate_synthetic_pairs(600, seed=0, span_position="uniform")] == [
        p.pair_id for p in uniform
    ]
    with pytest.raises(ValueError, match="span_position"):
        generate_synthetic_pairs(3, span_position="end")
