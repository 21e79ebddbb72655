"""Batch layouts (tidpo_core.batching.packing): the shared-prompt layout by hand, the padded layout against the plain
per-row functions of tidpo_core.method.losses, and every loss equal in both layouts."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import TINY, build_tiny_data, reset_accelerate, single_thread

from tidpo_core.batching.features import TrainingCollator, stack_sides
from tidpo_core.batching.packing import PromptMismatchError, lay_out, pack_shared_prompt
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.training import compute_batch_loss, load_training_features, train

PAD = 0


def _stacked(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Stacked padded rows from (ids, prompt length) in stack_sides' order (side-major)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width))
    for r, (ids, prompt) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        response[r, prompt : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


def test_layout_of_two_pairs_by_hand():
    # pair 0: prompt [1, 2], chosen [3, 4], rejected [5], anchor [6, 7, 8]
    # pair 1: prompt [1, 9, 9], chosen [10], rejected [11, 12], anchor [13]
    stacked = _stacked(
        [
            ([1, 2, 3, 4], 2),
            ([1, 9, 9, 10], 3),  # chosen
            ([1, 2, 5], 2),
            ([1, 9, 9, 11, 12], 3),  # rejected
            ([1, 2, 6, 7, 8], 2),
            ([1, 9, 9, 13], 3),
        ]  # anchor
    )
    packed = pack_shared_prompt(stacked, 3, PAD)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 9, 9, 10, 11, 12, 13, PAD]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4], [0, 1, 2, 3, 3, 4, 3, 0]]
    assert packed.tokens == 15
    # Logits from the shortest prompt's last column (column 1) on: 7 kept columns.
    assert packed.first_kept == 1 and packed.logits_to_keep == 7
    allowed = packed.attention_mask[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # chosen: prompt + itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # rejected: prompt + itself, not chosen
        [1, 1, 0, 0, 0, 1, 0, 0],  # anchor
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ]
    assert packed.attention_mask[1, 0, 7].int().tolist() == [
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
    ]  # padding sees itself only
    # Kept index (column - 1) of the column predicting each stacked token; off-response tokens are not scored.
    assert packed.predictor[0].tolist() == [0, 0, 0, 1, 0]  # chosen 3 <- column 1, chosen 4 <- column 2
    assert packed.predictor[2].tolist() == [0, 0, 0, 0, 0]  # rejected 5 <- column 1 (the prompt's end)
    assert packed.predictor[4].tolist() == [0, 0, 0, 4, 5]  # anchor 6 <- 1, 7 <- column 5, 8 <- column 6
    assert packed.predictor[3].tolist() == [0, 0, 0, 1, 3]  # pair 1 rejected: 11 <- column 2, 12 <- column 4
    assert packed.scored[4].tolist() == [False, False, True, True, True]
    assert packed.columns[4].tolist() == [0, 0, 5, 6, 7]
    # Chosen and rejected end at column 5 (pair 1's rejected 12): the reference reads 6 columns, 5 kept.
    pairs = packed.first_sides(2)
    assert pairs.model_inputs()["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [1, 9, 9, 10, 11, 12]]
    assert pairs.model_inputs()["attention_mask"].shape == (2, 1, 6, 6) and pairs.logits_to_keep == 5
    assert pairs.prefix(torch.arange(14).view(2, 7)).tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]
    assert torch.equal(pairs.predictor, packed.predictor[:4])


def test_padded_layout_equals_the_per_row_loss_functions():
    """The padded layout's maps give what logps.token_logps / kl.token_kl / kl.token_kl_topk give on the same
    rows, restricted to scored tokens; its first-sides view is the first rows."""
    from tidpo_core.method.kl import coarsened_kl, kl_from_logits, reference_topk, token_kl, token_kl_topk
    from tidpo_core.method.logps import token_logps

    g = torch.Generator().manual_seed(7)
    stacked = _stacked([([1, 2, 3, 4], 2), ([5, 6, 7], 1), ([1, 2, 8], 2), ([5, 9, 9, 9, 9], 1)])
    rows, width, vocabulary = 4, stacked["input_ids"].shape[1], 11
    policy = torch.randn(rows, width, vocabulary, generator=g, dtype=torch.float64)
    reference = torch.randn(rows, width, vocabulary, generator=g, dtype=torch.float64)
    layout = lay_out(stacked, 2, PAD, "padded")
    scored = (stacked["response_mask"] != 0) & (torch.arange(width) > 0)
    assert torch.equal(layout.scored, scored) and layout.tokens == 4 + 3 + 3 + 5

    torch.testing.assert_close(
        layout.token_logps(policy, stacked["input_ids"]), token_logps(policy, stacked["input_ids"]) * scored
    )
    torch.testing.assert_close(
        layout.per_token(kl_from_logits(reference, policy)), token_kl(reference, policy) * scored
    )
    ids, logp = reference_topk(reference, 4)
    lse = torch.logsumexp(policy, dim=-1)
    policy_top = layout.gather_vocabulary(policy, ids) - layout.per_token(lse).unsqueeze(-1)
    torch.testing.assert_close(
        layout.scored_only(coarsened_kl(logp, policy_top, whole_vocabulary=False)),
        token_kl_topk(ids, logp, policy) * scored,
    )
    first = layout.first_sides(1)
    assert torch.equal(first.model_inputs()["input_ids"], stacked["input_ids"][:2])
    assert torch.equal(first.prefix(policy), policy[:2]) and torch.equal(first.scored, scored[:2])


def test_sides_with_other_prompts_are_refused():
    stacked = _stacked([([1, 2, 3], 2), ([1, 7, 5], 2)])
    with pytest.raises(PromptMismatchError, match="other prompt tokens"):
        pack_shared_prompt(stacked, 2, PAD)
    with pytest.raises(PromptMismatchError, match="prompt lengths"):
        pack_shared_prompt(_stacked([([1, 2, 3], 2), ([1, 2, 5], 1)]), 2, PAD)


def test_attention_without_a_4d_mask_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="batch_layout: padded"):
        pack_shared_prompt(_stacked([([1, 2, 3], 2), ([1, 2, 5], 2)]), 2, PAD, attention="flash_attention_2")


@pytest.fixture(scope="module")
def tiny_cached(tmp_path_factory):
    with single_thread():
        return build_tiny_data(tmp_path_factory.mktemp("tiny_packing"), pairs=12, reference_topk=16)


CASES = {
    "dpo": dict(loss_type="dpo"),
    "ipo": dict(loss_type="ipo"),
    "simpo": dict(loss_type="simpo"),
    "tidpo": dict(loss_type="tidpo"),
    "tidpo_hidden": dict(loss_type="tidpo", triplet_space="hidden"),
}


def _moved_policy(path):
    """The reference with every weight nudged, so that log-ratios and the KL are not zero."""
    policy, tokenizer = load_model_and_tokenizer(path)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return policy, tokenizer


def _loss_and_grads(model, reference, batch, config, sides, pad, layout, attention=None):
    model.zero_grad(set_to_none=True)
    loss, stats, tokens = compute_batch_loss(
        model, reference, batch, config, sides, pad, batch_layout=layout, attention=attention
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, tokens, grads


def _assert_same(a, b, tolerance=1e-5):
    loss_a, stats_a, _, grads_a = a
    loss_b, stats_b, _, grads_b = b
    assert float(loss_b) == pytest.approx(float(loss_a), rel=tolerance, abs=tolerance)
    for key in stats_a:
        assert float(stats_b[key]) == pytest.approx(float(stats_a[key]), rel=1e-4, abs=1e-5), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    scale = max(g.abs().max() for g in grads_a.values())
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-4 * scale, rtol=1e-3), name


@pytest.mark.parametrize(
    ("case", "reference_kl"),
    [(case, "forward") for case in sorted(CASES)] + [("tidpo", "cached"), ("tidpo_hidden", "cached")],
)
def test_every_loss_equals_the_padded_layout_in_value_and_gradient(tiny_cached, tmp_path, case, reference_kl):
    config = tiny_cached.config(tmp_path, reference_kl=reference_kl, **CASES[case])
    loss_config = config.loss_config()
    policy, tokenizer = _moved_policy(tiny_cached.reference_path)
    reference = None
    if reference_kl == "forward" and loss_config.needs_kl:
        reference = load_model_and_tokenizer(tiny_cached.reference_path)[0]
    sides = ("chosen", "rejected", "anchor") if loss_config.needs_anchor else ("chosen", "rejected")
    features = load_training_features(config, tokenizer)[:5]
    batch = TrainingCollator(tokenizer.pad_token_id, sides)(features)
    padded = _loss_and_grads(policy, reference, batch, loss_config, sides, tokenizer.pad_token_id, "padded")
    shared = _loss_and_grads(
        policy, reference, batch, loss_config, sides, tokenizer.pad_token_id, "shared_prompt"
    )
    _assert_same(padded, shared)
    if loss_config.needs_kl:
        assert float(padded[1]["seq_kl/rejected"]) > 1e-3  # the KL term is live
    # The prompt is read once: fewer tokens than the padded rows hold.
    stacked = stack_sides(batch, sides, tokenizer.pad_token_id)
    assert shared[2] < padded[2] == int(stacked["attention_mask"].sum())


def test_eager_attention_gets_an_additive_mask_and_the_same_loss(tiny_cached, tmp_path):
    config = tiny_cached.config(tmp_path)
    policy, tokenizer = _moved_policy(tiny_cached.reference_path)
    reference = load_model_and_tokenizer(tiny_cached.reference_path)[0]
    sides = ("chosen", "rejected", "anchor")
    batch = TrainingCollator(tokenizer.pad_token_id, sides)(load_training_features(config, tokenizer)[:4])
    sdpa = _loss_and_grads(
        policy, reference, batch, config.loss_config(), sides, tokenizer.pad_token_id, "shared_prompt"
    )
    for model in (policy, reference):
        model.config._attn_implementation = "eager"
    eager = _loss_and_grads(
        policy, reference, batch, config.loss_config(), sides, tokenizer.pad_token_id, "shared_prompt"
    )
    _assert_same(sdpa, eager)
    packed = pack_shared_prompt(
        stack_sides(batch, sides, tokenizer.pad_token_id), 3, tokenizer.pad_token_id, "eager"
    )
    assert packed.attention_mask.dtype == torch.float32 and packed.attention_mask.max() == 0


def test_reference_log_probs_missing_from_the_batch_come_from_the_reference(tiny_cached, tmp_path):
    """A batch without stored reference log-probs (TRL's check of a live reference) gets them from the
    reference model, in both layouts; they equal the stored ones."""
    config = tiny_cached.config(tmp_path, loss_type="dpo")
    policy, tokenizer = load_model_and_tokenizer(tiny_cached.reference_path)
    reference = load_model_and_tokenizer(tiny_cached.reference_path)[0]
    sides = ("chosen", "rejected")
    batch = TrainingCollator(tokenizer.pad_token_id, sides)(load_training_features(config, tokenizer)[:4])
    live_batch = batch.without_reference_logps()
    for layout in ("padded", "shared_prompt"):
        with torch.no_grad():
            stored, stored_stats, _ = compute_batch_loss(
                policy, None, batch, config.loss_config(), sides, tokenizer.pad_token_id, batch_layout=layout
            )
            live, live_stats, _ = compute_batch_loss(
                policy,
                reference,
                live_batch,
                config.loss_config(),
                sides,
                tokenizer.pad_token_id,
                batch_layout=layout,
            )
        assert float(live) == pytest.approx(float(stored), abs=1e-5)
        assert float(live_stats["rewards/chosen"]) == pytest.approx(
            float(stored_stats["rewards/chosen"]), abs=1e-5
        )
    with pytest.raises(ValueError, match="reference_logps"):
        compute_batch_loss(policy, None, live_batch, config.loss_config(), sides, tokenizer.pad_token_id)


def test_a_training_run_is_the_same_in_both_layouts(tiny_cached, tmp_path):
    with single_thread():
        padded = train(tiny_cached.config(tmp_path / "padded", max_steps=3, batch_layout="padded"))
        reset_accelerate()
        shared = train(tiny_cached.config(tmp_path / "shared", max_steps=3))
        reset_accelerate()
    for a, b in zip(padded.history, shared.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["seq_kl/rejected"] == pytest.approx(a["seq_kl/rejected"], abs=1e-5)
    # The policy read fewer tokens for the same work: the prompt once per pair instead of three times.
    assert shared.history[-1]["num_tokens"] < padded.history[-1]["num_tokens"]
    with pytest.raises(ValueError, match="batch_layout must be"):
        tiny_cached.config(tmp_path, batch_layout="packed")
    assert TINY.vocab_size > 16  # the fixture's top-16 cache is a real (lower-bound) coarsening


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches_give_the_padded_log_probs_and_hidden_states(seed):
    """Random prompts and responses (an empty prompt among them) through a random Llama: every response
    token's log-prob and every side's pooled hidden state equal those of its own padded row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidpo_core.method.logps import token_logps
    from tidpo_core.training.forward import _pooled_hidden

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=PAD,
            attn_implementation="sdpa",
        )
    ).eval()
    batch, num_sides = 4, 3
    prompts = [torch.randint(1, 50, (int(n),)).tolist() for n in torch.randint(1, 7, (batch,))]
    prompts[1] = []  # no bos, no prompt: the first response token has no predictor in either layout
    rows = [
        (prompts[i] + torch.randint(1, 50, (int(torch.randint(1, 6, ())),)).tolist(), len(prompts[i]))
        for _ in range(num_sides)
        for i in range(batch)
    ]
    stacked = _stacked(rows)
    packed = pack_shared_prompt(stacked, num_sides, PAD)
    with torch.no_grad():
        out = model(**packed.model_inputs(), output_hidden_states=True)
        padded_out = model(
            input_ids=stacked["input_ids"],
            attention_mask=stacked["attention_mask"],
            output_hidden_states=True,
        )
    expected = token_logps(padded_out.logits, stacked["input_ids"]) * packed.scored
    assert torch.allclose(packed.token_logps(out.logits, stacked["input_ids"]), expected, atol=1e-5)
    assert not packed.scored[1, 0] and packed.scored[1, 1 : len(rows[1][0])].all()
    assert torch.allclose(
        _pooled_hidden(packed.hidden_per_token(out.hidden_states[-1]), stacked["response_mask"]),
        _pooled_hidden(padded_out.hidden_states[-1], stacked["response_mask"]),
        atol=1e-5,
    )


def test_models_the_4d_mask_cannot_serve_exactly_are_named_at_start(tiny_cached, tmp_path):
    from types import SimpleNamespace

    from tidpo_core.batching.packing import shared_prompt_obstacle

    assert shared_prompt_obstacle(SimpleNamespace(_attn_implementation="sdpa"), 321) is None
    assert "flash_attention_2" in shared_prompt_obstacle(
        SimpleNamespace(_attn_implementation="flash_attention_2"), 321
    )
    # Mistral-style: a window shorter than a sequence would be applied by the model, not by the 4-D mask.
    assert "sliding window of 256" in shared_prompt_obstacle(
        SimpleNamespace(_attn_implementation="sdpa", sliding_window=256), 321
    )
    assert (
        shared_prompt_obstacle(SimpleNamespace(_attn_implementation="sdpa", sliding_window=4096), 321) is None
    )
    # Qwen2-style: a window configured but switched off.
    assert (
        shared_prompt_obstacle(
            SimpleNamespace(_attn_implementation="sdpa", sliding_window=256, use_sliding_window=False), 321
        )
        is None
    )
    # The engine refuses before training, naming the fix.
    reference, _ = load_model_and_tokenizer(tiny_cached.reference_path)
    reference.config.sliding_window = 8
    reference.save_pretrained(tmp_path / "windowed")
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_cached.reference_path / name).exists():
            shutil.copy(tiny_cached.reference_path / name, tmp_path / "windowed" / name)
    with single_thread(), pytest.raises(ValueError, match="sliding window of 8.*set batch_layout: padded"):
        train(
            tiny_cached.config(tmp_path / "run", reference_model_path=str(tmp_path / "windowed"), max_steps=1)
        )
    reset_accelerate()


def _independent_tidpo_loss(policy, reference, rows, weights, config):
    """TI-DPO (docs/method.md sections 2-4) for pairs given as unpadded rows, written from docs/method.md alone: each
    sequence runs alone through both models, log-softmax over the whole vocabulary, plain loops."""

    def per_token(ids, prompt_length):
        ids_t = torch.tensor([ids])
        policy_logp = torch.log_softmax(policy(input_ids=ids_t).logits[0].double(), dim=-1)
        with torch.no_grad():
            reference_logp = torch.log_softmax(reference(input_ids=ids_t).logits[0].double(), dim=-1)
        rho, kl = [], []
        for t in range(prompt_length, len(ids)):  # response token t is predicted at position t - 1
            rho.append(policy_logp[t - 1, ids[t]] - reference_logp[t - 1, ids[t]])
            kl.append((reference_logp[t - 1].exp() * (reference_logp[t - 1] - policy_logp[t - 1])).sum())
        return rho, kl

    losses = []
    for pair, pair_weights in zip(rows, weights, strict=True):
        (rho_w, kl_w), (rho_l, kl_l), (rho_a, _) = (per_token(ids, prompt) for ids, prompt in pair)
        weighted_w = sum(w * r for w, r in zip(pair_weights[0], rho_w, strict=True))
        weighted_l = sum(w * r for w, r in zip(pair_weights[1], rho_l, strict=True))
        kl_term = config.alpha * (sum(kl_l) - sum(kl_w).detach())
        dpo_term = -torch.nn.functional.logsigmoid(config.beta * (weighted_w - weighted_l - kl_term))
        distance_w = sum(
            (a - b) ** 2 for a, b in zip(rho_a, rho_w, strict=False)
        )  # zip: the positions both have
        distance_l = sum((a - b) ** 2 for a, b in zip(rho_a, rho_l, strict=False))
        losses.append(
            dpo_term + config.gamma * torch.clamp(distance_w - distance_l + config.triplet_margin, min=0.0)
        )
    return torch.stack(losses).mean()


@pytest.mark.parametrize(
    ("layout", "reference_kl"),
    [("padded", "forward"), ("shared_prompt", "forward"), ("padded", "cached"), ("shared_prompt", "cached")],
)
def test_tidpo_loss_of_a_hand_batch_in_float64_equals_an_independent_implementation(layout, reference_kl):
    """Two pairs with unequal response lengths (2/3/4 and 3/1/2 tokens): the engine's TI-DPO loss and its
    gradient (KL inside beta, Eq. 13 triplet) equal docs/method.md computed row by row, with a live
    reference or with the reference's log-probs and top-k cached in the batch (k = the whole vocabulary,
    where the cached SeqKL is exact)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidpo_core.method.kl import reference_topk
    from tidpo_core.method.logps import token_logps
    from tidpo_core.method.losses import LossConfig

    def model(seed):
        torch.manual_seed(seed)
        return (
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=40,
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    pad_token_id=PAD,
                    attn_implementation="sdpa",
                )
            )
            .double()
            .eval()
        )

    policy, reference = model(0), model(1)
    prompts = [[1, 5, 6], [1, 7]]
    responses = [([11, 12], [13, 14, 15], [16, 17, 18, 19]), ([21, 22, 23], [24], [25, 26])]
    rows = [[(prompts[p] + r, len(prompts[p])) for r in responses[p]] for p in range(2)]
    weights = [[[1.5, 0.5], [0.8, 1.2, 1.0]], [[0.9, 1.1, 1.0], [1.0]]]
    config = LossConfig(gamma=1.0, triplet_margin=0.5)  # a hinge that is active, so both terms carry gradient

    sides = ("chosen", "rejected", "anchor")
    batch = {}
    for s, side in enumerate(sides):
        stacked = _stacked([rows[p][s] for p in range(2)])
        for key in ("input_ids", "attention_mask", "response_mask"):
            batch[f"{side}_{key}"] = stacked[key]
        side_weights = stacked["response_mask"].double().clone()
        if s < 2:
            for p in range(2):
                side_weights[p, side_weights[p] != 0] = torch.tensor(weights[p][s], dtype=torch.float64)
        batch[f"{side}_weights"] = side_weights
        if reference_kl == "cached":
            with torch.no_grad():
                ref_logits = reference(
                    input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]
                ).logits
            response = stacked["response_mask"].bool()
            batch[f"{side}_reference_logps"] = token_logps(ref_logits, stacked["input_ids"]) * response
            if s < 2:
                ids, logp = reference_topk(ref_logits, k=40)
                batch[f"{side}_reference_topk_ids"] = ids * response.unsqueeze(-1)
                batch[f"{side}_reference_topk_logp"] = logp.masked_fill(
                    ~response.unsqueeze(-1), float("-inf")
                )

    policy.zero_grad(set_to_none=True)
    live_reference = reference if reference_kl == "forward" else None
    loss, stats, _ = compute_batch_loss(
        policy, live_reference, batch, config, sides, PAD, batch_layout=layout
    )
    loss.backward()
    engine_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    assert float(stats["triplet"]) > 0 and float(stats["seq_kl/rejected"]) > 0

    policy.zero_grad(set_to_none=True)
    expected = _independent_tidpo_loss(policy, reference, rows, weights, config)
    expected.backward()
    assert loss.dtype == torch.float64
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10, abs=1e-12)
    for name, parameter in policy.named_parameters():
        # The padded layout agrees to 1e-12; the shared-prompt rows' gradients to about 1e-7 of the largest
        # entry (the 4-D mask changes sdpa's summation order in the backward), still far below float32's 1e-5.
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(engine_grads[name], parameter.grad, rtol=1e-6, atol=1e-6 * scale, msg=name)
