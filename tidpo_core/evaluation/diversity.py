"""How varied a model's sampled answers are: corpus-level distinct-1/2, mean length, share that stopped."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from tidpo_core.evaluation.sampled_responses import SampledResponses


def distinct_n(texts: Sequence[str] | Sequence[Sequence[Any]], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams over every text.

    A text is either a string (split on whitespace) or a sequence of tokens (ids or strings) used as
    is. NaN when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple] = set()
    total = 0
    for text in texts:
        tokens = text.split() if isinstance(text, str) else list(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else float("nan")


def answer_tokens(samples: SampledResponses, stops: Collection[int]) -> list[list[int]]:
    """Each sampled answer's token ids without the `stops` tokens (eos, end of turn): what its length counts."""
    stops = set(stops)
    return [[t for t in ids if t not in stops] for ids in samples.response_ids]


def diversity_metrics(samples: SampledResponses, stops: Collection[int]) -> dict[str, float]:
    """distinct-1/2 over the sampled token ids (the `stops` tokens excluded), mean length in tokens, share that stopped."""
    tokens = answer_tokens(samples, stops)
    return {
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "mean_length": float(np.mean([len(t) for t in tokens])) if tokens else float("nan"),
        "eos_rate": float(np.mean(samples.finished)) if samples.finished else float("nan"),
    }
