"""mixed_precision: auto on a CPU: bf16 autocast only where the CPU has native bf16 and the model is large."""

import pytest

from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.training import setup
from tidpo_core.training.config import TrainConfig

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n"
AVX512_BF16 = "flags\t\t: fpu avx512f avx512_bf16\n"
NO_BF16 = "flags\t\t: fpu sse2 avx2 avx512f\n"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert setup.cpu_has_native_bf16(AMX) and setup.cpu_has_native_bf16(AVX512_BF16)
    assert not setup.cpu_has_native_bf16(NO_BF16)
    # A flag's name inside another word is not the flag.
    assert not setup.cpu_has_native_bf16("flags\t: xamx_bf16y\n")


def test_checkpoint_parameters_reads_shapes_from_safetensors(tmp_path) -> None:
    tokenizer = train_tokenizer(["a b c d e f"] * 4, vocab_size=280)
    model = build_tiny_model(
        tokenizer,
        TinyModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    )
    save_model_and_tokenizer(model, tokenizer, tmp_path / "m")
    # Tied embeddings are stored once, as the model counts them.
    assert setup.checkpoint_parameters(tmp_path / "m") == sum(p.numel() for p in model.parameters())
    assert setup.checkpoint_parameters(tmp_path / "missing") is None
    assert setup.checkpoint_parameters("HuggingFaceTB/SmolLM2-135M-Instruct") is None


@pytest.mark.parametrize(
    ("native", "parameters", "expected"),
    [(True, 134_515_008, "bf16"), (True, 1_100_000, "no"), (False, 134_515_008, "no"), (True, None, "no")],
)
def test_auto_picks_bf16_autocast_for_a_large_model_on_a_bf16_cpu(
    monkeypatch, native, parameters, expected
) -> None:
    monkeypatch.setattr(setup, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(setup, "checkpoint_parameters", lambda path: parameters)
    config = TrainConfig(duckdb_path="db", reference_model_path="ref", output_dir="out")
    assert setup._mixed_precision(config, cpu=True) == expected
    explicit = TrainConfig(
        duckdb_path="db", reference_model_path="ref", output_dir="out", mixed_precision="no"
    )
    assert setup._mixed_precision(explicit, cpu=True) == "no"
