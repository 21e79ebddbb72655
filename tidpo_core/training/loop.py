"""The training loop: one run from its config to the final model and summary (see tidpo_core.training)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from tidpo_core.batching.batch import TrainingBatch
from tidpo_core.runtime.faults import Faults
from tidpo_core.runtime.layout import RunDir
from tidpo_core.runtime.threads import threads_for
from tidpo_core.training.anchors import _AnchorRefresh
from tidpo_core.training.checkpoints import _save_final
from tidpo_core.training.config import TrainConfig
from tidpo_core.training.forward import compute_batch_loss
from tidpo_core.training.loading import load_training_features
from tidpo_core.training.reporting import Reporter, TrainSummary, _peak_rss_mb
from tidpo_core.training.setup import (
    _check_sharding_support,
    _mixed_precision,
    _use_cpu,
    _warn_single_cpu_launch,
    load_models,
)
from tidpo_core.training.signals import NonFiniteLossError, StopSignals, TrainingInterrupted
from tidpo_core.training.state import RunState, prepare, resume

StepCallback = Callable[[int, dict[str, float]], None]


def train(config: TrainConfig, on_step: StepCallback | None = None) -> TrainSummary:
    """Run (or resume) one training run; see tidpo_core.training. loss_type grpo runs TRL's GRPOTrainer
    (tidpo_core.training.grpo_loop) and leaves the same run folder and summary."""
    if config.is_grpo:
        from tidpo_core.training.grpo_loop import train_grpo  # imports TRL: only for grpo

        return train_grpo(config, on_step)
    cpu = _use_cpu(config)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(config, cpu),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    reporter = Reporter(config, accelerator.is_main_process)
    failure_file = RunDir(Path(config.output_dir)).failure
    try:
        with StopSignals() as stop:
            summary = _run(config, accelerator, reporter, on_step, stop)
    except BaseException as exc:
        if accelerator.is_main_process:
            # The launcher (a Dagster asset, a script) sees only an exit status; this says why.
            failure_file.parent.mkdir(parents=True, exist_ok=True)
            failure_file.write_text(f"{type(exc).__name__}: {exc}")
        reporter.close(None, exc)
        raise
    if accelerator.is_main_process:
        failure_file.unlink(missing_ok=True)
    reporter.close(asdict(summary))
    accelerator.end_training()
    return summary


def _run(
    config: TrainConfig,
    accelerator: Accelerator,
    reporter: Reporter,
    on_step: StepCallback | None,
    stop: StopSignals,
) -> TrainSummary:
    loss_config = config.loss_config()
    faults = Faults.from_env()
    timings: dict[str, float] = {}
    set_seed(config.seed)
    _warn_single_cpu_launch(accelerator, reporter)
    _check_sharding_support(config, accelerator)

    started = time.perf_counter()
    models = load_models(config, loss_config)
    timings["model_load_s"] = time.perf_counter() - started
    # The thread plan for this model (tidpo_core.runtime.threads); restored on return, for in-process runs.
    with threads_for(models.policy) as thread_plan:
        reporter.log(f"torch threads: {thread_plan.intra_op} ({thread_plan.reason})")
        return _train_loaded(
            config,
            loss_config,
            accelerator,
            reporter,
            on_step,
            stop,
            faults,
            models,
            timings,
            thread_plan.intra_op,
        )


def _train_loaded(
    config: TrainConfig,
    loss_config: Any,
    accelerator: Accelerator,
    reporter: Reporter,
    on_step: StepCallback | None,
    stop: StopSignals,
    faults: Faults,
    models: Any,
    timings: dict[str, float],
    thread_count: int,
) -> TrainSummary:
    features = load_training_features(config, models.tokenizer, timings)
    refresh = _AnchorRefresh.create(
        config, loss_config, models.reference_module, models.tokenizer, models.tokenizer.pad_token_id
    )
    run = prepare(config, loss_config, accelerator, models, features, refresh)
    resume(run, reporter)
    _announce(run, reporter, len(features))
    start_step = run.step
    _train_steps(run, reporter, on_step, stop, faults)
    timings["loop_s"] = seconds = time.perf_counter() - run.loop_started
    return _finish(run, timings, seconds, start_step, thread_count)


def _announce(run: RunState, reporter: Reporter, pairs: int) -> None:
    config, accelerator = run.config, run.accelerator
    reporter.log(
        f"training {config.loss_type}{' + LoRA' if config.lora else ''} on {pairs} pairs: {run.total_steps} steps "
        f"({run.steps_per_epoch}/epoch), {accelerator.num_processes} process(es) [{accelerator.distributed_type.value}], "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}, "
        f"{run.trainable_count:,} of {run.total_count:,} parameters trainable, "
        f"{config.optimizer} at lr {config.learning_rate:g} with {config.warmup_steps} warm-up steps ({config.optimizer_recipe} recipe)"
        + (
            f", SeqKL from {'the cached reference top-k' if config.cached_reference_kl else 'a reference forward'}"
            if run.loss_config.needs_kl
            else ""
        )
    )
    if config.warmup_steps >= run.total_steps:
        reporter.log(
            f"warm-up of {config.warmup_steps} steps covers the whole {run.total_steps}-step run: the learning rate "
            f"peaks at {run.total_steps / max(1, config.warmup_steps):.0%} of {config.learning_rate:g} (set warmup_steps)"
        )


def _train_steps(
    run: RunState, reporter: Reporter, on_step: StepCallback | None, stop: StopSignals, faults: Faults
) -> None:
    """Optimizer steps from run.step to run.total_steps, over as many epochs as that takes."""
    config, accelerator = run.config, run.accelerator
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not (config.progress and accelerator.is_main_process),
        desc=f"train {config.loss_type}",
        dynamic_ncols=True,
    )
    run.loop_started = run.step_started = time.perf_counter()
    report_every = max(1, run.total_steps // 10)
    run.policy.train()
    for epoch in range(run.step // run.steps_per_epoch, run.num_epochs):
        if run.step >= run.total_steps:
            break
        run.loader.set_epoch(epoch)
        skip = (run.step - epoch * run.steps_per_epoch) * run.gas
        epoch_loader = accelerator.skip_first_batches(run.loader, skip) if skip > 0 else run.loader
        micro: list[dict[str, torch.Tensor]] = []
        micro_tokens = 0
        for batch in epoch_loader:
            batch = _with_current_anchors(run, batch, len(micro))
            loss, stats, tokens, grad_norm, learning_rate = _micro_batch(
                run, batch, epoch, len(micro), faults
            )
            micro.append({"loss": loss.detach(), **stats})
            micro_tokens += tokens
            if not accelerator.sync_gradients:
                continue
            if not run.optimizer.step_was_skipped:
                run.scheduler.step()
            run.step += 1
            metrics = _step_metrics(run, micro, micro_tokens, grad_norm, learning_rate)
            micro, micro_tokens = [], 0
            _report_step(run, metrics, reporter, on_step, bar, report_every)
            _after_step(run, reporter, stop, faults)
            if run.step >= run.total_steps:
                break
    bar.close()


def _with_current_anchors(run: RunState, batch: TrainingBatch, micro_index: int) -> TrainingBatch:
    """The batch with the anchors re-sampled so far (the loader may have collated it before a refresh),
    or under anchor_refresh_every 1 with anchors sampled for it now."""
    refresh, config, accelerator = run.refresh, run.config, run.accelerator
    if refresh is not None and config.anchor_refresh_every == 1:
        # Seeded by the micro-batch's place in the run, so a resumed run samples what it would have.
        return refresh.for_batch(
            accelerator.unwrap_model(run.policy),
            batch,
            run.features_by_id,
            accelerator.device,
            seed=config.seed + 1_000_003 * accelerator.process_index + run.step * run.gas + micro_index,
        )
    if refresh is not None and refresh.texts:
        return refresh.override(batch, run.features_by_id, accelerator.device)
    return batch


def _micro_batch(
    run: RunState, batch: TrainingBatch, epoch: int, micro_index: int, faults: Faults
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, torch.Tensor | None, float | None]:
    """Forward and backward of one micro-batch; on the last of a step, clipping and the optimizer step.

    Returns the loss, its statistics, the tokens read, and on the last micro-batch of a step the gradient
    norm and the learning rate the step used.
    """
    config, accelerator, optimizer = run.config, run.accelerator, run.optimizer
    with accelerator.accumulate(run.policy):
        loss, stats, tokens = compute_batch_loss(
            run.policy,
            run.reference,
            batch,
            run.loss_config,
            run.sides,
            run.pad_token_id,
            run.weights_fn,
            config.batch_layout,
            run.attention,
        )
        if (
            faults.nan_at_step is not None
            and run.step + 1 == faults.nan_at_step
            and accelerator.process_index == accelerator.num_processes - 1
        ):
            loss = loss * float("nan")
        _guard_finite(run, loss.detach(), "loss", epoch, micro_index, batch)
        accelerator.backward(loss)
        grad_norm = learning_rate = None
        if accelerator.sync_gradients:
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(run.policy.parameters(), max_norm)
            if grad_norm is not None:  # DeepSpeed clips itself and reports a float (or None)
                grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=accelerator.device)
            if grad_norm is not None and accelerator.mixed_precision != "fp16":
                # fp16's scaler skips overflowing steps by itself; elsewhere inf grads are a failure.
                _guard_finite(run, grad_norm.detach(), "gradient norm", epoch, micro_index, batch)
            learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, stats, tokens, grad_norm, learning_rate


def _step_metrics(
    run: RunState,
    micro: list[dict[str, torch.Tensor]],
    micro_tokens: int,
    grad_norm: torch.Tensor | None,
    learning_rate: float | None,
) -> dict[str, float]:
    """One optimizer step's metrics (config.STEP_METRICS and the loss statistics), averaged over its
    micro-batches and processes; appended to the run's history."""
    accelerator = run.accelerator
    keys = list(micro[0].keys())
    local = torch.stack([torch.stack([m[k].float() for k in keys]) for m in micro]).mean(0)
    reduced = accelerator.reduce(local.to(accelerator.device), reduction="mean")
    step_tokens = accelerator.reduce(torch.tensor([micro_tokens], device=accelerator.device), "sum")
    run.tokens_seen += int(step_tokens.item())
    now = time.perf_counter()
    metrics = {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["learning_rate"] = float(learning_rate)  # type: ignore[arg-type]  # set on a step's last micro-batch
    metrics["tokens_per_second"] = run.tokens_seen / max(now - run.loop_started, 1e-9)
    metrics["num_tokens"] = float(run.tokens_seen)
    metrics["epoch"] = run.step / run.steps_per_epoch
    metrics["step_seconds"] = now - run.step_started
    run.step_started = now
    run.history.append({"step": run.step, **metrics})
    return metrics


def _report_step(
    run: RunState,
    metrics: dict[str, float],
    reporter: Reporter,
    on_step: StepCallback | None,
    bar: Any,
    report_every: int,
) -> None:
    config, step = run.config, run.step
    if step % config.log_every == 0 or step == run.total_steps:
        reporter.metrics(step, metrics)
    if on_step is not None:
        on_step(step, metrics)
    bar.update(1)
    bar.set_postfix(
        loss=f"{metrics['loss']:.4f}",
        acc=f"{metrics['rewards/accuracies']:.2f}",
        tok_s=f"{metrics['tokens_per_second']:.0f}",
    )
    if step % report_every == 0 and not (config.progress and run.accelerator.is_main_process):
        reporter.log(
            f"step {step}/{run.total_steps} loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.2f} "
            f"{metrics['tokens_per_second']:.0f} tok/s"
        )


def _after_step(run: RunState, reporter: Reporter, stop: StopSignals, faults: Faults) -> None:
    """Between optimizer steps: anchor re-sampling, the periodic checkpoint, planted faults, and a
    requested stop (checkpointed, then TrainingInterrupted)."""
    config, accelerator, step, total_steps = run.config, run.accelerator, run.step, run.total_steps
    if (
        run.refresh is not None
        and config.anchor_refresh_every > 1
        and step % config.anchor_refresh_every == 0
        and step < total_steps
    ):
        count = run.refresh.apply(
            accelerator.unwrap_model(run.policy), run.features_by_id, seed=config.seed + step
        )
        reporter.custom({"event": "anchors_refreshed", "step": step, "anchors": count})
        reporter.log(f"re-sampled {count} anchors from the policy after step {step}")
    if config.checkpoint_every > 0 and step % config.checkpoint_every == 0 and step < total_steps:
        path = run.save_checkpoint()
        reporter.custom({"event": "checkpoint", "step": step, "path": str(path)})
        reporter.log(f"checkpoint {path}")
    if faults.kill_at_step is not None and step == faults.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.sigterm_at_step == step and accelerator.is_main_process:
        os.kill(os.getpid(), signal.SIGTERM)
    if step < total_steps and stop.should_stop(accelerator):
        path = run.save_checkpoint()
        reporter.custom({"event": "checkpoint", "step": step, "path": str(path)})
        name = (
            signal.Signals(stop.received).name if stop.received is not None else "a signal on another process"
        )
        raise TrainingInterrupted(
            f"stopped by {name} after optimizer step {step} of {total_steps}; the state is saved in {path} "
            "and a re-run (re-materialize the asset) resumes from it"
        )


def _finish(
    run: RunState, timings: dict[str, float], seconds: float, start_step: int, thread_count: int
) -> TrainSummary:
    """Save the final model, then the summary (returned, and written as summary.json)."""
    accelerator, step = run.accelerator, run.step
    started = time.perf_counter()
    final_path = RunDir(run.output_dir).final_model
    _save_final(accelerator, run.policy, run.tokenizer, run.config, final_path)
    timings["save_s"] = time.perf_counter() - started
    history = run.history
    summary = TrainSummary(
        steps=step,
        epochs_completed=min(run.num_epochs, math.ceil(step / run.steps_per_epoch)),
        final_model_path=str(final_path),
        first_loss=history[0]["loss"] if history else float("nan"),
        last_loss=history[-1]["loss"] if history else float("nan"),
        resumed_from=run.resumed_from,
        tokens_per_second=run.tokens_seen / max(seconds, 1e-9),
        seconds=seconds,
        history=history,
        steps_this_run=step - start_step,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        mixed_precision=str(accelerator.mixed_precision),
        trainable_parameters=run.trainable_count,
        total_parameters=run.total_count,
        peak_rss_mb=_peak_rss_mb(),
        torch_threads=thread_count,
        timings={k: round(v, 4) for k, v in timings.items()},
    )
    if accelerator.is_main_process:
        summary_path = RunDir(run.output_dir).summary
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(summary), indent=1))
        tmp.replace(summary_path)
    return summary


def _guard_finite(
    run: RunState, value: torch.Tensor, what: str, epoch: int, micro_index: int, batch: TrainingBatch
) -> None:
    """Stop every process when `value` is non-finite on any of them, after checkpointing the last good state.

    Collective (a one-element all-reduce): a process that stopped alone would leave the others waiting
    in the next gradient all-reduce. The update of the failing step has not been applied, so the model,
    optimizer and scheduler are still those after `step` optimizer steps.
    """
    accelerator, step = run.accelerator, run.step
    bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad.item()) == 0.0:
        return
    local = {
        "process": accelerator.process_index,
        "finite": bool(torch.isfinite(value).all()),
        "value": float(value.float().flatten()[0]) if value.numel() else float("nan"),
        "pairs": list(batch.pair_ids),
    }
    everyone = gather_object([local]) if accelerator.num_processes > 1 else [local]
    culprits = [r for r in everyone if not r["finite"]]
    path = run.save_checkpoint()
    where = "; ".join(
        f"process {r['process']}: {what} {r['value']} on pairs {r['pairs'][:8]}{'...' if len(r['pairs']) > 8 else ''}"
        for r in culprits
    )
    raise NonFiniteLossError(
        f"non-finite {what} at optimizer step {step + 1} (epoch {epoch}, micro-batch {micro_index + 1} of "
        f"{accelerator.gradient_accumulation_steps}; {where}). The update was not applied; the last good state "
        f"(after step {step}) is saved in {path}."
    )
