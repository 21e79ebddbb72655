"""Token importance for TI-DPO (docs/method.md section 1): an importance estimate mixed with a Gaussian prior.

The paper's estimator (`attribution`, the default) is I_i = || d max_v z_{last, v} / d e_i ||_1: how much
each token's embedding moves the model's most confident next-token logit at the end of the sequence. The
Gaussian prior P(t) over response positions counters attribution's U-shaped bias toward the first and last
tokens. The hybrid weight w = lambda * I~ + (1 - lambda) * P is rescaled to mean 1 over the response, so
uniform weights are DPO.

Other estimators (docs/method.md section 1, other estimators), each giving a raw I >= 0 per response token that the same hybrid
combines with the prior:
- `surprisal`: I_t = -log pi(y_t | x, y_<t) under the scoring model, free from the forward pass that
  gives the reference log-probs (no backward).
- `contrastive`: I_t = |log pi_+(y_t | x, y_<t) - log pi_-(y_t | x, y_<t)|, the magnitude of the
  contrastive log-ratio that TIS-DPO (arXiv 2410.04350: w_t = k exp(mu clamp(log pi_+ / pi_-, L, U)))
  turns into weights. pi_+ / pi_- are two models that prefer the chosen / the rejected answers (TIS-DPO's
  SFT construction: the same base fine-tuned on the chosen and on the rejected responses). The sign is
  dropped so one formula serves chosen, rejected and anchor responses: a token matters when the two
  models disagree about it, whichever way.
`exclude_eos` stores I = 0 for the end-of-sequence token: under `max` and `sum` normalization it leaves
the normalization and keeps only the prior's term of the hybrid.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tidpo_core.batching.tokenization import EncodedSequence, pad_right
from tidpo_core.method.kl import reference_topk
from tidpo_core.method.logps import token_logps
from tidpo_core.runtime.threads import threads_for

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Normalization",
    "TokenImportance",
    "compute_token_importance",
    "gaussian_prior",
    "gradient_attribution",
    "attribution_and_logps",
    "hybrid_weights",
    "normalize_attribution",
]

Normalization = Literal["max", "sum", "softmax"]
_NORMALIZATIONS: tuple[str, ...] = ("max", "sum", "softmax")
Estimator = Literal["attribution", "surprisal", "contrastive"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def _last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token.

    For right padding this is attention_mask.sum(1) - 1; taking the largest attended index instead also
    holds for left padding or holes, at no cost.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask != 0, positions, -1).amax(dim=1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_logits(model: nn.Module, embeds: Tensor, attention_mask: Tensor, last: Tensor) -> Tensor:
    """[B, V] logits at each row's last real position."""
    rows = torch.arange(embeds.shape[0], device=embeds.device)
    if _accepts_logits_to_keep(model):
        # Projecting only the needed positions onto the vocabulary avoids a [B, T, V] logits tensor, which
        # for a 128k vocabulary is the largest allocation of the whole pass.
        keep, column = torch.unique(last, return_inverse=True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=keep).logits
        if logits.shape[1] == keep.numel():
            return logits[rows, column]
    else:
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    return logits[rows, last]


def gradient_attribution(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
) -> Tensor:
    """Per-token attribution I_i = ||d max_v z_{last,v} / d e_i||_1, as a [B, T] float32 tensor.

    Zero outside the response. Rows are independent: the per-row targets are summed and differentiated
    once, and each row's target depends on that row's embeddings only.
    """
    attribution, _ = attribution_and_logps(model, input_ids, attention_mask, response_mask, with_logps=False)
    return attribution


def attribution_and_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    with_logps: bool = True,
    topk: int = 0,
    topk_out: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradient attribution and, from the same forward pass, the model's per-token log-probs.

    The log-probs (position-aligned like `logps.token_logps`) are the reference log-probs that training
    would otherwise recompute every step; taking them here makes them free. With `topk` > 0 the same
    logits also give the k most likely tokens per position (`kl.reference_topk`), put into
    `topk_out` as "ids" and "logp": the cache that lets SeqKL run without the reference.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            "input_ids, attention_mask and response_mask must share one [B, T] shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    was_training = model.training
    # Dropout would make the attribution random; eval mode also matches how the reference model scores.
    model.eval()
    logps = None
    try:
        with torch.enable_grad():
            # Detached leaf: gradients are taken w.r.t. the embeddings only, so the parameters get no .grad
            # and a frozen reference model works as well as the trainable policy.
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            last = _last_positions(attention_mask)
            if with_logps:
                logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
                logps = token_logps(logits.detach(), input_ids).float()
                if topk > 0 and topk_out is not None:
                    topk_out["ids"], topk_out["logp"] = reference_topk(logits.detach(), topk)
                logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
            else:
                logits = _last_logits(model, embeds, attention_mask, last)
            target = logits.max(dim=-1).values.sum()
            (grad,) = torch.autograd.grad(target, embeds)
    finally:
        model.train(was_training)
    # float32 before the reduction: summing thousands of bf16 magnitudes loses most of their digits.
    attribution = grad.float().abs().sum(dim=-1)
    return attribution * (response_mask != 0).to(attribution.dtype), logps


def gaussian_prior(length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """P(t) = exp(-1/2 ((t - mu) / sigma)^2) for t = 0..T-1, mu = (T-1)/2, sigma = T/4 (peak 1 mid-response)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length == 0:
        return torch.zeros(0, dtype=dtype)
    t = torch.arange(length, dtype=torch.float64)
    mu = (length - 1) / 2
    sigma = length / 4
    return torch.exp(-0.5 * ((t - mu) / sigma) ** 2).to(dtype)


def normalize_attribution(
    attribution: Tensor, method: Normalization = "max", temperature: float = 1.0
) -> Tensor:
    """Normalize one response's attributions: I / max I, I / sum I, or softmax(I / temperature).

    "max" (the default) puts I~ in [0, 1] like the prior, so lambda weighs comparable terms; "sum" and
    "softmax" give a distribution summing to 1, whose entries shrink as 1/T against the prior. For "max"
    and "sum", an all-zero attribution (nothing to normalize by) stays zero.
    """
    if attribution.dim() != 1:
        raise ValueError(f"attribution must be 1-D (one response), got shape {tuple(attribution.shape)}")
    if method not in _NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; expected one of {_NORMALIZATIONS}")
    values = attribution if attribution.is_floating_point() else attribution.float()
    if values.numel() == 0:
        return values.clone()
    if method == "softmax":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return torch.softmax(values / temperature, dim=0)
    scale = values.max() if method == "max" else values.sum()
    if scale <= 0:
        return torch.zeros_like(values)
    return values / scale


def hybrid_weights(
    attribution: Tensor,
    lambda_: float = 0.7,
    normalization: Normalization = "max",
    temperature: float = 1.0,
) -> Tensor:
    """w = lambda * normalize(I) + (1 - lambda) * P(t), rescaled so mean(w) = 1 over the response.

    lambda = 0 is the prior alone (ablation "without gradient attribution"), lambda = 1 the attribution
    alone ("without Gaussian prior"). If w sums to zero (lambda = 1 with zero attribution) the weights fall
    back to uniform ones, i.e. plain DPO for that response.
    """
    _check_lambda(lambda_)
    if attribution.dim() != 1:
        raise ValueError(f"attribution must be 1-D (one response), got shape {tuple(attribution.shape)}")
    out_dtype = attribution.dtype if attribution.is_floating_point() else torch.float32
    length = attribution.numel()
    if length == 0:
        return torch.zeros(0, dtype=out_dtype)
    if not bool(torch.isfinite(attribution).all()):
        # A NaN/inf here (e.g. bf16 overflow) would silently poison the loss of every batch it lands in.
        raise ValueError("attribution contains non-finite values")
    # float64 so the mean-1 rescaling is exact to well below float32 resolution.
    normalized = normalize_attribution(attribution.double(), normalization, temperature)
    weights = lambda_ * normalized + (1.0 - lambda_) * gaussian_prior(length, torch.float64)
    total = float(weights.sum())
    if not total > 0 or not math.isfinite(total):
        return torch.ones(length, dtype=out_dtype)
    return (weights * (length / total)).to(out_dtype)


def _check_lambda(lambda_: float) -> None:
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must lie in [0, 1], got {lambda_}")


@dataclass(frozen=True, eq=False)
class TokenImportance:
    """Importance of one response's tokens (eos included); every array has the response's length.

    eq=False: the generated __eq__ would compare arrays with ==, which has no single truth value.
    """

    attribution: np.ndarray  # raw importance I per response token (float32), of whichever estimator
    prior: np.ndarray  # Gaussian prior P(t)
    weight: np.ndarray  # hybrid weight, mean 1
    reference_logp: np.ndarray  # log pi(y_t | x, y_<t) under the model that made the attribution
    reference_topk_ids: np.ndarray | None = None  # [T, k] int32: that model's k likeliest tokens per position
    reference_topk_logp: np.ndarray | None = None  # [T, k] float32: their log-probabilities


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _no_grad_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, topk: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token log-probs (and the top-k cache) of one forward without gradients, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        model.train(was_training)
    out: dict[str, Tensor] = {}
    if topk > 0:
        out["ids"], out["logp"] = reference_topk(logits, topk)
    return token_logps(logits, input_ids).float(), out


def estimate_importance(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    estimator: Estimator = "attribution",
    contrastive_models: tuple[nn.Module, nn.Module] | None = None,
    topk: int = 0,
    topk_out: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Raw importance I ``[B, T]`` (zero outside the response) of one estimator, and `model`'s per-token
    log-probs from the same forward (the reference log-probs training reads)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    on_response = (response_mask != 0).float()
    if estimator == "attribution":
        attribution, logps = attribution_and_logps(
            model, input_ids, attention_mask, response_mask, topk=topk, topk_out=topk_out
        )
        assert logps is not None
        return attribution, logps
    logps, cache = _no_grad_logps(model, input_ids, attention_mask, topk)
    if topk_out is not None:
        topk_out.update(cache)
    if estimator == "surprisal":
        return -logps * on_response, logps
    if contrastive_models is None:
        raise ValueError("estimator 'contrastive' needs contrastive_models (a positive and a negative model)")
    positive, negative = (_no_grad_logps(m, input_ids, attention_mask, 0)[0] for m in contrastive_models)
    return (positive - negative).abs() * on_response, logps


def _eos_positions(response_ids: Tensor, eos_token_id: int | None) -> Tensor:
    if eos_token_id is None:
        return torch.zeros_like(response_ids, dtype=torch.bool)
    return response_ids == eos_token_id


def without_eos(
    importance: TokenImportance,
    response_ids: Sequence[int],
    eos_token_id: int,
    *,
    lambda_: float = 0.7,
    normalization: Normalization = "max",
    temperature: float = 1.0,
) -> TokenImportance:
    """The same estimate with the end-of-sequence token given I = 0 and the hybrid weights recomputed:
    what `compute_token_importance(..., exclude_eos=True)` returns, without a second model pass."""
    raw = torch.from_numpy(importance.attribution.copy())
    raw[_eos_positions(torch.as_tensor(list(response_ids)), eos_token_id)] = 0.0
    weight = hybrid_weights(raw, lambda_, normalization, temperature)
    return dataclasses.replace(importance, attribution=raw.numpy(), weight=weight.numpy().astype(np.float32))


def compute_token_importance(
    model: nn.Module,
    sequences: Sequence[EncodedSequence],
    *,
    lambda_: float = 0.7,
    normalization: Normalization = "max",
    temperature: float = 1.0,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: bool = False,
    reference_topk: int = 0,
    estimator: Estimator = "attribution",
    exclude_eos: bool = False,
    eos_token_id: int | None = None,
    contrastive_models: tuple[nn.Module, nn.Module] | None = None,
) -> list[TokenImportance]:
    """Token importance for each sequence, in input order.

    `device` defaults to the model's; if given and different, the model is moved there (in place), and so
    are the contrastive models. `reference_topk` > 0 also keeps the model's top-k next-token distribution
    per response token. `exclude_eos` (with `eos_token_id`) gives the end-of-sequence token I = 0.
    """
    _check_importance_settings(lambda_, normalization, estimator, batch_size, exclude_eos, eos_token_id)
    device = _place_models(model, contrastive_models, device)
    weighing = _Weighing(lambda_, normalization, temperature, eos_token_id if exclude_eos else None)

    # Similar lengths per batch waste less compute on padding; results are put back in input order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
    results: list[TokenImportance | None] = [None] * len(sequences)
    with (
        threads_for(model, *(contrastive_models or ())),
        tqdm(total=len(sequences), desc=f"token importance ({estimator})", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask, response_mask = _padded_batch([sequences[i] for i in chunk], device)
            topk: dict[str, Tensor] = {}
            importance, logps = estimate_importance(
                model,
                input_ids,
                attention_mask,
                response_mask,
                estimator=estimator,
                contrastive_models=contrastive_models,
                topk=reference_topk,
                topk_out=topk,
            )
            importance, logps, input_ids = importance.cpu(), logps.cpu(), input_ids.cpu()
            topk = {name: value.cpu() for name, value in topk.items()}
            for row, index in enumerate(chunk):
                mask = response_mask[row].cpu() != 0
                results[index] = weighing.response(
                    importance[row][mask],
                    input_ids[row][mask],
                    logps[row][mask],
                    {name: value[row][mask] for name, value in topk.items()},
                )
            bar.update(len(chunk))
    return [r for r in results if r is not None]


def _check_importance_settings(
    lambda_: float,
    normalization: str,
    estimator: str,
    batch_size: int,
    exclude_eos: bool,
    eos_token_id: int | None,
) -> None:
    """Refuse bad settings before any model runs."""
    _check_lambda(lambda_)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {_NORMALIZATIONS}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exclude_eos and eos_token_id is None:
        raise ValueError("exclude_eos needs the tokenizer's eos_token_id")


def _place_models(
    model: nn.Module, contrastive_models: tuple[nn.Module, nn.Module] | None, device: torch.device | None
) -> torch.device:
    """The device to score on (the model's unless given), with every model moved there."""
    if device is None:
        return _model_device(model)
    if _model_device(model) != torch.device(device):
        model.to(device)
    for other in contrastive_models or ():
        if _model_device(other) != torch.device(device):
            other.to(device)
    return device


def _padded_batch(batch: Sequence[EncodedSequence], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask and response_mask ``[B, T]`` of `batch`, right-padded, on `device`.

    Any valid id pads: causal attention keeps pads from touching real tokens, and the response mask zeroes
    their importance.
    """
    input_ids = pad_right([s.input_ids for s in batch], 0, torch.long).to(device)
    attention_mask = pad_right([[1] * len(s.input_ids) for s in batch], 0, torch.long).to(device)
    response_mask = pad_right([s.response_mask for s in batch], 0, torch.long).to(device)
    return input_ids, attention_mask, response_mask


@dataclass(frozen=True)
class _Weighing:
    """How one response's raw importance becomes its TokenImportance (the hybrid's settings)."""

    lambda_: float
    normalization: Normalization
    temperature: float
    excluded_eos: int | None
    """The end-of-sequence id whose importance is set to 0, or None to keep it."""

    def response(
        self, importance: Tensor, token_ids: Tensor, logps: Tensor, topk: dict[str, Tensor]
    ) -> TokenImportance:
        """One response's values (its response tokens only) as a TokenImportance; `topk` is empty without a cache."""
        raw = importance.clone()
        if self.excluded_eos is not None:
            raw[_eos_positions(token_ids, self.excluded_eos)] = 0.0
        weight = hybrid_weights(raw, self.lambda_, self.normalization, self.temperature)
        return TokenImportance(
            attribution=raw.numpy().astype(np.float32),
            prior=gaussian_prior(raw.numel()).numpy(),
            weight=weight.numpy().astype(np.float32),
            reference_logp=logps.numpy().astype(np.float32),
            reference_topk_ids=topk["ids"].numpy().astype(np.int32) if topk else None,
            reference_topk_logp=topk["logp"].numpy().astype(np.float32) if topk else None,
        )
