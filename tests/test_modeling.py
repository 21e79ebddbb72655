"""Tiny tokenizer/model construction and the save/load round trip, all offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidpo_core.models.modeling import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    TinyModelConfig,
    build_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    resolve_device,
    save_model_and_tokenizer,
    train_tokenizer,
)

CORPUS = [
    f"{subject} {verb} the {thing} near the river on day {i}."
    for i, (subject, verb, thing) in enumerate(
        [
            ("The doctor", "checks", "patient"),
            ("A student", "reads", "book"),
            ("My friend", "paints", "fence"),
            ("The cat", "watches", "bird"),
            ("Our team", "builds", "bridge"),
            ("The farmer", "plants", "seeds"),
        ]
        * 6
    )
] + ["If the pain persists, please see a doctor.", "Drink water and rest."]

TINY = TinyModelConfig(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=TINY.vocab_size)


def test_tokenizer_is_deterministic(tokenizer) -> None:
    again = train_tokenizer(CORPUS, vocab_size=TINY.vocab_size)
    assert again.get_vocab() == tokenizer.get_vocab()
    text = "The doctor reads the bridge."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_tokenizer_special_tokens_and_settings(tokenizer) -> None:
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.unk_token == UNK_TOKEN
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 512
    assert tokenizer.chat_template is None
    assert len(tokenizer) <= TINY.vocab_size


@pytest.mark.parametrize(
    "text",
    ["The doctor checks the patient.", "  unseen wörds, émojis 🙂 and\nnewlines\t!", ""],
)
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown


def test_default_model_size_is_small() -> None:
    # Full 2048 vocabulary: the size the embedded default reaches on a real corpus.
    cfg = TinyModelConfig()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=True,
        )
    )
    assert 1_000_000 <= count_parameters(model) <= 6_000_000


def test_build_tiny_model(tokenizer) -> None:
    model = build_tiny_model(tokenizer, TINY, seed=3)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    same = build_tiny_model(tokenizer, TINY, seed=3)
    other = build_tiny_model(tokenizer, TINY, seed=4)
    ids = torch.tensor([tokenizer("The cat watches the bird.")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, same(ids).logits)
        assert not torch.equal(logits, other(ids).logits)


def test_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    model = build_tiny_model(tokenizer, TINY).eval()
    out = save_model_and_tokenizer(model, tokenizer, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    files = {p.name for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith(".bin") for name in files)

    loaded, loaded_tok = load_model_and_tokenizer(out)
    loaded.eval()
    text = "Our team builds the fence."
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.padding_side == "left"
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.dtype == torch.float32


def test_load_missing_local_path_fails_before_asking_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Fast" means: transformers (which would treat the path as a repo id and wait on the network) is
    # never called. Asserting that is deterministic; a wall-clock bound is not on a shared machine.
    import tidpo_core.models.modeling as modeling

    def must_not_be_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers was asked to load a path that does not exist")

    monkeypatch.setattr(modeling.AutoConfig, "from_pretrained", must_not_be_called)
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", must_not_be_called)
    monkeypatch.setattr(modeling.AutoTokenizer, "from_pretrained", must_not_be_called)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer("./surely/not/here")


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_load_sets_missing_pad_to_eos(tokenizer, tmp_path: Path) -> None:
    model = build_tiny_model(tokenizer, TINY)
    no_pad = train_tokenizer(CORPUS, vocab_size=TINY.vocab_size)
    no_pad.pad_token = None
    save_model_and_tokenizer(model, no_pad, tmp_path)
    _, loaded_tok = load_model_and_tokenizer(tmp_path)
    assert loaded_tok.pad_token == EOS_TOKEN
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id


def test_load_dtype(tokenizer, tmp_path: Path) -> None:
    save_model_and_tokenizer(build_tiny_model(tokenizer, TINY), tokenizer, tmp_path)
    loaded, _ = load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
