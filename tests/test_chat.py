"""Chat-format prompts: HH transcripts read back as turns, rendering with a chat template, the closing
end-of-turn token, prompt budgets, and the embedded (template-free) encoding kept as it was."""

import pytest
import torch

from tidpo_core.batching.chat import (
    closing_token_id,
    end_of_turn_id,
    prompt_messages,
    readable_prompt,
    stop_token_ids,
)
from tidpo_core.batching.tokenization import PreferenceCollator, encode_prompt, encode_prompt_response
from tidpo_core.models.modeling import train_tokenizer
from tidpo_core.steps.reference import ReferenceHandle, with_optimizer_recipe
from tidpo_core.training.config import OPTIMIZER_RECIPES, TrainConfig

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?\n\nAssistant:"
TEXTS = ["Hi there. How do I boil an egg? Simmer it for nine minutes. Hello! Eggs are overrated."] * 4


@pytest.fixture(scope="module")
def plain_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A ChatML tokenizer like SmolLM2's: eos = pad = <|im_end|>, which also closes a turn."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def test_an_hh_transcript_becomes_its_turns_without_the_empty_assistant_slot() -> None:
    assert prompt_messages(HH_PROMPT) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I boil an egg?"},
    ]
    system = "\n\nSystem: Be brief.\n\nHuman: Capital of France?\n\nAssistant:"
    assert prompt_messages(system) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]


def test_a_plain_prompt_is_one_user_turn() -> None:
    assert prompt_messages("  What is 2+2?\n") == [{"role": "user", "content": "What is 2+2?"}]
    # Turn labels inside a plain prompt's text do not make it a transcript: it must start with a turn.
    assert prompt_messages("Summarise:\n\nHuman: hi") == [
        {"role": "user", "content": "Summarise:\n\nHuman: hi"}
    ]


def test_readable_prompt_shows_one_turn_a_line() -> None:
    assert readable_prompt(HH_PROMPT) == "user: Hi\nassistant: Hello!\nuser: How do I boil an egg?"
    assert readable_prompt(HH_PROMPT, width=8).splitlines()[-1] == "user: How do …"


def test_chat_prompt_is_rendered_with_the_template_and_the_response_closes_with_end_of_turn(
    chat_tokenizer,
) -> None:
    response = " Simmer it for nine minutes."
    encoded = encode_prompt_response(
        chat_tokenizer, HH_PROMPT, response, max_prompt_tokens=512, max_response_tokens=64
    )
    expected_prompt = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    )
    head = encoded.input_ids[: encoded.prompt_length]
    body = encoded.input_ids[encoded.prompt_length :]
    assert chat_tokenizer.decode(head) == expected_prompt
    # The turn's content without HH's leading space, then <|im_end|>: scored (in the mask) like any token.
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert body[-1] == im_end and chat_tokenizer.decode(body[:-1]) == "Simmer it for nine minutes."
    assert encoded.response_mask == [0] * len(head) + [1] * len(body)
    assert "Human:" not in chat_tokenizer.decode(encoded.input_ids)
    # Offsets still index the stored response string (leading space included).
    first_start, first_end = encoded.response_offsets[0]
    assert first_start == 1 and response[first_start:first_end] == "Simmer"[: first_end - first_start]
    assert encoded.response_offsets[-1] == (len(response), len(response))
    assert "".join(response[s:e] for s, e in encoded.response_offsets) == response.strip()


def test_end_of_turn_is_the_templates_closing_token_else_eos(chat_tokenizer, plain_tokenizer) -> None:
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chat_tokenizer) == closing_token_id(chat_tokenizer) == im_end
    assert stop_token_ids(chat_tokenizer) == [im_end]
    assert closing_token_id(plain_tokenizer) == plain_tokenizer.eos_token_id
    # A template that writes no special token after a turn (only a newline): the turn closes with eos.
    bare = train_tokenizer(TEXTS, vocab_size=300)
    bare.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert end_of_turn_id(bare) == bare.eos_token_id


def test_a_pad_equal_to_eos_keeps_the_closing_token_in_the_mask(chat_tokenizer) -> None:
    short = encode_prompt_response(chat_tokenizer, HH_PROMPT, " Hi.", max_prompt_tokens=512)
    long = encode_prompt_response(
        chat_tokenizer, HH_PROMPT, " Simmer it for nine minutes.", max_prompt_tokens=512
    )
    rows = [{"chosen_input_ids": e.input_ids, "chosen_response_mask": e.response_mask} for e in (short, long)]
    batch = PreferenceCollator(chat_tokenizer.pad_token_id, sides=("chosen",))(rows)
    last = len(short.input_ids) - 1
    assert (
        batch["chosen_input_ids"][0, last] == chat_tokenizer.pad_token_id
    )  # the closing token is the pad id
    assert batch["chosen_response_mask"][0, last] == 1 and batch["chosen_attention_mask"][0, last] == 1
    assert batch["chosen_response_mask"][0, last + 1 :].sum() == 0
    assert batch["chosen_weights"][0, last] == 1.0


def test_a_long_conversation_loses_its_oldest_turns_first(chat_tokenizer) -> None:
    turns = "".join(f"\n\nHuman: Question {i} about eggs?\n\nAssistant: Answer {i}." for i in range(8))
    prompt = turns + "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    full = encode_prompt(chat_tokenizer, prompt, 10_000)
    budget = len(full) // 2
    ids = encode_prompt(chat_tokenizer, prompt, budget)
    text = chat_tokenizer.decode(ids)
    assert len(ids) <= budget
    assert text.startswith("<|im_start|>user\n") and text.endswith(
        "How do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Question 0" not in text and "Question 7" in text
    # One turn longer than the budget keeps the turn's end and the template around it.
    one = encode_prompt(chat_tokenizer, "\n\nHuman: " + "eggs " * 200 + "\n\nAssistant:", 40)
    assert len(one) <= 40 and chat_tokenizer.decode(one).endswith("<|im_end|>\n<|im_start|>assistant\n")


def _old_encoding(tokenizer, prompt: str, response: str, max_prompt: int, max_response: int):
    """The template-free encoding as it was before chat templates (an independent re-statement)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max_response - 1]
    head = [tokenizer.bos_token_id, *prompt_ids]
    return head + response_ids + [tokenizer.eos_token_id], [0] * len(head) + [1] * (len(response_ids) + 1)


@pytest.mark.parametrize(("max_prompt", "max_response"), [(192, 128), (5, 4)])
def test_a_tokenizer_without_a_template_keeps_the_transcript_encoding(
    plain_tokenizer, max_prompt, max_response
) -> None:
    response = " Simmer it for nine minutes."
    encoded = encode_prompt_response(
        plain_tokenizer, HH_PROMPT, response, max_prompt_tokens=max_prompt, max_response_tokens=max_response
    )
    ids, mask = _old_encoding(plain_tokenizer, HH_PROMPT, response, max_prompt, max_response)
    assert encoded.input_ids == ids and encoded.response_mask == mask
    assert encode_prompt(plain_tokenizer, HH_PROMPT, max_prompt) == ids[: encoded.prompt_length]


def test_sampling_reads_the_encoded_prompt_and_stops_at_end_of_turn(chat_tokenizer) -> None:
    from tidpo_core.models.generation import SamplingSettings, prompt_ids, sample_batches
    from tidpo_core.models.modeling import TinyModelConfig, build_tiny_model

    assert prompt_ids(chat_tokenizer, HH_PROMPT, 64) == encode_prompt(chat_tokenizer, HH_PROMPT, 64)
    model = build_tiny_model(
        chat_tokenizer,
        TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    )
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    boost = torch.zeros(len(chat_tokenizer))
    boost[im_end] = 100.0
    model.lm_head.register_forward_hook(
        lambda _m, _i, logits: logits + boost
    )  # it always ends its turn at once
    settings = SamplingSettings(max_new_tokens=6, batch_size=2)
    ((_, encoded, rows),) = list(
        sample_batches(model, chat_tokenizer, [HH_PROMPT, "Hi?"], settings, seeds=[1, 2])
    )
    # Stopped at <|im_end|>: the rest of each row is padding (here the same id), not sampled tokens.
    assert rows == [[im_end]] * 2 or all(row == [im_end] * len(row) for row in rows)
    assert encoded[1] == encode_prompt(chat_tokenizer, "Hi?", 192)


def test_optimizer_recipe_fills_only_what_is_left_empty() -> None:
    paths = {"duckdb_path": "db", "reference_model_path": "ref", "output_dir": "out"}
    scratch = TrainConfig(**paths)
    assert (scratch.optimizer_recipe, scratch.learning_rate, scratch.optimizer, scratch.warmup_steps) == (
        "scratch",
        5e-4,
        "adamw",
        10,
    )
    paper = TrainConfig(**paths, optimizer_recipe="paper", warmup_steps=4)
    assert (paper.learning_rate, paper.optimizer, paper.warmup_steps) == (5e-6, "rmsprop", 4)
    assert OPTIMIZER_RECIPES["paper"] == {"learning_rate": 5e-6, "optimizer": "rmsprop", "warmup_steps": 150}
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainConfig(**paths, optimizer="sgd")


def test_a_pretrained_reference_trains_with_the_papers_recipe_unless_told_otherwise() -> None:
    pretrained = ReferenceHandle(path="/models/smol", fingerprint="f", base={"path": "/models/smol"})
    embedded = ReferenceHandle(path="/data/reference", fingerprint="f", base={"tiny_config": {}, "seed": 0})
    assert with_optimizer_recipe(pretrained, {"beta": 0.1}) == {"beta": 0.1, "optimizer_recipe": "paper"}
    assert with_optimizer_recipe(embedded, {"optimizer_recipe": "auto"})["optimizer_recipe"] == "scratch"
    assert with_optimizer_recipe(pretrained, {"optimizer_recipe": "scratch"})["optimizer_recipe"] == "scratch"
