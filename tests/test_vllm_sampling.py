"""The vLLM anchor backend: refused clearly where it cannot run; on a CUDA machine with vLLM, its samples
agree with the transformers backend's (skipped elsewhere)."""

from __future__ import annotations

import importlib.util

import pytest

from tidpo_core.models.generation import SamplingSettings
from tidpo_core.models.vllm import INSTALL_HINT, check_vllm_usable, sample_with_vllm, vllm_sampling_params
from tidpo_core.runtime.errors import UserInputError


def test_refused_without_the_extra():
    with pytest.raises(UserInputError) as error:
        check_vllm_usable(cuda_available=True, vllm_installed=False)
    assert INSTALL_HINT in str(error.value) and "generation_backend: transformers" in str(error.value)


def test_refused_without_cuda():
    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        check_vllm_usable(cuda_available=False, vllm_installed=True)


def test_refused_on_this_machine_before_loading_anything(tmp_path):
    """Whatever this machine lacks (the extra or a GPU), sampling stops with the user error, not an ImportError."""
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("vLLM can run here")
    with pytest.raises(UserInputError, match="generation_backend: vllm"):
        sample_with_vllm(str(tmp_path / "no-model"), ["a prompt"], [0], SamplingSettings())


def test_anchors_with_vllm_are_refused_before_anything_is_read_or_launched(monkeypatch):
    """The step checks vLLM before it opens the database or plans a shard (here: no CUDA, or no extra)."""
    from tidpo_core.models import vllm as vllm_sampling
    from tidpo_core.steps.anchors import AnchorBackend, sample_anchors
    from tidpo_core.steps.reference import ReferenceHandle

    monkeypatch.setattr(
        vllm_sampling.importlib.util, "find_spec", lambda name: object() if name == "vllm" else None
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)

    def no_database():
        raise AssertionError("the database was opened")

    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        sample_anchors(
            no_database,
            ReferenceHandle(path="ref", fingerprint="f"),
            SamplingSettings(),
            backend=AnchorBackend("vllm"),
        )


def test_vllm_anchors_have_their_own_fingerprint_and_transformers_anchors_keep_theirs():
    from tidpo_core.runtime.fingerprint import digest
    from tidpo_core.steps.anchors import SEEDING, AnchorBackend, anchors_fingerprint
    from tidpo_core.steps.reference import ReferenceHandle

    reference, settings = ReferenceHandle(path="ref", fingerprint="f"), SamplingSettings()
    before = digest({"model": "f", "sampling": settings.as_dict(), "seeding": SEEDING})
    assert (
        anchors_fingerprint(reference, settings)
        == anchors_fingerprint(reference, settings, AnchorBackend("transformers"))
        == before
    )
    assert anchors_fingerprint(reference, settings, AnchorBackend("vllm")) != before


def test_sampling_params_match_the_transformers_settings():
    settings = SamplingSettings(max_new_tokens=12, top_k=50, top_p=0.95, temperature=0.8)
    assert vllm_sampling_params(settings, seed=7) == {
        "n": 1,
        "temperature": 0.8,
        "top_k": 50,
        "top_p": 0.95,
        "max_tokens": 12,
        "seed": 7,
        "skip_special_tokens": True,
    }
    # transformers' "no top-k" is 0, vLLM's is -1.
    assert vllm_sampling_params(SamplingSettings(top_k=0), seed=0)["top_k"] == -1


def test_prompt_and_seed_counts_must_agree():
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample_with_vllm("unused", ["a", "b"], [0], SamplingSettings())


def _gpu_with_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _gpu_with_vllm(), reason="needs vLLM and a CUDA GPU (make gpu-check)")
def test_vllm_samples_look_like_transformers_samples(tmp_path):
    """Same prompts, same settings: the two backends' answer lengths agree in distribution (means within 25 %),
    and every vLLM sample stays within max_new_tokens."""
    import statistics

    from tidpo_core.data.synthetic import generate_synthetic_pairs
    from tidpo_core.models.generation import sample_batches
    from tidpo_core.models.modeling import (
        TinyModelConfig,
        build_tiny_model,
        save_model_and_tokenizer,
        train_tokenizer,
    )

    pairs = generate_synthetic_pairs(64, seed=0)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)])
    model = build_tiny_model(tokenizer, TinyModelConfig(), seed=0)
    save_model_and_tokenizer(model, tokenizer, tmp_path / "model")
    settings = SamplingSettings(max_new_tokens=32, seed=0)
    prompts = [p.prompt for p in pairs]
    vllm_texts = sample_with_vllm(
        str(tmp_path / "model"), prompts, list(range(len(prompts))), settings, gpu_memory_utilization=0.3
    )
    hf_lengths = [
        sum(1 for t in row if t != tokenizer.pad_token_id)
        for _, _, rows in sample_batches(model, tokenizer, prompts, settings)
        for row in rows
    ]
    vllm_lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in vllm_texts]
    assert max(vllm_lengths) <= settings.max_new_tokens
    assert abs(statistics.mean(vllm_lengths) - statistics.mean(hf_lengths)) <= 0.25 * statistics.mean(
        hf_lengths
    )
