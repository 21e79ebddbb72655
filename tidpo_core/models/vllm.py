"""Anchor sampling with vLLM (`generation_backend: vllm`), the standard for batch sampling on GPUs.

An extra (`pip install 'tidpo[vllm]'`): imported only when chosen, and refused with a clear message where it
cannot run (not installed, or no CUDA device). Prompts go in as token ids built exactly as training builds
them (`generation.prompt_ids`: bos + the prompt's last max_prompt_tokens tokens), so the policy scores the
anchor in the context it was sampled in. Each prompt has its own seed (vLLM's per-request `seed`), so a
prompt's sample does not depend on which other prompts share the engine's batches.

vLLM's sampler applies temperature, then top-k, then top-p, as transformers' `generate` does; `max_tokens`
stops at max_new_tokens and eos ends a sample early. The samples are decoded with the model's tokenizer,
special tokens skipped, as the transformers backend decodes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from tidpo_core.models.generation import SamplingSettings, prompt_ids
from tidpo_core.runtime.errors import UserInputError

INSTALL_HINT = "pip install 'tidpo[vllm]'"


def check_vllm_usable(cuda_available: bool | None = None, vllm_installed: bool | None = None) -> None:
    """Raise UserInputError unless vLLM can sample here: the package is installed and a CUDA device is visible."""
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    if not vllm_installed:
        raise UserInputError(
            f"generation_backend: vllm needs the vllm extra ({INSTALL_HINT}); or set generation_backend: transformers"
        )
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise UserInputError(
            "generation_backend: vllm needs a CUDA GPU and this machine has none; set generation_backend: transformers to sample on CPU"
        )


def vllm_sampling_params(settings: SamplingSettings, seed: int) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments that sample what `settings` asks the transformers backend for."""
    return {
        "n": 1,
        "temperature": settings.temperature,
        "top_k": settings.top_k
        if settings.top_k > 0
        else -1,  # vLLM: -1 considers every token (transformers: 0)
        "top_p": settings.top_p,
        "max_tokens": settings.max_new_tokens,
        "seed": seed,
        "skip_special_tokens": True,
    }


class VllmSampler:
    """A vLLM engine over one model, loaded once per process; called with (prompts, seeds), it returns one
    sampled response text per prompt, `seeds[i]` seeding prompt i."""

    def __init__(
        self,
        model_path: str,
        settings: SamplingSettings,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.85,
    ):
        check_vllm_usable()
        from transformers import AutoTokenizer
        from vllm import LLM

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=revision, trust_remote_code=trust_remote_code
        )
        self.engine = LLM(
            model=model_path,
            tokenizer=model_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            seed=settings.seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], progress: bool = False) -> list[str]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [
            TokensPrompt(prompt_token_ids=prompt_ids(self.tokenizer, p, self.settings.max_prompt_tokens))
            for p in prompts
        ]
        params = [SamplingParams(**vllm_sampling_params(self.settings, seed)) for seed in seeds]
        outputs = self.engine.generate(requests, sampling_params=params, use_tqdm=progress)
        return [
            self.tokenizer.decode(list(out.outputs[0].token_ids), skip_special_tokens=True) for out in outputs
        ]


def sample_with_vllm(
    model_path: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplingSettings,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float = 0.85,
) -> list[str]:
    """One sampled response text per prompt from the model folder or hub id at `model_path` (a VllmSampler
    used once)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = VllmSampler(
        model_path,
        settings,
        revision=revision,
        trust_remote_code=trust_remote_code,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    return sampler(prompts, seeds)
