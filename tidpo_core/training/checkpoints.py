"""What a run writes to resume from and to hand over: checkpoints (with the COMPLETE marker written last)
and the final model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from tidpo_core.training.config import TrainConfig
from tidpo_core.training.setup import _apply_lora, _load_reference, _whole_weights_loading

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE.json"


def complete_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Checkpoints whose save finished (marker written last), oldest first."""
    if not checkpoint_root.exists():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _remove_incomplete(checkpoint_root: Path) -> None:
    """A save interrupted by a crash leaves a folder without the marker: never resumable, so remove it."""
    if not checkpoint_root.exists():
        return
    for path in checkpoint_root.iterdir():
        if CHECKPOINT_PATTERN.match(path.name) and not (path / COMPLETE_MARKER).exists():
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, checkpoint_root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Save model, optimizer, scheduler and RNG states, then the marker with the data position; rotate."""
    path = checkpoint_root / f"step_{step}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path / (COMPLETE_MARKER + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path / COMPLETE_MARKER)
        for _, old in complete_checkpoints(checkpoint_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its per-parameter state (AdamW's moments and step) without moving a weight.

    FSDP's sharded checkpoint loads the optimizer into a template built from the optimizer's current
    state: a fresh optimizer has none, so the moments in the checkpoint were silently skipped and a
    resumed run restarted Adam from zero (seen on an H100: resumed weights off by 1e-2). One step with
    zero gradients at learning rate 0 creates the state; the checkpoint then overwrites it.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if inner.state:
        return
    params = [p for group in inner.param_groups for p in group["params"] if p.requires_grad]
    for param in params:
        param.grad = torch.zeros_like(param)
    learning_rates = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
    inner.step()
    for group, learning_rate in zip(inner.param_groups, learning_rates, strict=True):
        group["lr"] = learning_rate
    for param in params:
        param.grad = None


def without_tied_copies(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A gathered state dict without the keys the model ties to another (lm_head to the embeddings).

    FSDP and ZeRO-3 gather tied parameters as separate tensors, so save_pretrained cannot see that they
    share storage and would write the tied copy too: a folder whose weights differ from the base model's
    layout (and a larger file).
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: tensor for name, tensor in state_dict.items() if name not in tied}


def _save_final(
    accelerator: Accelerator, policy: torch.nn.Module, tokenizer, config: TrainConfig, final_path: Path
) -> None:
    """Write the final model atomically (a staging folder renamed into place) as a plain HF folder.

    LoRA with merge_lora: the adapter is merged into the base (merge_and_unload) so the folder loads as a
    plain model; without merge_lora the folder holds the adapter (it names the base it belongs to).
    Under FSDP/DeepSpeed the full state dict is gathered first (a collective: every process calls it).
    """
    staging = final_path.with_name(final_path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(policy)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = without_tied_copies(unwrapped, accelerator.get_state_dict(policy)) if sharded else None
    if accelerator.is_main_process:
        if config.lora and config.merge_lora:
            if sharded:
                # The wrapped copy is sharded: rebuild the adapter on a CPU copy of the base and merge there.
                with _whole_weights_loading():
                    base, _ = _load_reference(config)
                unwrapped = _apply_lora(base, config)
                unwrapped.load_state_dict(state_dict)
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(staging, safe_serialization=True)
        else:
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(final_path, ignore_errors=True)
        staging.rename(final_path)
    accelerator.wait_for_everyone()
