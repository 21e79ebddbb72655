"""Devices, models and the optimizer of a run: what accelerate is asked for, which models are loaded (and
how under DeepSpeed or LoRA), and the learning-rate schedule."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from tidpo_core.method.losses import LossConfig
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.training.config import TrainConfig
from tidpo_core.training.reporting import Reporter


def lr_schedule(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step s: HF transformers' linear / cosine (half cycle) /
    constant_with_warmup schedules, formula for formula.

    Written here rather than imported (transformers.get_scheduler) because transformers.optimization
    imports its Trainer utilities and, with them, peft: seconds of start-up on every training process.
    """
    if kind not in ("linear", "cosine", "constant_with_warmup"):
        raise ValueError(f"unknown lr_scheduler {kind!r}; expected linear, cosine or constant_with_warmup")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "linear":
            return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return multiplier


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _has_gpu() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None and hasattr(accelerator_api, "is_available"):
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def _use_cpu(config: TrainConfig) -> bool:
    return (not _has_gpu()) if config.cpu is None else config.cpu


# bench/bench_precision.py on SmolLM2-135M (docs/real-models.md): bf16 autocast made a training step 0.65x
# and the attribution pass 0.55x of float32's time on a CPU with AMX, its loss curve within seed noise;
# bf16 weights were faster still but left float32's curve. Models far smaller than that gain nothing
# measurable, and the embedded default keeps its float32 results.
CPU_BF16_MIN_PARAMETERS = 50_000_000


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (AMX or AVX512-BF16), from /proc/cpuinfo's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[-1].split()
    }
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def checkpoint_parameters(path: str | os.PathLike) -> int | None:
    """Parameters stored in a local folder's safetensors files (shapes only, nothing loaded); None elsewhere."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(tensors.get_slice(name).get_shape())
    return total


def _mixed_precision(config: TrainConfig, cpu: bool) -> str:
    """`auto`: bf16 (or fp16) on a GPU; on a CPU, bf16 autocast for a model of 50M+ parameters where the CPU
    has native bf16, else none."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpu and cpu_has_native_bf16():
        parameters = checkpoint_parameters(config.init_model_path or config.reference_model_path)
        if parameters is not None and parameters >= CPU_BF16_MIN_PARAMETERS:
            return "bf16"
    return "no"


def _model_dtype(config: TrainConfig) -> str | torch.dtype:
    return "auto" if config.model_dtype == "auto" else getattr(torch, config.model_dtype)


def _warn_single_cpu_launch(accelerator: Accelerator, reporter: Reporter) -> None:
    """`accelerate launch --cpu --num_processes N` without mpirun starts one process: say so."""
    if (
        accelerator.num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        reporter.log(
            "warning: `accelerate launch --cpu` with several processes needs mpirun; this is ONE process. "
            "For N CPU processes (gloo) use `accelerate launch --multi_gpu --num_processes N` (tidpo falls "
            "back to CPU when no GPU is visible)."
        )


def _load_reference(config: TrainConfig) -> tuple[Any, Any]:
    """The reference checkpoint the run starts from (and, for the KL term, compares against)."""
    return load_model_and_tokenizer(
        config.reference_model_path,
        dtype=_model_dtype(config),
        revision=config.reference_revision,
        trust_remote_code=config.trust_remote_code,
    )


@dataclass
class Models:
    """The models a run starts with, before accelerate wraps them."""

    policy: torch.nn.Module
    tokenizer: Any
    peft_model: Any | None
    """The policy itself under LoRA (its adapter can be disabled for the KL reference), else None."""
    reference_module: torch.nn.Module | None
    """A separate frozen reference: only for SeqKL from a reference forward without LoRA."""


def load_models(config: TrainConfig, loss_config: LossConfig) -> Models:
    """The policy (from the reference, or init_model_path), with its LoRA adapter, and the reference."""
    policy, tokenizer = _load_reference(config)
    if config.init_model_path:
        policy, _ = load_model_and_tokenizer(
            config.init_model_path, dtype=_model_dtype(config), trust_remote_code=config.trust_remote_code
        )
    peft_model = None
    if config.lora:
        policy = peft_model = _apply_lora(policy, config)
    reference_module = None
    if loss_config.needs_kl and not config.lora and not config.cached_reference_kl:
        # Under ZeRO-3 the reference loads partitioned and runs in its own engine (_place_reference).
        reference_module, _ = _load_reference(config)
    return Models(policy, tokenizer, peft_model, reference_module)


def _numel(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter; under DeepSpeed ZeRO-3 the local tensor is an empty shard, `ds_numel` the whole."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def _zero_stage(accelerator: Accelerator) -> int | None:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(
        accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    )


def _check_sharding_support(config: TrainConfig, accelerator: Accelerator) -> None:
    """Online weights and anchor re-sampling run the unwrapped policy outside its wrapper (an embedding
    gradient, generate()), which a sharded model (FSDP, ZeRO-3) cannot do without gathering its weights."""
    sharded = accelerator.distributed_type == DistributedType.FSDP or _zero_stage(accelerator) == 3
    if not sharded:
        return
    unsupported = [
        name
        for name, used in (
            ("weights_mode: online", config.weights_mode == "online" and config.loss_type == "tidpo"),
            ("anchor_refresh_every > 0", config.anchor_refresh_every > 0),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"{' and '.join(unsupported)} need(s) an unsharded policy; under {accelerator.distributed_type.value} use "
            "the precomputed token weights and stored anchors (or DDP: configs/accelerate/multi_gpu_ddp.yaml)"
        )


def _place_reference(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference on the training device.

    Under DeepSpeed ZeRO-3, from_pretrained partitioned its weights at load (zero.Init) like the policy's,
    so it runs inside an inference-only DeepSpeed engine that gathers them per layer (TRL does the same).
    Elsewhere it is a plain full copy per process.
    """
    if _zero_stage(accelerator) != 3:
        return module.to(accelerator.device)
    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for training_only in ("optimizer", "scheduler"):
        ds_config.pop(training_only, None)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    return engine


@contextmanager
def _whole_weights_loading():
    """from_pretrained loads every weight on this process inside this block: under a ZeRO-3 run
    transformers partitions every model it loads (accelerate's plugin registers the DeepSpeed config with
    it), which a model kept outside the DeepSpeed engine (the CPU copy a LoRA merge needs) cannot use."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _apply_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
    )
    return get_peft_model(model, lora_config)


@contextmanager
def accelerate_state_left_as_found() -> Iterator[None]:
    """TRL's Trainer and lm-eval's HFLM fix accelerate's process-wide state (device, mixed precision); the
    training engine run later in the same process (launcher `in_process`) would find it set and could not
    choose its own (bf16, say). A process that had none before the block has none after it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    fresh = not PartialState._shared_state and not AcceleratorState._shared_state
    try:
        yield
    finally:
        if fresh:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
