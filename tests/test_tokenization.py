"""Prompt/response encoding, span lookup and the preference collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidpo_core.batching.tokenization import (
    EncodedSequence,
    PreferenceCollator,
    encode_prompt_response,
    pad_right,
    response_token_ids,
    scatter_response_values,
    tokens_overlapping,
)
from tidpo_core.models.modeling import train_tokenizer

CORPUS = [
    "What should I do about a headache that will not go away?",
    "If the pain persists, please see a doctor as soon as possible.",
    "Drink water, rest in a dark room and avoid screens.",
    "How do I bake bread at home without a mixer?",
    "Knead the dough by hand for ten minutes and let it rise.",
    "Tell me a short story about a brave little fox.",
    "Once upon a time a fox crossed the frozen river alone.",
] * 5

PROMPT = "What should I do about a headache that will not go away?"
RESPONSE = "Drink water and rest. If the pain persists, see a doctor."


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=320)


def test_masks_and_lengths(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [tokenizer.bos_token_id, *prompt_ids, *response_ids, tokenizer.eos_token_id]
    assert len(enc.response_mask) == len(enc.input_ids)
    assert enc.prompt_length == 1 + len(prompt_ids)
    assert enc.response_length == len(response_ids) + 1
    assert enc.response_mask == [0] * enc.prompt_length + [1] * enc.response_length
    assert len(enc.response_offsets) == enc.response_length
    assert response_token_ids(enc) == [*response_ids, tokenizer.eos_token_id]
    assert enc.response_offsets[-1] == (len(RESPONSE), len(RESPONSE))


def test_without_eos(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, RESPONSE, add_eos=False)
    assert enc.input_ids[-1] != tokenizer.eos_token_id
    assert tokenizer.decode(response_token_ids(enc)) == RESPONSE


def test_empty_response_is_just_eos(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, "")
    assert response_token_ids(enc) == [tokenizer.eos_token_id]
    assert enc.response_offsets == [(0, 0)]


def test_truncation_keeps_prompt_end_and_response_start(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, RESPONSE, max_prompt_tokens=5, max_response_tokens=6)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert enc.prompt_length == 1 + 5
    assert enc.input_ids[1:6] == prompt_ids[-5:]
    assert tokenizer.decode(enc.input_ids[1:6]).endswith("away?")
    assert enc.response_length == 6
    assert response_token_ids(enc) == [*response_ids[:5], tokenizer.eos_token_id]
    assert RESPONSE.startswith(tokenizer.decode(response_ids[:5]))
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert len(enc.response_offsets) == 6


def test_offsets_map_back_to_response_text(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    ids = response_token_ids(enc)
    pieces = [RESPONSE[s:e] for s, e in enc.response_offsets[:-1]]
    assert "".join(pieces) == RESPONSE
    for token_id, piece in zip(ids[:-1], pieces, strict=True):
        assert tokenizer.decode([token_id]) == piece


def test_tokens_overlapping_finds_a_phrase(tokenizer) -> None:
    enc = encode_prompt_response(tokenizer, PROMPT, RESPONSE)
    start = RESPONSE.index("see a doctor")
    hits = tokens_overlapping(enc.response_offsets, (start, start + len("see a doctor")))
    assert hits == list(range(hits[0], hits[-1] + 1))  # contiguous
    ids = response_token_ids(enc)
    assert "see a doctor" in tokenizer.decode([ids[i] for i in hits])
    # No stray tokens: dropping either end loses part of the phrase.
    assert "see a doctor" not in tokenizer.decode([ids[i] for i in hits[1:]])
    assert "see a doctor" not in tokenizer.decode([ids[i] for i in hits[:-1]])


def test_tokens_overlapping_edges() -> None:
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9)]
    assert tokens_overlapping(offsets, (3, 5)) == [1]
    assert tokens_overlapping(offsets, (2, 6)) == [0, 1, 2]
    assert tokens_overlapping(offsets, (9, 9)) == []
    assert tokens_overlapping(offsets, (4, 4)) == []


def test_pad_right() -> None:
    out = pad_right([[1, 2, 3], [4], []], pad_value=-1, dtype=torch.long)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [4, -1, -1], [-1, -1, -1]]
    assert pad_right([np.array([0.5, 1.5])], 0.0, torch.float32).tolist() == [[0.5, 1.5]]


def test_scatter_response_values() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    out = scatter_response_values([[2.0, 3.0], np.array([4.0, 5.0])], mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="values for 2 response tokens"):
        scatter_response_values([[1.0], [1.0, 2.0]], mask)
    with pytest.raises(ValueError):
        scatter_response_values([[1.0, 2.0]], mask)


def _feature(tokenizer, pair_id: str, chosen: str, rejected: str, weights: bool) -> dict:
    feature: dict = {"pair_id": pair_id, "prompt": PROMPT}
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        enc: EncodedSequence = encode_prompt_response(tokenizer, PROMPT, text)
        feature[f"{side}_input_ids"] = enc.input_ids
        feature[f"{side}_response_mask"] = enc.response_mask
        if weights:
            feature[f"{side}_weights"] = [float(i + 1) for i in range(enc.response_length)]
    return feature


def test_collator(tokenizer) -> None:
    features = [
        _feature(tokenizer, "a", RESPONSE, "No idea.", weights=True),
        _feature(tokenizer, "b", "Rest.", "Ignore it and hope it goes away on its own.", weights=False),
    ]
    features[0]["score"] = 1
    features[1]["score"] = 2.5
    pad = tokenizer.pad_token_id
    batch = PreferenceCollator(pad_token_id=pad)(features)

    assert batch["pair_id"] == ["a", "b"]
    assert "prompt" not in batch
    assert batch["score"].tolist() == [1.0, 2.5]
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"]
        att = batch[f"{side}_attention_mask"]
        resp = batch[f"{side}_response_mask"]
        weights = batch[f"{side}_weights"]
        assert ids.dtype == torch.long and att.dtype == torch.long
        assert resp.dtype == torch.float32 and weights.dtype == torch.float32
        lengths = [len(f[f"{side}_input_ids"]) for f in features]
        assert ids.shape == (2, max(lengths))
        for row, feature in enumerate(features):
            n = lengths[row]
            assert ids[row, :n].tolist() == feature[f"{side}_input_ids"]
            assert (ids[row, n:] == pad).all()
            assert att[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert resp[row, :n].tolist() == feature[f"{side}_response_mask"]
            assert (resp[row, n:] == 0).all()
            # Weights live exactly on the response.
            assert torch.equal(weights[row] != 0, resp[row] != 0)
        # Row 0 carries its weights, row 1 gets ones on its response.
        r0 = resp[0] != 0
        assert weights[0][r0].tolist() == [float(i + 1) for i in range(int(r0.sum()))]
        assert torch.equal(weights[1], resp[1])


def test_collator_common_length(tokenizer) -> None:
    features = [_feature(tokenizer, "a", RESPONSE, "No.", weights=False)]
    batch = PreferenceCollator(tokenizer.pad_token_id, pad_to_common_length=True)(features)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert int(batch["rejected_attention_mask"].sum()) == len(features[0]["rejected_input_ids"])


def test_collator_rejects_bad_weights(tokenizer) -> None:
    feature = _feature(tokenizer, "a", RESPONSE, "No idea.", weights=True)
    feature["chosen_weights"] = feature["chosen_weights"][:-1]
    with pytest.raises(ValueError):
        PreferenceCollator(tokenizer.pad_token_id)([feature])
