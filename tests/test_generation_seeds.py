"""Per-row seeded sampling (tidpo_core.models.generation): a row's sample depends on its own seed only, and the
Gumbel-max draw samples the same warped distribution as HF's multinomial sampling."""

from __future__ import annotations

import math

import pytest
import torch

from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.models.generation import (
    RowGumbelNoise,
    SamplingSettings,
    prompt_ids,
    sample_responses,
    warpers,
)
from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

SETTINGS = SamplingSettings(max_new_tokens=12, batch_size=8, max_prompt_tokens=64)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    pairs = generate_synthetic_pairs(40, seed=5)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=400)
    config = TinyModelConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return build_tiny_model(tokenizer, config, seed=0), tokenizer, [p.prompt for p in pairs]


def _by_length(tokenizer, prompts: list[str]) -> list[tuple[int, str]]:
    return sorted({(len(prompt_ids(tokenizer, p, SETTINGS.max_prompt_tokens)), p) for p in prompts})


def test_a_row_samples_the_same_alone_and_among_other_prompts_of_no_greater_length(model_and_tokenizer):
    model, tokenizer, prompts = model_and_tokenizer
    ranked = _by_length(tokenizer, prompts)
    target = ranked[-1][1]  # the longest: its row is unpadded in every batch below, as alone
    others = [p for _, p in ranked[:-1]][:7]
    alone = sample_responses(model, tokenizer, [target], SETTINGS, seeds=[1234])
    for position in (0, 3, 7):
        batch = others[:position] + [target] + others[position:]
        seeds = [10 + i for i in range(len(batch))]
        seeds[position] = 1234
        assert sample_responses(model, tokenizer, batch, SETTINGS, seeds=seeds)[position] == alone[0]
    # Other seeds for the batch-mates change their samples, not the target's.
    batch = [target, *others]
    first = sample_responses(model, tokenizer, batch, SETTINGS, seeds=[1234, *range(100, 107)])
    second = sample_responses(model, tokenizer, batch, SETTINGS, seeds=[1234, *range(200, 207)])
    assert first[0] == second[0] == alone[0] and first[1:] != second[1:]


def test_a_row_samples_the_same_under_left_padding(model_and_tokenizer):
    """Found on this tiny Llama (CPU, float32): left padding to a longer batch-mate does not change the
    row's sample either (the masked positions add exact zeros); a larger model may differ in float noise
    here, which is why the precompute keeps batches fixed (whole-batch shards)."""
    model, tokenizer, prompts = model_and_tokenizer
    ranked = _by_length(tokenizer, prompts)
    short, long = ranked[0][1], ranked[-1][1]
    assert ranked[0][0] < ranked[-1][0]
    alone = sample_responses(model, tokenizer, [short], SETTINGS, seeds=[77])
    assert sample_responses(model, tokenizer, [long, short], SETTINGS, seeds=[5, 77])[1] == alone[0]


def test_seeds_must_match_the_prompts(model_and_tokenizer):
    model, tokenizer, prompts = model_and_tokenizer
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_responses(model, tokenizer, prompts[:3], SETTINGS, seeds=[1, 2])


def _warped_probabilities(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """HF's temperature, top-k and top-p warping, by hand: scale, keep the k largest, then drop the
    smallest tokens whose cumulative probability (ascending) stays within 1 - top_p; renormalize."""
    scaled = [x / temperature for x in logits]
    kept = set(sorted(range(len(scaled)), key=lambda i: -scaled[i])[:top_k])
    total = sum(math.exp(scaled[i]) for i in kept)
    ascending = sorted(kept, key=lambda i: scaled[i])
    cumulative = 0.0
    for i in ascending:
        cumulative += math.exp(scaled[i]) / total
        if cumulative <= 1 - top_p:
            kept.discard(i)
    total = sum(math.exp(scaled[i]) for i in kept)
    return [math.exp(scaled[i]) / total if i in kept else 0.0 for i in range(len(scaled))]


def test_gumbel_max_draws_follow_the_warped_distribution():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, 1.5]
    settings = SamplingSettings(temperature=0.7, top_k=5, top_p=0.9)
    expected = _warped_probabilities(logits, settings.temperature, settings.top_k, settings.top_p)
    assert sum(p == 0.0 for p in expected) >= 2  # the warping removes tokens: they must never be drawn

    draws = 20_000
    scores = torch.tensor([logits] * draws)
    for warper in warpers(settings):
        scores = warper(torch.zeros(draws, 1, dtype=torch.long), scores)
    noisy = RowGumbelNoise(list(range(draws)))(torch.zeros(draws, 1, dtype=torch.long), scores)
    counts = torch.bincount(noisy.argmax(dim=-1), minlength=len(logits)).tolist()

    assert all(count == 0 for count, p in zip(counts, expected, strict=True) if p == 0.0)
    kept = [(count, p * draws) for count, p in zip(counts, expected, strict=True) if p > 0.0]
    chi_square = sum((count - mean) ** 2 / mean for count, mean in kept)
    # Degrees of freedom = kept tokens - 1 (at most 4): the 99.9th percentile of chi-square(4) is 18.5.
    assert chi_square < 18.5, (counts, [round(p * draws) for p in expected])


def test_a_row_generator_gives_independent_draws_step_after_step():
    """One row's successive steps (one generator) also follow the distribution: no draw is repeated."""
    probabilities = torch.tensor([0.5, 0.3, 0.2])
    noise = RowGumbelNoise([42])
    draws = [
        int((probabilities.log() + noise(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3))).argmax())
        for _ in range(6000)
    ]
    counts = torch.bincount(torch.tensor(draws), minlength=3).float()
    chi_square = float(((counts - 6000 * probabilities) ** 2 / (6000 * probabilities)).sum())
    assert chi_square < 13.8  # chi-square(2), 99.9th percentile
