"""Token importance: prior, normalization, hybrid weights, and gradient attribution checked independently."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tidpo_core.batching.tokenization import encode_prompt_response, pad_right
from tidpo_core.method.importance import (
    TokenImportance,
    compute_token_importance,
    gaussian_prior,
    gradient_attribution,
    hybrid_weights,
    normalize_attribution,
    without_eos,
)
from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

CORPUS = [
    "How can I sleep better at night?",
    "Keep a regular schedule and avoid coffee after noon.",
    "What is the capital of France?",
    "The capital of France is Paris, a city on the Seine.",
    "Write a haiku about rain.",
    "Soft rain on the roof, the garden drinks in silence, puddles hold the sky.",
] * 5

MICRO = TinyModelConfig(
    vocab_size=300,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=MICRO.vocab_size)


def _float64_norms(model: nn.Module) -> nn.Module:
    """Make RMSNorm compute in the input dtype: Llama's upcasts to float32, which caps a float64 model."""
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":

            def forward(x: Tensor, norm: nn.Module = module) -> Tensor:
                return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

            module.forward = forward
    return model


@pytest.fixture(scope="module")
def model64(tokenizer):
    # Truly float64 end to end, so finite differences can be taken fine enough to check to ~1e-6.
    return _float64_norms(build_tiny_model(tokenizer, MICRO, seed=1).double().eval())


@pytest.fixture(scope="module")
def encoded(tokenizer):
    pairs = [
        ("How can I sleep better at night?", "Keep a regular schedule."),
        ("What is the capital of France?", "Paris."),
        ("Write a haiku about rain.", "Soft rain on the roof, the garden drinks in silence."),
        ("Hi", "Hello there, how can I help you today with your question?"),
        ("What is the capital of France?", "The capital of France is Paris."),
    ]
    return [encode_prompt_response(tokenizer, p, r) for p, r in pairs]


def _batch(sequences, extra_pad: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(s.input_ids) for s in sequences) + extra_pad
    ids = [s.input_ids + [0] * (width - len(s.input_ids)) for s in sequences]
    att = [[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in sequences]
    resp = [s.response_mask + [0] * (width - len(s.input_ids)) for s in sequences]
    return (
        pad_right(ids, 0, torch.long),
        pad_right(att, 0, torch.long),
        pad_right(resp, 0, torch.long),
    )


# ---------------------------------------------------------------- prior, normalization, hybrid


def test_gaussian_prior_hand_values() -> None:
    # T=5: mu=2, sigma=1.25.
    expected = [math.exp(-0.5 * (d / 1.25) ** 2) for d in (-2, -1, 0, 1, 2)]
    assert expected[0] == pytest.approx(math.exp(-1.28))
    assert expected[1] == pytest.approx(math.exp(-0.32))
    assert gaussian_prior(5).tolist() == pytest.approx(expected, rel=1e-6)
    assert gaussian_prior(5).dtype == torch.float32


def test_gaussian_prior_shape() -> None:
    assert gaussian_prior(0).numel() == 0
    assert gaussian_prior(1).tolist() == [1.0]
    for length in (6, 7, 40):
        p = gaussian_prior(length)
        assert int(p.argmax()) in {(length - 1) // 2, length // 2}
        assert torch.allclose(p, p.flip(0))
        assert (p > 0).all() and (p <= 1).all()
        # sigma = T/4: the ends sit at exp(-2 (T-1)^2 / T^2), well below the peak.
        assert float(p[0]) == pytest.approx(math.exp(-2 * ((length - 1) / length) ** 2), rel=1e-6)
    with pytest.raises(ValueError):
        gaussian_prior(-1)


def test_normalize_attribution_hand_values() -> None:
    attr = torch.tensor([1.0, 2.0, 1.0])
    assert normalize_attribution(attr, "max").tolist() == [0.5, 1.0, 0.5]
    assert normalize_attribution(attr, "sum").tolist() == [0.25, 0.5, 0.25]
    e = math.e
    assert normalize_attribution(attr, "softmax").tolist() == pytest.approx(
        [e / (2 * e + e**2), e**2 / (2 * e + e**2), e / (2 * e + e**2)], rel=1e-6
    )
    half = math.exp(0.5)
    assert normalize_attribution(attr, "softmax", temperature=2.0).tolist() == pytest.approx(
        [half / (2 * half + e), e / (2 * half + e), half / (2 * half + e)], rel=1e-6
    )
    zeros = torch.zeros(4)
    assert normalize_attribution(zeros, "max").tolist() == [0.0] * 4
    assert normalize_attribution(zeros, "sum").tolist() == [0.0] * 4
    assert normalize_attribution(zeros, "softmax").tolist() == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError):
        normalize_attribution(attr, "softmax", temperature=0.0)
    with pytest.raises(ValueError):
        normalize_attribution(attr, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        normalize_attribution(attr[None], "max")


def test_hybrid_weights_hand_computed_three_tokens() -> None:
    # T=3: mu=1, sigma=0.75, so P = [exp(-8/9), 1, exp(-8/9)]; I~ = I/max I = [0.25, 0.5, 1].
    p_end = math.exp(-0.5 * (1 / 0.75) ** 2)
    raw = [0.7 * 0.25 + 0.3 * p_end, 0.7 * 0.5 + 0.3 * 1.0, 0.7 * 1.0 + 0.3 * p_end]
    expected = [3 * w / sum(raw) for w in raw]
    assert expected == pytest.approx([0.50517, 1.10066, 1.39417], abs=1e-5)
    got = hybrid_weights(torch.tensor([1.0, 2.0, 4.0]), lambda_=0.7)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("normalization", ["max", "sum", "softmax"])
@pytest.mark.parametrize("lambda_", [0.0, 0.3, 0.7, 1.0])
def test_hybrid_weights_mean_one(normalization: str, lambda_: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for length in (1, 2, 17, 128):
        attr = torch.rand(length, generator=gen) * 50
        w = hybrid_weights(attr, lambda_, normalization, temperature=3.0)  # type: ignore[arg-type]
        assert w.shape == (length,)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)


def test_hybrid_weights_ablations() -> None:
    attr = torch.tensor([0.2, 3.0, 1.0, 0.5, 0.1])
    prior = gaussian_prior(5)
    assert torch.allclose(hybrid_weights(attr, lambda_=0.0), prior / prior.mean())
    assert torch.allclose(hybrid_weights(attr, lambda_=1.0), attr / attr.mean())
    # Attribution-only with nothing attributed: plain DPO for that response.
    assert hybrid_weights(torch.zeros(5), lambda_=1.0).tolist() == [1.0] * 5
    assert hybrid_weights(torch.zeros(0)).numel() == 0
    assert hybrid_weights(torch.tensor([7.0])).tolist() == [1.0]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            hybrid_weights(attr, lambda_=bad)
    with pytest.raises(ValueError):
        hybrid_weights(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- gradient attribution


class MeanPoolLM(nn.Module):
    """logits_t = W h_t with h_t the (masked) mean of e_0..e_t: d max_v z_last / d e_s = W[v*] / L."""

    def __init__(self, vocab: int = 11, hidden: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        # Dropout so that a forgotten eval() would show up as randomness.
        self.dropout = nn.Dropout(0.5)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        m = attention_mask[..., None].to(x.dtype)
        h = (x * m).cumsum(1) / m.cumsum(1).clamp(min=1)
        return SimpleNamespace(logits=self.head(self.dropout(h)))


def test_gradient_attribution_analytic() -> None:
    torch.manual_seed(0)
    model = MeanPoolLM().double()
    model.train()
    lengths = [6, 3, 5]
    width = 8
    ids = torch.randint(0, 11, (3, width))
    att = torch.zeros(3, width, dtype=torch.long)
    resp = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        att[row, :n] = 1
        resp[row, 1:n] = 1  # position 0 plays the prompt
    got = gradient_attribution(model, ids, att, resp)
    again = gradient_attribution(model, ids, att, resp)
    assert model.training  # mode restored
    assert torch.equal(got, again)  # dropout was off
    assert got.dtype == torch.float32

    emb = model.embed.weight.detach().numpy()
    head = model.head.weight.detach().numpy()
    for row, n in enumerate(lengths):
        h = emb[ids[row, :n].numpy()].mean(axis=0)
        v_star = int(np.argmax(head @ h))
        expected = np.zeros(width)
        expected[1:n] = np.abs(head[v_star]).sum() / n
        np.testing.assert_allclose(got[row].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_gradient_attribution_matches_finite_differences(model64, encoded) -> None:
    seq = encoded[0]
    ids, att, resp = _batch([seq])
    got = gradient_attribution(model64, ids, att, resp)[0].double()
    base = model64.get_input_embeddings()(ids).detach()
    last = len(seq.input_ids) - 1

    def target(embeds: Tensor) -> float:
        with torch.no_grad():
            return float(model64(inputs_embeds=embeds, attention_mask=att).logits[0, last].max())

    eps = 1e-5
    checked = [seq.prompt_length, seq.prompt_length + 2, last]
    for position in checked:
        total = 0.0
        for dim in range(base.shape[-1]):
            plus, minus = base.clone(), base.clone()
            plus[0, position, dim] += eps
            minus[0, position, dim] -= eps
            total += abs((target(plus) - target(minus)) / (2 * eps))
        assert float(got[position]) == pytest.approx(total, rel=1e-5)
    # Prompt tokens do influence the target but are masked out.
    assert float(got[: seq.prompt_length].abs().sum()) == 0.0
    assert (got[seq.prompt_length :] > 0).all()


def test_gradient_attribution_batched_equals_single(model64, encoded) -> None:
    batched = gradient_attribution(model64, *_batch(encoded, extra_pad=3))
    for row, seq in enumerate(encoded):
        n = len(seq.input_ids)
        single = gradient_attribution(model64, *_batch([seq]))[0]
        torch.testing.assert_close(batched[row, :n], single, rtol=1e-6, atol=1e-9)
        assert (batched[row, n:] == 0).all()


def test_gradient_attribution_leaves_no_grad(model64, encoded) -> None:
    model64.zero_grad(set_to_none=True)
    with torch.no_grad():  # must still work when the caller disabled autograd
        out = gradient_attribution(model64, *_batch(encoded[:2]))
    assert out.abs().sum() > 0
    assert all(p.grad is None for p in model64.parameters())


def test_compute_token_importance(model64, encoded) -> None:
    order = list(range(len(encoded)))
    random.Random(0).shuffle(order)
    sequences = [encoded[i] for i in order]
    results = compute_token_importance(model64, sequences, batch_size=2, progress=True)
    assert len(results) == len(sequences)
    for seq, result in zip(sequences, results, strict=True):
        assert isinstance(result, TokenImportance)
        n = seq.response_length
        for array in (result.attribution, result.prior, result.weight):
            assert array.shape == (n,)
            assert array.dtype == np.float32
        assert float(result.weight.astype(np.float64).mean()) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(result.prior, gaussian_prior(n).numpy())
        # Order restored: each result is its own sequence's attribution.
        ids, att, resp = _batch([seq])
        alone = gradient_attribution(model64, ids, att, resp)[0, seq.prompt_length :].numpy()
        np.testing.assert_allclose(result.attribution, alone, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            result.weight, hybrid_weights(torch.from_numpy(alone), 0.7).numpy(), rtol=1e-4, atol=1e-6
        )

    prior_only = compute_token_importance(model64, encoded[:2], lambda_=0.0)
    for seq, result in zip(encoded[:2], prior_only, strict=True):
        prior = gaussian_prior(seq.response_length).numpy()
        np.testing.assert_allclose(result.weight, prior / prior.mean(), rtol=1e-6)
    with pytest.raises(ValueError):
        compute_token_importance(model64, encoded, lambda_=2.0)
    assert compute_token_importance(model64, []) == []


# ---------------------------------------------------------------- other estimators (docs/method.md section 1, other estimators)


def test_surprisal_is_minus_the_log_prob_of_the_same_forward(model64, encoded) -> None:
    results = compute_token_importance(model64, encoded, estimator="surprisal", batch_size=2)
    for seq, result in zip(encoded, results, strict=True):
        ids = torch.tensor([seq.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=ids).logits[0].double(), dim=-1)
        expected = [
            -float(logp[t - 1, seq.input_ids[t]]) for t in range(seq.prompt_length, len(seq.input_ids))
        ]
        np.testing.assert_allclose(result.attribution, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.reference_logp, -np.asarray(expected), rtol=1e-5, atol=1e-6)
        assert float(result.weight.astype(np.float64).mean()) == pytest.approx(1.0, abs=1e-6)
    # The same log-probs as the attribution pass stores (training reads them as reference log-probs).
    by_attribution = compute_token_importance(model64, encoded, batch_size=2)
    for a, b in zip(results, by_attribution, strict=True):
        np.testing.assert_allclose(a.reference_logp, b.reference_logp, rtol=1e-5, atol=1e-6)


def test_contrastive_is_the_absolute_log_ratio_of_the_two_models(tokenizer, model64, encoded) -> None:
    positive = _float64_norms(build_tiny_model(tokenizer, MICRO, seed=2).double().eval())
    negative = _float64_norms(build_tiny_model(tokenizer, MICRO, seed=3).double().eval())
    results = compute_token_importance(
        model64, encoded, estimator="contrastive", contrastive_models=(positive, negative)
    )
    for seq, result in zip(encoded, results, strict=True):
        ids = torch.tensor([seq.input_ids])
        with torch.no_grad():
            plus = torch.log_softmax(positive(input_ids=ids).logits[0].double(), dim=-1)
            minus = torch.log_softmax(negative(input_ids=ids).logits[0].double(), dim=-1)
        expected = [
            abs(float(plus[t - 1, seq.input_ids[t]] - minus[t - 1, seq.input_ids[t]]))
            for t in range(seq.prompt_length, len(seq.input_ids))
        ]
        np.testing.assert_allclose(result.attribution, expected, rtol=1e-5, atol=1e-6)  # float32 log-probs
    # One model against itself: no token is singled out, the hybrid falls back to the prior's shape.
    same = compute_token_importance(
        model64, encoded[:1], estimator="contrastive", contrastive_models=(positive, positive)
    )
    assert np.all(same[0].attribution == 0)
    prior = gaussian_prior(encoded[0].response_length).numpy()
    np.testing.assert_allclose(same[0].weight, prior / prior.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="contrastive_models"):
        compute_token_importance(model64, encoded[:1], estimator="contrastive")
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_token_importance(model64, encoded[:1], estimator="saliency")


def test_exclude_eos_gives_the_eos_token_the_prior_term_only(tokenizer, model64, encoded) -> None:
    eos = tokenizer.eos_token_id
    kept = compute_token_importance(model64, encoded, eos_token_id=eos)
    excluded = compute_token_importance(model64, encoded, exclude_eos=True, eos_token_id=eos)
    for seq, a, b in zip(encoded, kept, excluded, strict=True):
        assert seq.input_ids[-1] == eos
        assert b.attribution[-1] == 0 and a.attribution[-1] > 0
        np.testing.assert_array_equal(a.attribution[:-1], b.attribution[:-1])
        # w = lambda * I / max(I without eos) + (1 - lambda) * P, rescaled to mean 1: by hand.
        raw = a.attribution[:-1].astype(np.float64)
        prior = gaussian_prior(len(a.attribution), torch.float64).numpy()
        hybrid = 0.7 * np.append(raw / raw.max(), 0.0) + 0.3 * prior
        np.testing.assert_allclose(b.weight, hybrid * len(hybrid) / hybrid.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="eos_token_id"):
        compute_token_importance(model64, encoded, exclude_eos=True)


def test_without_eos_equals_the_model_pass_with_exclude_eos(tokenizer, model64, encoded) -> None:
    eos = tokenizer.eos_token_id
    for estimator in ("attribution", "surprisal"):
        kept = compute_token_importance(
            model64, encoded, estimator=estimator, lambda_=0.6, normalization="sum"
        )
        direct = compute_token_importance(
            model64,
            encoded,
            estimator=estimator,
            lambda_=0.6,
            normalization="sum",
            exclude_eos=True,
            eos_token_id=eos,
        )
        for seq, estimate, expected in zip(encoded, kept, direct, strict=True):
            response_ids = [t for t, on in zip(seq.input_ids, seq.response_mask, strict=True) if on]
            derived = without_eos(estimate, response_ids, eos, lambda_=0.6, normalization="sum")
            np.testing.assert_array_equal(derived.attribution, expected.attribution)
            np.testing.assert_allclose(derived.weight, expected.weight, rtol=1e-6)
            np.testing.assert_array_equal(derived.reference_logp, estimate.reference_logp)
            assert estimate.attribution[-1] > 0  # the input is left as it was
