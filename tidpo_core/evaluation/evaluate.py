"""Held-out metrics of a policy against its reference.

- preference metrics on the eval split: implicit-reward accuracy and margin, likelihood win rates;
- KL(pi || ref) estimated by Monte Carlo on responses sampled from pi, with its standard error, and
  the samples' diversity (distinct-1/2, length);
- on data with known critical spans (the built-in synthetic corpus): importance precision@k of
  gradient attribution, Gaussian prior, hybrid and uniform weights, and the critical-phrase rate of
  the sampled answers;
- the gate that decides whether the trained policy replaces the champion.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidpo_core.batching.chat import closing_token_id, readable_prompt, stop_token_ids
from tidpo_core.batching.features import (
    EncodingSettings,
    TrainingCollator,
    build_features,
    encode_response,
    stack_sides,
)
from tidpo_core.batching.tokenization import EncodedSequence, tokens_overlapping
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.data.synthetic import contains_phrase, critical_phrases
from tidpo_core.method.importance import (
    ESTIMATORS,
    Normalization,
    TokenImportance,
    compute_token_importance,
    without_eos,
)
from tidpo_core.method.losses import token_logps
from tidpo_core.models.generation import SamplingSettings, sample_batches
from tidpo_core.runtime.threads import threads_for


@dataclass(frozen=True)
class PairScores:
    """Summed response log-probs of each eval pair under one model."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    batch_size: int = 16,
    progress: bool = False,
) -> PairScores:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sides = ("chosen", "rejected")
    features = build_features(tokenizer, pairs, settings)
    collate = TrainingCollator(tokenizer.pad_token_id, sides)
    sums: dict[str, list[float]] = {s: [] for s in sides}
    counts: dict[str, list[float]] = {s: [] for s in sides}
    for start in tqdm(range(0, len(features), batch_size), disable=not progress, desc="score", unit="batch"):
        batch = collate(features[start : start + batch_size])
        stacked = stack_sides(batch, sides, tokenizer.pad_token_id)
        stacked = {k: v.to(device) for k, v in stacked.items()}
        logits = model(input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]).logits.float()
        per_token = token_logps(logits, stacked["input_ids"]) * stacked["response_mask"]
        n = batch.sides["chosen"].input_ids.shape[0]
        for i, side in enumerate(sides):
            sums[side].extend(per_token[i * n : (i + 1) * n].sum(1).tolist())
            counts[side].extend(stacked["response_mask"][i * n : (i + 1) * n].sum(1).tolist())
    model.train(was_training)
    return PairScores(
        chosen=np.asarray(sums["chosen"]),
        rejected=np.asarray(sums["rejected"]),
        chosen_tokens=np.asarray(counts["chosen"]),
        rejected_tokens=np.asarray(counts["rejected"]),
    )


def _win_rate(better: np.ndarray, worse: np.ndarray) -> float:
    """Share of pairs where `better` > `worse`, a tie counting half (so a model against itself is 0.5)."""
    if len(better) == 0:
        return float("nan")
    return float(np.mean((better > worse) + 0.5 * (better == worse)))


def preference_metrics(policy: PairScores, reference: PairScores, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy and margin relative to the reference, and likelihood win rates.

    rewards are beta * (log pi(y) - log pi_ref(y)) summed over the response, as in DPO/TRL.
    """
    reward_chosen = beta * (policy.chosen - reference.chosen)
    reward_rejected = beta * (policy.rejected - reference.rejected)
    margin = reward_chosen - reward_rejected
    return {
        "reward_accuracy": _win_rate(reward_chosen, reward_rejected),
        "reward_margin": float(np.mean(margin)) if len(margin) else float("nan"),
        "reward_chosen": float(np.mean(reward_chosen)) if len(margin) else float("nan"),
        "reward_rejected": float(np.mean(reward_rejected)) if len(margin) else float("nan"),
        "likelihood_win_rate": _win_rate(policy.chosen, policy.rejected),
        "normalized_likelihood_win_rate": _win_rate(
            policy.chosen / np.maximum(policy.chosen_tokens, 1), policy.rejected / np.maximum(policy.rejected_tokens, 1)
        ),
        "logps_chosen": float(np.mean(policy.chosen)) if len(margin) else float("nan"),
        "logps_rejected": float(np.mean(policy.rejected)) if len(margin) else float("nan"),
        "eval_pairs": float(len(margin)),
    }


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    description: str


def _require_gate_metrics(names: tuple[str | None, ...], *tables: dict[str, float]) -> None:
    for name in names:
        if name is not None and any(name not in table for table in tables):
            raise KeyError(f"gate metric {name!r} is not among the evaluation metrics {sorted(tables[0])}")


def gate_decision(
    policy: dict[str, float],
    reference: dict[str, float],
    metric: str,
    margin: float,
    tiebreak: str | None = "reward_margin",
) -> GateDecision:
    """The evaluation gate: the trained policy must beat the reference on `metric` by more than `margin`.

    Strictly: a policy no better than its reference must not take the champion alias. Count metrics
    such as the likelihood win rate tie often on a small eval split (3 of 8 pairs either way); on an
    exact tie, the policy passes only if it is strictly better on `tiebreak` (default: the held-out
    reward margin, which is 0 for the reference itself). None: a tie fails.
    """
    _require_gate_metrics((metric, tiebreak), policy, reference)
    trained, baseline = policy[metric], reference[metric]
    described = f"{metric} {trained:.4f} vs reference {baseline:.4f} + margin {margin}"
    if not np.isfinite(trained):
        return GateDecision(False, f"failed: {described} (not finite)")
    if trained > baseline + margin:
        return GateDecision(True, f"passed: {described}")
    if tiebreak is None or trained != baseline + margin:
        return GateDecision(False, f"failed: {described} (must be greater)")
    better = bool(np.isfinite(policy[tiebreak]) and policy[tiebreak] > reference[tiebreak])
    return GateDecision(
        better,
        f"{'passed' if better else 'failed'}: {described} is a tie; tie-break {tiebreak} "
        f"{policy[tiebreak]:.4f} vs reference {reference[tiebreak]:.4f} (must be greater)",
    )


def not_worse_than_champion(
    challenger: dict[str, float],
    champion: dict[str, float],
    metric: str,
    margin: float = 0.0,
    tiebreak: str | None = "reward_margin",
) -> GateDecision:
    """The retraining gate's second half: the challenger may trail the current champion on `metric` by
    less than `margin` (0: it must be at least as good). On an exact tie at the boundary it must be at
    least as good on `tiebreak` (None: a tie passes)."""
    _require_gate_metrics((metric, tiebreak), challenger, champion)
    new, current = challenger[metric], champion[metric]
    described = f"{metric} {new:.4f} vs champion {current:.4f} - margin {margin}"
    if not np.isfinite(new):
        return GateDecision(False, f"failed: {described} (not finite)")
    if new > current - margin:
        return GateDecision(True, f"passed: {described}")
    if new < current - margin:
        return GateDecision(False, f"failed: {described} (worse than the champion)")
    if tiebreak is None:
        return GateDecision(True, f"passed: {described} is a tie")
    kept = bool(np.isfinite(challenger[tiebreak]) and challenger[tiebreak] >= champion[tiebreak])
    return GateDecision(
        kept,
        f"{'passed' if kept else 'failed'}: {described} is a tie; tie-break {tiebreak} "
        f"{challenger[tiebreak]:.4f} vs champion {champion[tiebreak]:.4f} (must not be smaller)",
    )


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a challenger takes the champion alias: it must beat its reference and be no worse than
    the current champion (when there is one), judged on the same held-out pairs."""

    passed: bool
    description: str
    versus_reference: GateDecision
    versus_champion: GateDecision | None
    champion_version: str | None

    @property
    def compared_with(self) -> str:
        return "reference" if self.champion_version is None else f"reference, champion v{self.champion_version}"


def promotion_decision(
    challenger: dict[str, float],
    reference: dict[str, float],
    champion: dict[str, float] | None,
    metric: str,
    margin: float = 0.0,
    tiebreak: str | None = "reward_margin",
    champion_margin: float = 0.0,
    champion_version: str | None = None,
) -> PromotionDecision:
    versus_reference = gate_decision(challenger, reference, metric, margin, tiebreak)
    if champion is None:
        return PromotionDecision(
            versus_reference.passed, f"{versus_reference.description}; no champion yet", versus_reference, None, None
        )
    versus_champion = not_worse_than_champion(challenger, champion, metric, champion_margin, tiebreak)
    passed = versus_reference.passed and versus_champion.passed
    return PromotionDecision(
        passed,
        f"reference: {versus_reference.description}; champion v{champion_version}: {versus_champion.description}",
        versus_reference,
        versus_champion,
        champion_version,
    )


# --- sampling with the exact sampled tokens ------------------------------------------------------------

# Pure ancestral sampling (no temperature, top-k or top-p): the samples then come from pi itself, which
# the Monte-Carlo KL estimate below needs to be unbiased.
KL_SAMPLING = SamplingSettings(max_new_tokens=128, top_k=0, top_p=1.0, temperature=1.0, seed=0, batch_size=16)


@dataclass(frozen=True)
class TrainingHealth:
    passed: bool
    steps: int
    all_finite: bool
    mean_margin_first_window: float
    mean_margin_last_window: float
    mean_loss_first_window: float
    mean_loss_last_window: float
    signal: str = "rewards/margins"
    """What had to grow: the reward margin (pair losses) or GRPO's mean reward (`reward`)."""


def training_health(history: Sequence[dict[str, float]]) -> TrainingHealth:
    """Healthy: every step's loss and reward margin is finite, and the reward margin grew.

    The margin, not the loss, is what must improve: with the sequential KL inside beta (TDPO2) the loss
    of a well-learning run can rise, because SeqKL(y_l) grows as the policy moves away from the rejected
    answer. The margin (beta times the weighted chosen-minus-rejected log-ratio, TRL's rewards/margins)
    grows under every loss tidpo trains. Quarter-length windows: single steps are too noisy to compare.

    A GRPO run (its history has TRL's GRPOTrainer metrics, no margin) must raise its mean sampled reward
    (`reward`) instead; a step that re-uses the previous step's completions (grpo_num_iterations > 1)
    samples nothing and logs a NaN reward, which is left out rather than counted as non-finite.
    """
    grpo = bool(history) and not any("rewards/margins" in h for h in history) and any("reward" in h for h in history)
    signal = "reward" if grpo else "rewards/margins"
    losses = [float(h["loss"]) for h in history]
    margins = [float(h[signal]) for h in history if signal in h]
    if grpo:
        margins = [m for m in margins if not math.isnan(m)]
    finite = bool(losses) and bool(margins) and all(math.isfinite(x) for x in losses + margins)
    window = max(1, len(losses) // 4)

    def window_mean(values: list[float], last: bool) -> float:
        if not values:
            return float("nan")
        part = values[-window:] if last else values[:window]
        return sum(part) / len(part)

    first_margin, last_margin = window_mean(margins, False), window_mean(margins, True)
    return TrainingHealth(
        passed=bool(finite and last_margin > first_margin),
        steps=len(losses),
        all_finite=finite,
        mean_margin_first_window=first_margin,
        mean_margin_last_window=last_margin,
        mean_loss_first_window=window_mean(losses, False),
        mean_loss_last_window=window_mean(losses, True),
        signal=signal,
    )


def is_pure_sampling(settings: SamplingSettings) -> bool:
    return settings.temperature == 1.0 and settings.top_k in (0, None) and settings.top_p >= 1.0


@dataclass(frozen=True)
class SampledResponses:
    """Responses sampled from one model, with the exact token ids that were sampled.

    `response_ids` runs up to and including the first eos (if the model stopped within the budget);
    `texts` are those tokens decoded as `generation.sample_responses` decodes them (same prompts,
    same seeding, so the same texts).
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]


@torch.no_grad()
def sample_with_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings = KL_SAMPLING,
    progress: bool = False,
) -> SampledResponses:
    """`generation.sample_responses`, keeping the sampled token ids.

    Re-encoding decoded text would score a canonical tokenization rather than the sampled path, which
    biases a likelihood-ratio estimate; so the ids come straight from `generate`.
    """
    stops = set(stop_token_ids(tokenizer))  # eos, or a chat model's end-of-turn token
    out = SampledResponses([], [], [], [], [])
    for chunk, encoded, rows in sample_batches(model, tokenizer, prompts, settings, progress):
        for prompt, ids, row in zip(chunk, encoded, rows, strict=True):
            end = next((i for i, token in enumerate(row) if token in stops), None)
            finished = end is not None
            out.prompts.append(prompt)
            out.prompt_ids.append(ids)
            out.response_ids.append(row[: end + 1] if finished else row)
            out.finished.append(finished)
            out.texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """log pi(y_t | x, y_<t) of every response token, one array per (prompt, response), right-padded batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    result: list[np.ndarray] = []
    for start in range(0, len(prompt_token_ids), batch_size):
        prompts = prompt_token_ids[start : start + batch_size]
        responses = response_token_ids[start : start + batch_size]
        rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logps = token_logps(logits, input_ids).cpu().numpy()
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            result.append(logps[i, len(p) : len(p) + len(r)].astype(np.float64))
    model.train(was_training)
    return result


# --- KL to the reference and generation diversity -------------------------------------------------------


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[sum_t log pi(y_t|.) - log ref(y_t|.)] over sampled responses,
    with the standard error of that mean (`stderr`, NaN for fewer than two samples)."""

    kl: float
    stderr: float
    kl_per_token: float
    samples: int
    per_sample: np.ndarray

    def as_metrics(self) -> dict[str, float]:
        return {
            "kl_to_reference": self.kl,
            "kl_to_reference_stderr": self.stderr,
            "kl_per_token": self.kl_per_token,
            "kl_samples": float(self.samples),
        }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of Monte-Carlo samples: std(values, ddof=1) / sqrt(n).

    NaN mean and stderr for no values; a single value has a mean but no stderr (NaN).
    """
    x = np.asarray(values, np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    stderr = float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), stderr


def kl_from_logps(
    policy_logps: Sequence[Sequence[float]], reference_logps: Sequence[Sequence[float]]
) -> KLEstimate:
    """The estimate from per-token log-probs of responses sampled from the policy.

    Each sample contributes s_i = sum_t [log pi - log ref]; the estimate is mean(s_i), its standard error
    std(s_i, ddof=1) / sqrt(n) (`mean_and_stderr`). The estimate can be negative by sampling noise (the
    true KL cannot), which is why it is always reported with its standard error.
    """
    sums, tokens = [], 0
    for p, r in zip(policy_logps, reference_logps, strict=True):
        p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
        if p.shape != r.shape:
            raise ValueError(f"policy and reference log-probs differ in length: {p.shape} vs {r.shape}")
        sums.append(float(np.sum(p - r)))
        tokens += p.size
    per_sample = np.asarray(sums, np.float64)
    n = per_sample.size
    kl, stderr = mean_and_stderr(per_sample)
    per_token = float(per_sample.sum() / max(tokens, 1)) if n else float("nan")
    return KLEstimate(kl, stderr, per_token, n, per_sample)


def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | None = None,
    settings: SamplingSettings = KL_SAMPLING,
    *,
    samples: SampledResponses | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[KLEstimate, SampledResponses]:
    """Sample from the policy (or take given samples of it) and estimate KL(pi || ref) on them.

    With `settings` other than pure sampling (temperature 1, no top-k/top-p) the samples come from a
    modified distribution and the estimate is only an approximation; callers should say so.
    """
    if samples is None:
        if prompts is None:
            raise ValueError("give prompts to sample from, or samples")
        samples = sample_with_tokens(policy, tokenizer, prompts, settings, progress=progress)
    pad = tokenizer.pad_token_id
    policy_logps = response_logps(policy, samples.prompt_ids, samples.response_ids, pad, batch_size)
    if reference is policy:
        reference_logps = policy_logps
    else:
        reference_logps = response_logps(reference, samples.prompt_ids, samples.response_ids, pad, batch_size)
    return kl_from_logps(policy_logps, reference_logps), samples


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


def diversity_metrics(samples: SampledResponses, stops: Collection[int]) -> dict[str, float]:
    """distinct-1/2 over the sampled token ids (the `stops` tokens excluded), mean length in tokens, share that stopped."""
    stops = set(stops)
    tokens = [[t for t in ids if t not in stops] for ids in samples.response_ids]
    return {
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "mean_length": float(np.mean([len(t) for t in tokens])) if tokens else float("nan"),
        "eos_rate": float(np.mean(samples.finished)) if samples.finished else float("nan"),
    }


# --- critical tokens (synthetic data: meta carries the critical spans) ------------------------------------


def importance_precision_at_k(
    weights: Sequence[float], span_token_indices: Sequence[int], k: int | None = None
) -> float:
    """Share of the k highest-weighted tokens that lie in the critical span (k = span size by default).

    Ties at the k-th place are broken uniformly at random and the *expected* precision is returned, so
    the result is deterministic: uniform weights give |span| / T exactly (the chance level), a weight
    vector that is higher on every span token than elsewhere gives 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain non-finite values")
    span = sorted({int(i) for i in span_token_indices})
    if not span:
        raise ValueError("the span has no tokens")
    if span[0] < 0 or span[-1] >= w.size:
        raise ValueError(f"span token indices {span[0]}..{span[-1]} outside 0..{w.size - 1}")
    k = len(span) if k is None else int(k)
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, w.size)
    threshold = np.sort(w)[::-1][k - 1]
    above, tied = w > threshold, w == threshold
    in_span = np.zeros(w.size, dtype=bool)
    in_span[span] = True
    free_places = k - int(above.sum())
    hits = float((above & in_span).sum()) + free_places * float((tied & in_span).sum()) / float(tied.sum())
    return hits / k


def critical_phrase_rate(
    samples: Sequence[str], chosen_phrases: Sequence[str], rejected_phrases: Sequence[str]
) -> dict[str, float]:
    """Which critical phrase the sampled answers use, sample i judged against its own prompt's phrases.

    chosen_rate / rejected_rate: among samples containing either phrase, the share containing only the
    chosen / only the rejected one (both_rate: both; the three sum to 1; NaN when no sample contains
    either); neither_rate: share of all samples containing neither. Matching ignores case and runs of
    whitespace.
    """
    if not len(samples) == len(chosen_phrases) == len(rejected_phrases):
        raise ValueError(
            f"one chosen and one rejected phrase per sample: {len(samples)} samples, "
            f"{len(chosen_phrases)} chosen, {len(rejected_phrases)} rejected phrases"
        )
    counts = {"chosen": 0, "rejected": 0, "both": 0, "neither": 0}
    for text, chosen, rejected in zip(samples, chosen_phrases, rejected_phrases, strict=True):
        has_c, has_r = contains_phrase(text, chosen), contains_phrase(text, rejected)
        key = "both" if has_c and has_r else "chosen" if has_c else "rejected" if has_r else "neither"
        counts[key] += 1
    n = len(samples)
    matched = counts["chosen"] + counts["rejected"] + counts["both"]

    def share(value: int, total: int) -> float:
        return value / total if total else float("nan")

    return {
        "chosen_rate": share(counts["chosen"], matched),
        "rejected_rate": share(counts["rejected"], matched),
        "both_rate": share(counts["both"], matched),
        "neither_rate": share(counts["neither"], n),
        "matched": float(matched),
        "samples": float(n),
    }


def has_critical_spans(pair: PreferencePair) -> bool:
    meta = pair.meta or {}
    return all(isinstance(meta.get(k), list | tuple) and len(meta[k]) == 2 for k in ("chosen_span", "rejected_span"))


def has_critical_phrases(pair: PreferencePair) -> bool:
    return critical_phrases(pair) is not None


@dataclass(frozen=True)
class SpanResponse:
    """One response of a pair with a critical span: its encoding and the span's token indices."""

    pair_id: str
    side: str
    encoded: EncodedSequence
    span_tokens: list[int]


def span_responses(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], settings: EncodingSettings
) -> list[SpanResponse]:
    """Chosen and rejected responses of the pairs that carry spans; a span truncated away is left out."""
    out = []
    for pair in pairs:
        if not has_critical_spans(pair):
            continue
        for side in ("chosen", "rejected"):
            encoded = encode_response(tokenizer, pair.prompt, getattr(pair, side), settings)
            start, end = pair.meta[f"{side}_span"]
            span = tokens_overlapping(encoded.response_offsets, (int(start), int(end)))
            if span:
                out.append(SpanResponse(pair.pair_id, side, encoded, span))
    return out


IMPORTANCE_METHODS = ("attribution", "prior", "hybrid", "uniform")
# Importance variants the evaluation scores: an estimator, optionally with the eos token excluded (_no_eos).
DEFAULT_IMPORTANCE_VARIANTS = ("attribution", "attribution_no_eos", "surprisal", "surprisal_no_eos")
RESPONSE_THIRDS = ("start", "middle", "end")


def parse_importance_variant(variant: str) -> tuple[str, bool]:
    """`surprisal_no_eos` -> ("surprisal", True); the estimator must be one of importance.ESTIMATORS."""
    estimator, exclude_eos = (variant[: -len("_no_eos")], True) if variant.endswith("_no_eos") else (variant, False)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown importance variant {variant!r}; expected an estimator of {ESTIMATORS}, optionally + '_no_eos'")
    return estimator, exclude_eos


def importance_by_variant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[EncodedSequence],
    variants: Sequence[str],
    *,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    batch_size: int = 16,
    contrastive_models: tuple[PreTrainedModel, PreTrainedModel] | None = None,
) -> dict[str, list[TokenImportance]]:
    """importance.compute_token_importance of each importance variant (e.g. `surprisal_no_eos`).

    Each estimator runs once: a `_no_eos` variant is derived from its estimator's result
    (importance.without_eos), which is what the model pass with `exclude_eos` would give.
    """
    parsed = {variant: parse_importance_variant(variant) for variant in variants}
    estimates: dict[str, list[TokenImportance]] = {}
    for estimator in dict.fromkeys(estimator for estimator, _ in parsed.values()):
        estimates[estimator] = compute_token_importance(
            model,
            encoded,
            lambda_=weight_lambda,
            normalization=normalization,
            batch_size=batch_size,
            estimator=estimator,
            contrastive_models=contrastive_models if estimator == "contrastive" else None,
        )
    result: dict[str, list[TokenImportance]] = {}
    for variant, (estimator, exclude_eos) in parsed.items():
        if not exclude_eos:
            result[variant] = estimates[estimator]
            continue
        result[variant] = [
            without_eos(
                estimate,
                [t for t, on in zip(e.input_ids, e.response_mask, strict=True) if on],
                closing_token_id(tokenizer),  # a chat model's end-of-turn token
                lambda_=weight_lambda,
                normalization=normalization,
            )
            for estimate, e in zip(estimates[estimator], encoded, strict=True)
        ]
    return result


def span_third(span_tokens: Sequence[int], length: int) -> str:
    """Which third of a response of `length` tokens the span's centre falls in: start, middle or end."""
    if length < 1 or not span_tokens:
        raise ValueError("a span needs at least one token in a non-empty response")
    centre = (min(span_tokens) + max(span_tokens) + 1) / 2 / length
    return RESPONSE_THIRDS[min(int(centre * 3), 2)]


def precision_table(
    weights_by_method: dict[str, Sequence[np.ndarray]], spans: Sequence[Sequence[int]], k: int | None = None
) -> dict[str, float]:
    """Mean precision@k of each method's per-response weights, overall (`precision_at_k_<method>`) and by
    the third of the response the span sits in (`precision_at_k_<method>_<third>`, absent for an empty third)."""
    thirds = [span_third(span, len(next(iter(weights_by_method.values()))[i])) for i, span in enumerate(spans)]
    metrics: dict[str, float] = {}
    for method, all_weights in weights_by_method.items():
        scores = [importance_precision_at_k(w, span, k) for w, span in zip(all_weights, spans, strict=True)]
        metrics[f"precision_at_k_{method}"] = float(np.mean(scores))
        for third in RESPONSE_THIRDS:
            in_third = [score for score, where in zip(scores, thirds, strict=True) if where == third]
            if in_third:
                metrics[f"precision_at_k_{method}_{third}"] = float(np.mean(in_third))
    for third in RESPONSE_THIRDS:
        metrics[f"critical_responses_{third}"] = float(sum(where == third for where in thirds))
    return metrics


def critical_token_precision(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    *,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    k: int | None = None,
    batch_size: int = 16,
    variants: Sequence[str] = ("attribution",),
    contrastive_models: tuple[PreTrainedModel, PreTrainedModel] | None = None,
) -> dict[str, float]:
    """Mean importance precision@k over the chosen and rejected responses of pairs with critical spans.

    attribution: the model's gradient attribution I; prior: the Gaussian prior; hybrid: their mix with
    `weight_lambda` (what TI-DPO trains with); uniform: all weights equal, whose expected precision is
    the span's share of the response, |span| / T (chance level). Each further variant of `variants`
    (`surprisal`, `contrastive`, `*_no_eos`; see importance.py) adds its raw estimate
    (`precision_at_k_<variant>`) and its hybrid weights (`precision_at_k_hybrid_<variant>`). Every figure
    also comes per third of the response the span sits in. Empty dict when no pair has a span.
    """
    responses = span_responses(tokenizer, pairs, settings)
    if not responses:
        return {}
    encoded = [r.encoded for r in responses]
    usable = [
        variant
        for variant in dict.fromkeys(("attribution", *variants))
        if parse_importance_variant(variant)[0] != "contrastive" or contrastive_models is not None
    ]
    computed = importance_by_variant(
        model,
        tokenizer,
        encoded,
        usable,
        weight_lambda=weight_lambda,
        normalization=normalization,
        batch_size=batch_size,
        contrastive_models=contrastive_models,
    )
    by_method: dict[str, list[np.ndarray]] = {}
    for variant, estimates in computed.items():
        # The paper's hybrid keeps its plain name ("hybrid"); every other variant's is "hybrid_<variant>".
        by_method[variant] = [i.attribution for i in estimates]
        by_method["hybrid" if variant == "attribution" else f"hybrid_{variant}"] = [i.weight for i in estimates]
    by_method["prior"] = [i.prior for i in computed["attribution"]]
    by_method["uniform"] = [np.ones_like(i.weight) for i in computed["attribution"]]
    metrics = precision_table(by_method, [r.span_tokens for r in responses], k)
    metrics["critical_responses"] = float(len(responses))
    metrics["mean_span_tokens"] = float(np.mean([len(r.span_tokens) for r in responses]))
    return metrics


# --- the whole evaluation of one model --------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """What `evaluate_model` measures and how; defaults fit the embedded tiny model on a CPU."""

    beta: float = 0.1
    batch_size: int = 32
    encoding: EncodingSettings = EncodingSettings()
    sample_prompts: int = 64
    """Eval prompts sampled for KL, diversity and the critical-phrase rate (0: skip those metrics)."""
    sampling: SamplingSettings = KL_SAMPLING
    critical_k: int | None = None
    critical_pairs: int | None = 64
    """Pairs (with spans, first by pair_id) whose attribution is computed for precision@k; None: all.
    Attribution costs a forward and backward pass per response, the most expensive metric here."""
    weight_lambda: float = 0.7
    weight_normalization: Normalization = "max"
    importance_variants: tuple[str, ...] = DEFAULT_IMPORTANCE_VARIANTS
    """Importance estimators scored by precision@k beside the paper's attribution (critical_token_precision)."""


@dataclass
class ModelEvaluation:
    metrics: dict[str, float]
    samples: SampledResponses | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    """Metric group -> why it was not measured."""


def sample_prompt_pairs(pairs: Sequence[PreferencePair], n: int) -> list[PreferencePair]:
    """The eval pairs whose prompts are sampled: the first n by pair_id (stable as the corpus grows little)."""
    return sorted(pairs, key=lambda p: p.pair_id)[: max(n, 0)]


def evaluate_model(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EvalSettings = EvalSettings(),
    *,
    reference_scores: PairScores | None = None,
    progress: bool = False,
) -> ModelEvaluation:
    """Every held-out metric of `model` against `reference` on the eval pairs.

    Preference metrics (accuracy, margin, win rates), KL(model || reference) with its standard error,
    generation diversity, and on pairs with critical spans (the synthetic corpus) importance
    precision@k and the critical-phrase rate. Pass `model=reference` for the reference's own row.
    Runs under the thread policy for the two models (tidpo_core.runtime.threads).
    """
    with threads_for(model, reference):
        return _evaluate_model(model, reference, tokenizer, pairs, settings, reference_scores, progress)


def _evaluate_model(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EvalSettings,
    reference_scores: PairScores | None,
    progress: bool,
) -> ModelEvaluation:
    skipped: dict[str, str] = {}
    if reference_scores is None:
        reference_scores = score_pairs(reference, tokenizer, pairs, settings.encoding, settings.batch_size, progress)
    scores = reference_scores if model is reference else score_pairs(
        model, tokenizer, pairs, settings.encoding, settings.batch_size, progress
    )
    metrics = preference_metrics(scores, reference_scores, settings.beta)

    samples = None
    chosen_pairs = sample_prompt_pairs(pairs, settings.sample_prompts)
    if chosen_pairs:
        estimate, samples = kl_to_reference(
            model,
            reference,
            tokenizer,
            [p.prompt for p in chosen_pairs],
            settings.sampling,
            batch_size=settings.batch_size,
            progress=progress,
        )
        metrics.update(estimate.as_metrics())
        metrics.update(diversity_metrics(samples, stop_token_ids(tokenizer)))
        if not is_pure_sampling(settings.sampling):
            skipped["kl_exactness"] = (
                "samples were drawn with temperature/top-k/top-p: the KL estimate is of the modified distribution"
            )
    else:
        skipped["sampling"] = "no eval prompts to sample (sample_prompts = 0 or no eval pairs)"

    span_pairs = sorted((p for p in pairs if has_critical_spans(p)), key=lambda p: p.pair_id)
    if settings.critical_pairs is not None:
        span_pairs = span_pairs[: max(settings.critical_pairs, 0)]
    critical = critical_token_precision(
        model,
        tokenizer,
        span_pairs,
        settings.encoding,
        weight_lambda=settings.weight_lambda,
        normalization=settings.weight_normalization,
        k=settings.critical_k,
        batch_size=settings.batch_size,
        variants=settings.importance_variants,
    )
    if critical:
        metrics.update(critical)
    else:
        skipped["critical_tokens"] = (
            "no eval pair carries chosen_span/rejected_span in its meta (non-synthetic data)"
            if not any(has_critical_spans(p) for p in pairs)
            else "critical_pairs is 0"
        )
    if samples is not None:
        phrase_pairs = [(p, text) for p, text in zip(chosen_pairs, samples.texts, strict=True) if has_critical_phrases(p)]
        if phrase_pairs:
            rates = critical_phrase_rate(
                [t for _, t in phrase_pairs],
                [p.meta["chosen_phrase"] for p, _ in phrase_pairs],
                [p.meta["rejected_phrase"] for p, _ in phrase_pairs],
            )
            metrics.update({f"critical_phrase_{k}": v for k, v in rates.items()})
        else:
            skipped["critical_phrases"] = "no sampled eval pair carries chosen_phrase/rejected_phrase in its meta"
    return ModelEvaluation(metrics=metrics, samples=samples, skipped=skipped)


# --- token-importance pictures --------------------------------------------------------------------------


def _prompt_title(prompt: str, width: int = 110, turns: int = 4) -> str:
    """A heatmap section's title: the prompt's turns one per line ("user: ...", "assistant: ..."), each cut
    to `width` characters; of a longer conversation the last `turns` turns, under a line that says how many
    came before."""
    lines = readable_prompt(prompt, width).split("\n")
    if len(lines) > turns:
        earlier = len(lines) - turns
        lines = [f"… {earlier} earlier turn{'s' if earlier > 1 else ''}", *lines[-turns:]]
    return "\n".join(lines)


def best_importance_variant(metrics: dict[str, float], candidates: Sequence[str] = DEFAULT_IMPORTANCE_VARIANTS) -> str | None:
    """The variant (other than the paper's attribution) whose hybrid weights scored the highest precision@k."""
    scored = {v: metrics[f"precision_at_k_hybrid_{v}"] for v in candidates if f"precision_at_k_hybrid_{v}" in metrics}
    scored = {v: value for v, value in scored.items() if v != "attribution" and math.isfinite(value)}
    return max(scored, key=lambda v: scored[v]) if scored else None


def importance_heatmap_sections(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    settings: EncodingSettings = EncodingSettings(),
    *,
    anchors: dict[str, str] | None = None,
    weight_lambda: float = 0.7,
    normalization: Normalization = "max",
    batch_size: int = 16,
    compare_with: str | None = None,
) -> list[Any]:
    """Heatmap sections (tidpo_core.evaluation.plots.HeatmapSection) of the pairs' chosen, rejected and anchor responses.

    Each token is shaded by its hybrid weight under `model` (the TI-DPO weight, mean 1 per response);
    tokens of the critical span, where the pair's meta has one, are outlined. With `compare_with` (an
    importance variant, e.g. `surprisal_no_eos`) each chosen and rejected row is followed by the same
    response under that estimator's hybrid weights, so the paper's weights and the other sit side by side.
    """
    from tidpo_core.evaluation.plots import HeatmapRow, HeatmapSection, token_display_text

    items: list[tuple[PreferencePair, str, str, EncodedSequence]] = []
    for pair in pairs:
        texts = {"chosen": pair.chosen, "rejected": pair.rejected}
        if anchors and pair.pair_id in anchors:
            texts["anchor"] = anchors[pair.pair_id]
        for side, text in texts.items():
            items.append((pair, side, text, encode_response(tokenizer, pair.prompt, text, settings)))
    if not items:
        return []
    variants = ["attribution"] + ([compare_with] if compare_with and compare_with != "attribution" else [])
    with threads_for(model):
        weights_by_variant = importance_by_variant(
            model,
            tokenizer,
            [e for *_, e in items],
            variants,
            weight_lambda=weight_lambda,
            normalization=normalization,
            batch_size=batch_size,
        )
    sections: dict[str, Any] = {}
    for index, (pair, side, text, encoded) in enumerate(items):
        span: list[int] = []
        if side in ("chosen", "rejected") and has_critical_spans(pair):
            start, end = pair.meta[f"{side}_span"]
            span = tokens_overlapping(encoded.response_offsets, (int(start), int(end)))
        section = sections.setdefault(pair.pair_id, HeatmapSection(_prompt_title(pair.prompt), []))
        for variant in variants if side != "anchor" else variants[:1]:
            section.rows.append(
                HeatmapRow(
                    label=side if variant == "attribution" else f"{side}: {variant}",
                    tokens=token_display_text(text, encoded.response_offsets),
                    weights=[float(w) for w in weights_by_variant[variant][index].weight],
                    span=frozenset(span),
                )
            )
    return list(sections.values())
