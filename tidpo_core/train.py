"""The TI-DPO training engine.

Runs unchanged under plain `python -m tidpo_core.train --config run.yaml` (one process) and under
`accelerate launch [--config_file F] -m tidpo_core.train --config run.yaml` (DDP, FSDP, DeepSpeed).
The reference model's per-token log-probs and the token weights are precomputed (DuckDB), so a step
runs the policy only, plus a no-grad reference forward when the TDPO sequential-KL term (alpha > 0)
needs full reference distributions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from tidpo_core import store
from tidpo_core.features import EncodingSettings, TrainingCollator, build_features, stack_sides
from tidpo_core.importance import Normalization
from tidpo_core.losses import LossConfig, SideTensors, compute_loss, sequence_kl, token_kl, token_logps
from tidpo_core.modeling import load_model_and_tokenizer

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE.json"


@dataclass
class TrainConfig:
    """Everything one training run needs; serialised as the YAML handed to the training process."""

    duckdb_path: str
    reference_model_path: str
    output_dir: str
    weights_fingerprint: str | None = None
    anchors_fingerprint: str | None = None
    # loss (names follow the paper: beta, alpha, gamma, lambda)
    loss_type: Literal["dpo", "ipo", "simpo", "tidpo"] = "tidpo"
    beta: float = 0.1
    alpha: float = 0.5
    gamma: float = 0.1
    triplet_margin: float = 0.01
    triplet_space: Literal["logratio", "hidden"] = "logratio"
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    uniform_weights: bool = False
    weight_lambda: float = 0.7
    weight_normalization: Normalization = "max"
    # optimisation
    learning_rate: float = 5e-4
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 10
    num_epochs: int = 1
    max_steps: int = -1
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    seed: int = 0
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    # checkpoints
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    # tracking
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log_every: int = 1
    progress: bool = True
    # test hook: make the loss of this optimizer step non-finite (exercises the NaN guard)
    inject_nan_at_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training config keys in {path}: {sorted(unknown)}")
        return cls(**raw)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(asdict(self), sort_keys=False))
        return path

    def loss_config(self) -> LossConfig:
        return LossConfig(
            loss_type=self.loss_type,
            beta=self.beta,
            alpha=self.alpha,
            gamma=self.gamma,
            triplet_margin=self.triplet_margin,
            triplet_space=self.triplet_space,
            simpo_beta=self.simpo_beta,
            simpo_gamma=self.simpo_gamma,
            uniform_weights=self.uniform_weights,
        )


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainSummary:
    steps: int
    epochs_completed: int
    final_model_path: str
    first_loss: float
    last_loss: float
    resumed_from: str | None
    tokens_per_second: float
    seconds: float
    history: list[dict[str, float]]


# --- reporting ---------------------------------------------------------------------------------------


class Reporter:
    """Where step metrics go: MLflow (main process only), Dagster Pipes when launched by Dagster."""

    def __init__(self, config: TrainConfig, is_main: bool):
        self.is_main = is_main
        self._pipes = None
        self._mlflow = None
        if not is_main:
            return
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self._pipes = self._pipes_cm.__enter__()
        if config.mlflow_tracking_uri and config.mlflow_run_id:
            import mlflow

            self._mlflow = mlflow.MlflowClient(tracking_uri=config.mlflow_tracking_uri)
            self._run_id = config.mlflow_run_id

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self._pipes is not None:
            self._pipes.log.info(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.log_batch(
                self._run_id, metrics=[Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
            )

    def custom(self, payload: dict[str, Any]) -> None:
        if self._pipes is not None:
            self._pipes.report_custom_message(payload)

    def close(self, summary: dict[str, Any] | None) -> None:
        if self._pipes is not None:
            if summary is not None:
                self._pipes.report_asset_materialization(
                    metadata={
                        "steps": summary["steps"],
                        "first_loss": summary["first_loss"],
                        "last_loss": summary["last_loss"],
                        "tokens_per_second": summary["tokens_per_second"],
                        "final_model_path": {"raw_value": summary["final_model_path"], "type": "path"},
                        "resumed_from": str(summary["resumed_from"]),
                    }
                )
            self._pipes_cm.__exit__(None, None, None)


# --- checkpoints -------------------------------------------------------------------------------------


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


def save_checkpoint(
    accelerator: Accelerator, checkpoint_root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    path = checkpoint_root / f"step_{step}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / COMPLETE_MARKER).write_text(json.dumps(state))
        for _, old in complete_checkpoints(checkpoint_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


# --- the step ------------------------------------------------------------------------------------------


def _pooled_hidden(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def compute_batch_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict[str, Any],
    loss_config: LossConfig,
    sides: Sequence[str],
    pad_token_id: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss and statistics of one micro-batch; the model runs once over all sides stacked."""
    stacked = stack_sides(batch, sides, pad_token_id)
    want_hidden = loss_config.loss_type == "tidpo" and loss_config.triplet_space == "hidden"
    out = policy(
        input_ids=stacked["input_ids"],
        attention_mask=stacked["attention_mask"],
        output_hidden_states=want_hidden,
    )
    logits = out.logits.float()
    policy_logps = token_logps(logits, stacked["input_ids"])
    reference_logps = stacked.get("reference_logps")
    kl = None
    if reference is not None:
        with torch.no_grad():
            ref_logits = reference(input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]).logits
        ref_logits = ref_logits.float()
        reference_logps = token_logps(ref_logits, stacked["input_ids"])
        if loss_config.needs_kl:
            kl = sequence_kl(token_kl(ref_logits, logits), stacked["response_mask"])
    hidden = _pooled_hidden(out.hidden_states[-1].float(), stacked["response_mask"]) if want_hidden else None

    batch_size = batch[f"{sides[0]}_input_ids"].shape[0]

    def side(i: int) -> SideTensors:
        part = slice(i * batch_size, (i + 1) * batch_size)
        return SideTensors(
            policy_logps=policy_logps[part],
            response_mask=stacked["response_mask"][part],
            reference_logps=None if reference_logps is None else reference_logps[part],
            weights=stacked["weights"][part],
            seq_kl=None if kl is None else kl[part],
            hidden=None if hidden is None else hidden[part],
        )

    chosen, rejected = side(0), side(1)
    anchor = side(2) if len(sides) > 2 else None
    loss, stats = compute_loss(loss_config, chosen, rejected, anchor)
    tokens = int(stacked["attention_mask"].sum().item())
    return loss, stats, tokens


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _mixed_precision(config: TrainConfig) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def load_training_features(config: TrainConfig, tokenizer) -> list[dict[str, Any]]:
    """Pairs, anchors and weights read from DuckDB in bulk, turned into features."""
    loss_config = config.loss_config()
    con = store.connect(config.duckdb_path, read_only=True)
    try:
        pairs = store.read_pairs(con, split="train")
        anchors = None
        if loss_config.needs_anchor:
            if not config.anchors_fingerprint:
                raise ValueError("loss tidpo with gamma > 0 needs anchors_fingerprint (the anchor_responses asset)")
            anchors = store.read_anchors(con, config.anchors_fingerprint)
        stored = None
        if config.weights_fingerprint:
            stored = store.read_token_weights(con, config.weights_fingerprint)
    finally:
        con.close()
    if not pairs:
        raise ValueError(f"no training pairs in {config.duckdb_path}")
    if stored is None and loss_config.needs_reference and not loss_config.needs_kl:
        raise ValueError(f"loss {config.loss_type} needs precomputed reference log-probs: set weights_fingerprint")
    settings = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    return build_features(
        tokenizer,
        pairs,
        settings,
        anchors=anchors,
        stored=stored,
        lambda_=config.weight_lambda,
        normalization=config.weight_normalization,
        uniform_weights=config.uniform_weights or config.loss_type != "tidpo",
    )


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainSummary:
    loss_config = config.loss_config()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(config),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(config.seed)
    reporter = Reporter(config, accelerator.is_main_process)
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"

    policy, tokenizer = load_model_and_tokenizer(config.reference_model_path)
    reference = None
    if loss_config.needs_kl:
        reference, _ = load_model_and_tokenizer(config.reference_model_path)
        reference.eval().requires_grad_(False)
    pad_token_id = tokenizer.pad_token_id
    sides = ("chosen", "rejected", "anchor") if loss_config.needs_anchor else ("chosen", "rejected")

    features = load_training_features(config, tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=TrainingCollator(pad_token_id, sides),
        generator=generator,
        drop_last=False,
    )
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps / accelerator.num_processes)
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_epochs
    num_epochs = math.ceil(total_steps / max(steps_per_epoch, 1))

    optimizer = _optimizer(config, [p for p in policy.parameters() if p.requires_grad])
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=min(config.warmup_steps, total_steps),
        num_training_steps=total_steps,
    )
    policy, optimizer, loader, scheduler = accelerator.prepare(policy, optimizer, loader, scheduler)
    if reference is not None:
        reference = reference.to(accelerator.device)

    step, resumed_from, history = 0, None, []
    checkpoints = complete_checkpoints(checkpoint_root) if config.resume else []
    if checkpoints:
        step, path = checkpoints[-1]
        accelerator.load_state(str(path))
        history = json.loads((path / COMPLETE_MARKER).read_text()).get("history", [])
        resumed_from = str(path)
        reporter.log(f"resumed from {path} at step {step}")

    if accelerator.is_main_process:
        reporter.log(
            f"training {config.loss_type} on {len(features)} pairs: {total_steps} steps, "
            f"{accelerator.num_processes} process(es), device {accelerator.device}"
        )
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (config.progress and accelerator.is_main_process),
        desc=f"train {config.loss_type}",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    tokens_seen = 0
    policy.train()
    start_epoch = step // steps_per_epoch if steps_per_epoch else 0
    for epoch in range(start_epoch, num_epochs):
        loader.set_epoch(epoch)
        batches_done = (step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done > 0 else loader
        micro: list[dict[str, torch.Tensor]] = []
        for batch in epoch_loader:
            with accelerator.accumulate(policy):
                loss, stats, tokens = compute_batch_loss(policy, reference, batch, loss_config, sides, pad_token_id)
                if config.inject_nan_at_step is not None and step + 1 == config.inject_nan_at_step:
                    loss = loss * float("nan")
                if not torch.isfinite(loss).all():
                    # The update of this step has not been applied: the model is still the last good state.
                    path = save_checkpoint(
                        accelerator, checkpoint_root, step, {"step": step, "history": history}, config.keep_checkpoints
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss at optimizer step {step + 1} (epoch {epoch}, batch of pairs "
                        f"{batch['pair_id'][:4]}{'...' if len(batch['pair_id']) > 4 else ''}); "
                        f"last good state saved to {path}"
                    )
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro.append({"loss": loss.detach(), **stats})
            tokens_seen += tokens
            if not accelerator.sync_gradients:
                continue
            step += 1
            keys = micro[0].keys()
            local = torch.stack([torch.stack([m[k].float() for k in keys]) for m in micro]).mean(0)
            reduced = accelerator.reduce(local.to(accelerator.device), reduction="mean")
            metrics = {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            metrics["learning_rate"] = float(scheduler.get_last_lr()[0])
            elapsed = time.perf_counter() - started
            metrics["tokens_per_second"] = tokens_seen * accelerator.num_processes / max(elapsed, 1e-9)
            micro = []
            history.append({"step": step, **metrics})
            if step % config.log_every == 0 or step == total_steps:
                reporter.metrics(step, metrics)
            if on_step is not None:
                on_step(step, metrics)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
                tok_s=f"{metrics['tokens_per_second']:.0f}",
            )
            if config.checkpoint_every > 0 and step % config.checkpoint_every == 0 and step < total_steps:
                path = save_checkpoint(
                    accelerator, checkpoint_root, step, {"step": step, "history": history}, config.keep_checkpoints
                )
                reporter.custom({"event": "checkpoint", "step": step, "path": str(path)})
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()
    seconds = time.perf_counter() - started

    final_path = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.save_pretrained(final_path, safe_serialization=True)
        tokenizer.save_pretrained(final_path)
    accelerator.wait_for_everyone()
    summary = TrainSummary(
        steps=step,
        epochs_completed=num_epochs,
        final_model_path=str(final_path),
        first_loss=history[0]["loss"] if history else float("nan"),
        last_loss=history[-1]["loss"] if history else float("nan"),
        resumed_from=resumed_from,
        tokens_per_second=tokens_seen * accelerator.num_processes / max(seconds, 1e-9),
        seconds=seconds,
        history=history,
    )
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    reporter.close(asdict(summary))
    accelerator.end_training()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a policy with TI-DPO (or dpo/ipo/simpo).")
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig fields")
    args = parser.parse_args(argv)
    train(TrainConfig.from_yaml(args.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
