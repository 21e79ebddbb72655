"""A run prepared for its first step: the models, data loader, optimizer and scheduler through accelerate,
where the reference logits come from, and the state of a resumed run."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from tidpo_core.batching.features import TrainingCollator
from tidpo_core.batching.packing import attention_implementation, shared_prompt_obstacle
from tidpo_core.method.losses import LossConfig
from tidpo_core.runtime.layout import RunDir
from tidpo_core.training.anchors import _AnchorRefresh
from tidpo_core.training.checkpoints import (
    COMPLETE_MARKER,
    _remove_incomplete,
    complete_checkpoints,
    materialize_optimizer_state,
    save_checkpoint,
)
from tidpo_core.training.config import TrainConfig
from tidpo_core.training.forward import (
    ReferenceFn,
    WeightsFn,
    adapter_disabled_reference,
    frozen_reference,
    online_weights,
)
from tidpo_core.training.reporting import Reporter
from tidpo_core.training.setup import Models, _numel, _optimizer, _place_reference, lr_schedule


@dataclass
class RunState:
    """One run's prepared objects and its progress (the optimizer steps taken, their metrics)."""

    config: TrainConfig
    loss_config: LossConfig
    accelerator: Accelerator
    policy: torch.nn.Module
    tokenizer: Any
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any
    reference: ReferenceFn | None
    weights_fn: WeightsFn | None
    refresh: _AnchorRefresh | None
    features_by_id: dict[str, dict[str, Any]]
    sides: tuple[str, ...]
    pad_token_id: int
    attention: str
    output_dir: Path
    checkpoint_root: Path
    gas: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    layout: dict[str, int]
    """What the data order depends on, kept with each checkpoint."""
    trainable_count: int
    total_count: int
    step: int = 0
    resumed_from: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0
    loop_started: float = 0.0
    step_started: float = 0.0

    def checkpoint_state(self, at_step: int) -> dict[str, Any]:
        """What the COMPLETE marker holds: the data position, the history and any re-sampled anchors."""
        return {
            "step": at_step,
            "epoch": at_step // self.steps_per_epoch,
            "batches_into_epoch": (at_step % self.steps_per_epoch) * self.gas,
            "layout": self.layout,
            "history": self.history,
            **({"anchors": self.refresh.texts} if self.refresh is not None and self.refresh.texts else {}),
        }

    def save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.accelerator,
            self.checkpoint_root,
            self.step,
            self.checkpoint_state(self.step),
            self.config.keep_checkpoints,
        )


def prepare(
    config: TrainConfig,
    loss_config: LossConfig,
    accelerator: Accelerator,
    models: Models,
    features: list[dict[str, Any]],
    refresh: _AnchorRefresh | None,
) -> RunState:
    """The data loader, the optimizer and the scheduler, through accelerate; the reference and the weights."""
    pad_token_id = models.tokenizer.pad_token_id
    sides = ("chosen", "rejected", "anchor") if loss_config.needs_anchor else ("chosen", "rejected")
    loader = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=TrainingCollator(pad_token_id, sides),
        generator=torch.Generator().manual_seed(config.seed),
        drop_last=False,
    )
    policy = models.policy
    model_config = getattr(policy, "config", None)
    attention = attention_implementation(model_config)
    if config.batch_layout == "shared_prompt":
        obstacle = shared_prompt_obstacle(
            model_config, config.max_prompt_tokens + config.max_response_tokens + 1
        )
        if obstacle:
            raise ValueError(
                f"batch_layout: shared_prompt cannot run this model: {obstacle}; set batch_layout: padded"
            )
    trainable = [p for p in policy.parameters() if p.requires_grad]
    trainable_count = sum(_numel(p) for p in trainable)
    total_count = sum(_numel(p) for p in policy.parameters())
    optimizer = _optimizer(config, trainable)
    policy, optimizer, loader = accelerator.prepare(policy, optimizer, loader)
    # DeepSpeed's own config may override the accumulation (accelerate warns and uses its value).
    gas = accelerator.gradient_accumulation_steps
    # Per process after sharding; a step consumes `gas` batches on every process.
    steps_per_epoch = max(1, math.ceil(len(loader) / gas))
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_epochs
    # Not passed to prepare(): accelerate's prepared scheduler steps num_processes times per optimizer step,
    # which would make the schedule depend on the process count. Stepped here once per optimizer step,
    # and saved/restored with the checkpoints.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(config.lr_scheduler, min(config.warmup_steps, total_steps), total_steps)
    )
    accelerator.register_for_checkpointing(scheduler)
    reference, weights_fn = _reference_and_weights(config, loss_config, accelerator, models, policy)
    output_dir = Path(config.output_dir)
    return RunState(
        config=config,
        loss_config=loss_config,
        accelerator=accelerator,
        policy=policy,
        tokenizer=models.tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        reference=reference,
        weights_fn=weights_fn,
        refresh=refresh,
        features_by_id={f["pair_id"]: f for f in features},
        sides=sides,
        pad_token_id=pad_token_id,
        attention=attention,
        output_dir=output_dir,
        checkpoint_root=RunDir(output_dir).checkpoints,
        gas=gas,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        num_epochs=math.ceil(total_steps / steps_per_epoch),
        layout={
            "num_processes": accelerator.num_processes,
            "per_device_batch_size": config.per_device_batch_size,
            "gradient_accumulation_steps": gas,
            "seed": config.seed,
        },
        trainable_count=trainable_count,
        total_count=total_count,
    )


def _reference_and_weights(
    config: TrainConfig,
    loss_config: LossConfig,
    accelerator: Accelerator,
    models: Models,
    policy: torch.nn.Module,
) -> tuple[ReferenceFn | None, WeightsFn | None]:
    """Where the reference logits come from (a frozen model, the adapter-disabled base, or nowhere: the
    cached top-k), and the online token weights when asked for; `policy` is the prepared policy."""
    reference: ReferenceFn | None = None
    if models.reference_module is not None:
        reference = frozen_reference(
            _place_reference(accelerator, models.reference_module), accelerator.autocast
        )
    elif loss_config.needs_kl and models.peft_model is not None and not config.cached_reference_kl:
        reference = adapter_disabled_reference(policy, accelerator.unwrap_model(policy))
    weights_fn = None
    if config.weights_mode == "online" and config.loss_type == "tidpo" and not config.uniform_weights:
        weights_fn = online_weights(
            accelerator.unwrap_model(policy), config.weight_lambda, config.weight_normalization
        )
    return reference, weights_fn


def resume(run: RunState, reporter: Reporter) -> None:
    """Continue from the newest complete checkpoint (resume: true), or clear the earlier run's (false)."""
    config, accelerator, checkpoint_root = run.config, run.accelerator, run.checkpoint_root
    if accelerator.is_main_process:
        if not config.resume and complete_checkpoints(checkpoint_root):
            # Checkpoints of an earlier run would mix into the keep-last-K rotation (and a later resume).
            reporter.log(f"resume: false, removing the earlier checkpoints in {checkpoint_root}")
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        _remove_incomplete(checkpoint_root)
    accelerator.wait_for_everyone()
    checkpoints = complete_checkpoints(checkpoint_root) if config.resume else []
    if not checkpoints:
        return
    step, path = checkpoints[-1]
    if accelerator.distributed_type == DistributedType.FSDP:
        materialize_optimizer_state(run.optimizer)
    accelerator.load_state(str(path))
    state = json.loads((path / COMPLETE_MARKER).read_text())
    run.step, run.history, run.resumed_from = step, state.get("history", []), str(path)
    if any(state.get("layout", {}).get(k, v) != v for k, v in run.layout.items()):
        reporter.log(
            f"warning: checkpoint {path} was written with {state.get('layout')}, resuming with {run.layout}: "
            "the data order after resuming differs from an uninterrupted run"
        )
    reporter.log(f"resumed from {path} at step {step}")
    if run.refresh is not None and state.get("anchors"):
        run.refresh.apply(accelerator.unwrap_model(run.policy), run.features_by_id, texts=state["anchors"])
        reporter.log(f"restored {len(state['anchors'])} anchors re-sampled before step {step}")
