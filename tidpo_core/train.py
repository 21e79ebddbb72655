"""The TI-DPO training engine.

One code path for every scale:

    python -m tidpo_core.train --config run.yaml                                    # one process
    accelerate launch --multi_gpu --num_processes 2 -m tidpo_core.train --config run.yaml  # DDP (CPU: gloo)
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m tidpo_core.train --config run.yaml

On a machine without a GPU the engine asks accelerate for CPU processes itself, so the torchrun-based
launcher (``--multi_gpu``) gives N gloo processes; ``accelerate launch --cpu`` on the other hand picks
accelerate's simple/MPI launcher, which starts ONE process unless mpirun is used (see
configs/accelerate/README.md).

The reference model's per-token log-probs and the token weights are precomputed (DuckDB), so a step runs
the policy only, plus a no-grad reference forward when the TDPO sequential-KL term (alpha > 0) needs the
full reference distributions. With ``lora: true`` that reference is the policy's own base with the
adapter disabled: no second model in memory.

Checkpoints (``accelerator.save_state``: model, optimizer, scheduler, RNG states; the data position in
the COMPLETE marker, written last) are taken every ``checkpoint_every`` optimizer steps; a re-run with
``resume: true`` continues from the newest complete one and ends with the same weights as an
uninterrupted run with the same seed: the sampler is seeded per epoch (accelerate's seedable sampler),
``skip_first_batches`` skips what was already consumed, and the scheduler is registered for checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tidpo_core import store
from tidpo_core.features import (
    EncodingSettings,
    TrainingCollator,
    build_features,
    encode_response,
    side_features,
    stack_sides,
)
from tidpo_core.generation import SamplingSettings, sample_responses
from tidpo_core.importance import (
    Normalization,
    compute_token_importance,
    gradient_attribution,
    hybrid_weights,
)
from tidpo_core.losses import (
    LossConfig,
    SideTensors,
    coarsened_kl,
    compute_dtype,
    compute_loss,
    kl_from_logits,
    sequence_kl,
)
from tidpo_core.modeling import load_model_and_tokenizer
from tidpo_core.packing import (
    BATCH_LAYOUTS,
    BatchLayout,
    attention_implementation,
    lay_out,
    shared_prompt_obstacle,
)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE.json"
# The metrics every optimizer step reports, under TRL's DPOTrainer names (plus triplet for TI-DPO).
STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
    "tokens_per_second",
    "num_tokens",
    "epoch",
    "step_seconds",
)
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


@dataclass
class TrainConfig:
    """Everything one training run needs; serialised as the YAML handed to the training process."""

    duckdb_path: str
    reference_model_path: str
    output_dir: str
    reference_revision: str | None = None
    """Hub revision (branch, tag or commit) of the reference: the one the weights and anchors were made with."""
    init_model_path: str | None = None
    """Start the policy from these weights (same architecture and tokenizer as the reference) instead of the
    reference's: a retraining that continues from the current champion. Log-ratios, the KL term, the token
    weights and the anchors still come from the reference."""
    trust_remote_code: bool = False
    weights_fingerprint: str | None = None
    anchors_fingerprint: str | None = None
    # loss (names follow the paper: beta, alpha, gamma, lambda)
    loss_type: Literal["dpo", "ipo", "simpo", "tidpo"] = "tidpo"
    beta: float = 0.1
    alpha: float = 0.5
    gamma: float = 0.1
    triplet_margin: float = 0.01
    triplet_space: Literal["sequence", "weighted_mean", "hidden"] = "sequence"
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    uniform_weights: bool = False
    weight_lambda: float = 0.7
    weight_normalization: Normalization = "max"
    anchor_refresh_every: int = 0
    """Re-sample every train pair's anchor from the current policy every N optimizer steps (METHOD.md's
    option; each refresh samples all train prompts and weighs the new anchors with the reference).
    1 is the authors' algorithm: each micro-batch's anchors are sampled from the current policy right
    before its forward (its prompts only). 0: the anchor_responses asset's reference samples throughout."""
    reference_kl: Literal["forward", "cached"] = "forward"
    """Where SeqKL (alpha > 0) gets the reference distribution. `forward`: a frozen reference runs every
    step over chosen and rejected, the full vocabulary exactly as METHOD.md writes it. `cached`: the
    reference's top-k next-token distribution stored by the token_weights asset (reference_kl_top_k > 0),
    so a step runs the policy only and no second model is held; the KL is then the coarsened
    (top-k + rest) KL, a lower bound equal to the exact one when k covers the vocabulary."""
    batch_layout: BatchLayout = "shared_prompt"
    """`shared_prompt`: one row per pair, the prompt read once and each response attending to it
    (tidpo_core.packing; needs sdpa or eager attention). `padded`: one padded row per side, the layout
    of TRL's DPOTrainer. Both give the same loss up to rounding."""
    weights_mode: Literal["precomputed", "online"] = "precomputed"
    """`precomputed`: the token_weights table (attribution by the reference, once). `online`: attribution
    recomputed with the current policy every step, as the paper does (one extra forward+backward)."""
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
    """`auto`: bf16 (or fp16) on a GPU, none on CPU; an explicit value wins over the launcher's."""
    model_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """dtype the policy is loaded in; float32 master weights are what mixed precision expects."""
    cpu: bool | None = None
    """None: run on CPU exactly when no GPU/accelerator is visible (also under torchrun: gloo)."""
    seed: int = 0
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    # parameter-efficient training
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    merge_lora: bool = True
    """Save the final model with the adapter merged (a plain HF model); false saves the adapter only."""
    # checkpoints
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    # tracking
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log_every: int = 1
    progress: bool = True
    # test hooks
    inject_nan_at_step: int | None = None
    """Make the loss of this optimizer step non-finite on the last process (exercises the NaN guard)."""
    inject_kill_at_step: int | None = None
    """SIGKILL the training process(es) right after this optimizer step (simulates a crash)."""
    inject_sigterm_at_step: int | None = None
    """Send SIGTERM to the main process right after this optimizer step (simulates preemption)."""
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

    @property
    def cached_reference_kl(self) -> bool:
        """SeqKL from the stored reference top-k instead of a reference forward."""
        return self.reference_kl == "cached" and self.loss_config().needs_kl

    @property
    def uniform_token_weights(self) -> bool:
        """Every token counts once: asked for, or a loss that does not weigh tokens."""
        return self.uniform_weights or self.loss_type != "tidpo"

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

    def __post_init__(self) -> None:
        if self.reference_kl not in ("forward", "cached"):
            raise ValueError(f"reference_kl must be 'forward' or 'cached', got {self.reference_kl!r}")
        if self.batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"batch_layout must be one of {BATCH_LAYOUTS}, got {self.batch_layout!r}")
        if self.weights_mode not in ("precomputed", "online"):
            raise ValueError(f"weights_mode must be 'precomputed' or 'online', got {self.weights_mode!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.init_model_path and self.lora:
            # LoRA's reference is its base with the adapter off: starting from other weights would change it.
            raise ValueError("init_model_path cannot be combined with lora: under LoRA the starting weights are the reference")
        self.lora_target_modules = list(self.lora_target_modules)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a step was NaN/inf; the last good state is checkpointed."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT (preemption, a cluster's time limit, Terminate in the Dagster UI) stopped the run
    at an optimizer-step boundary, after a checkpoint; a re-run resumes from it."""


# Written to the output dir by a run that failed: the exception's type and message.
FAILURE_FILE = "failure.txt"

# Exit status of a run stopped by a signal after checkpointing (128 + SIGTERM, the shell convention).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next optimizer step instead of dying mid-step.

    Schedulers (SLURM, Kubernetes) and Dagster's run termination send SIGTERM with a grace period; the
    engine uses it to checkpoint. Handlers are installed only in the main thread (Python's rule) and
    restored on exit; a second signal while stopping falls through to the previous handler.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            previous = self._previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum

    def should_stop(self, accelerator: Accelerator) -> bool:
        """Collective: every process stops at the same step if any one of them was signalled."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


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
    steps_this_run: int = 0
    num_processes: int = 1
    distributed_type: str = "NO"
    mixed_precision: str = "no"
    trainable_parameters: int = 0
    total_parameters: int = 0
    peak_rss_mb: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# --- reporting ---------------------------------------------------------------------------------------


class Reporter:
    """Where step metrics go: MLflow (main process only), Dagster Pipes when launched by Dagster."""

    def __init__(self, config: TrainConfig, is_main: bool):
        self.is_main = is_main
        self._pipes = None
        self._pipes_cm = None
        self._mlflow = None
        self._pending: list[Any] = []
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
        print(message, file=sys.stderr, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Log one step's metrics; asynchronously (a sqlite write costs tens of ms, a tiny step ~50 ms)."""
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
            self._pending.append(self._mlflow.log_batch(self._run_id, metrics=metrics, synchronous=False))

    def flush(self) -> None:
        """Wait until every logged metric is stored (before the process reports success or failure)."""
        pending, self._pending = self._pending, []
        for operation in pending:
            if operation is not None:
                operation.wait()

    def custom(self, payload: dict[str, Any]) -> None:
        if self._pipes is not None:
            self._pipes.report_custom_message(payload)

    def close(self, summary: dict[str, Any] | None, exc: BaseException | None = None) -> None:
        """Report the materialization (success) or the exception (failure) and close the Pipes session."""
        try:
            self.flush()
        except Exception as flush_error:  # a tracking hiccup must not hide the run's own outcome
            self.log(f"warning: could not flush MLflow metrics: {flush_error}")
        if self._pipes is None or self._pipes_cm is None:
            return
        if summary is not None and exc is None:
            self._pipes.report_asset_materialization(
                metadata={
                    "steps": summary["steps"],
                    "steps_this_run": summary["steps_this_run"],
                    "first_loss": summary["first_loss"],
                    "last_loss": summary["last_loss"],
                    "tokens_per_second": summary["tokens_per_second"],
                    "num_processes": summary["num_processes"],
                    "distributed_type": summary["distributed_type"],
                    "mixed_precision": summary["mixed_precision"],
                    "trainable_parameters": summary["trainable_parameters"],
                    "peak_rss_mb": summary["peak_rss_mb"],
                    "final_model_path": {"raw_value": summary["final_model_path"], "type": "path"},
                    "resumed_from": str(summary["resumed_from"]),
                }
            )
        cm, self._pipes, self._pipes_cm = self._pipes_cm, None, None
        if exc is None:
            cm.__exit__(None, None, None)
        else:
            cm.__exit__(type(exc), exc, exc.__traceback__)


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


# --- the step ------------------------------------------------------------------------------------------


ReferenceFn = Callable[..., torch.Tensor]
"""Logits of the frozen reference for a model's keyword inputs (input_ids, attention_mask, ...)."""
WeightsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _pooled_hidden(hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def frozen_reference(model: torch.nn.Module, autocast: Callable[[], Any] | None = None) -> ReferenceFn:
    """Logits of a separate frozen reference model (no grad, eval mode)."""
    # Two calls: a DeepSpeed engine's eval() returns None, not the module.
    model.eval()
    model.requires_grad_(False)

    def logits(**inputs: Any) -> torch.Tensor:
        with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
            return model(**inputs).logits

    return logits


def adapter_disabled_reference(policy: torch.nn.Module, peft_model: Any) -> ReferenceFn:
    """Logits of the policy's base model with its LoRA adapter disabled: the reference, at no memory cost.

    The forward goes through `policy` (the DDP/FSDP wrapper, if any) so sharded models gather their
    parameters as usual; eval mode for the duration so dropout never touches the reference.
    """

    def logits(**inputs: Any) -> torch.Tensor:
        was_training = peft_model.training
        peft_model.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                return policy(**inputs).logits
        finally:
            peft_model.train(was_training)

    return logits


def online_weights(model: torch.nn.Module, lambda_: float, normalization: Normalization) -> WeightsFn:
    """`weights: online` (METHOD.md section 1): hybrid weights from the current policy's attribution.

    Gradients are taken with respect to the input embeddings only, so the parameters' .grad (the training
    gradient being accumulated) is untouched. `model` is the unwrapped policy.
    """

    def weights(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = stacked["response_mask"] != 0
        attribution = gradient_attribution(
            model, stacked["input_ids"], stacked["attention_mask"], mask.long()
        ).detach()
        out = torch.zeros_like(stacked["weights"])
        for row in range(out.shape[0]):
            if mask[row].any():
                out[row, mask[row]] = hybrid_weights(attribution[row][mask[row]].float().cpu(), lambda_, normalization).to(
                    out.device, out.dtype
                )
        return out

    return weights


@dataclass
class _ForwardResult:
    """A forward's per-token quantities in the stacked padded layout, whatever the batch layout was."""

    policy_logps: torch.Tensor
    reference_logps: torch.Tensor | None
    seq_kl: torch.Tensor | None
    pooled_hidden: torch.Tensor | None
    tokens: int


def _forward(policy, reference, layout, stacked, loss_config, want_hidden) -> _ForwardResult:
    """The policy (and where needed the reference) over one batch in either layout (tidpo_core.packing)."""
    pairs = layout.first_sides(2)
    pair_mask = stacked["response_mask"][: 2 * layout.batch_size]
    reference_logps = stacked.get("reference_logps")
    ref_logits = None
    if reference is not None and (reference_logps is None or loss_config.needs_kl):
        # Missing log-probs need every side. SeqKL needs chosen and rejected only: they come first, so the
        # reference reads their rows (padded) or the columns up to their last token (shared prompt).
        ref_logits = reference(**(layout if reference_logps is None else pairs).model_inputs())
        ref_logits = ref_logits.to(compute_dtype(ref_logits))
        if reference_logps is None:
            reference_logps = layout.token_logps(ref_logits, stacked["input_ids"])
    out = policy(**layout.model_inputs(), output_hidden_states=want_hidden)
    # float32 at least (bf16 logits lose too much in logsumexp); a float64 model stays float64 (tests).
    logits = out.logits.to(compute_dtype(out.logits))
    # One logsumexp serves the log-probs and the KL: no log-softmax of the policy's logits is built.
    log_normalizer = torch.logsumexp(logits, dim=-1)
    kl = None
    if ref_logits is not None and loss_config.needs_kl:
        per_position = kl_from_logits(pairs.prefix(ref_logits), pairs.prefix(logits), pairs.prefix(log_normalizer))
        kl = sequence_kl(pairs.per_token(per_position), pair_mask)
    elif loss_config.needs_kl and "reference_topk_ids" in stacked:
        top_ids = stacked["reference_topk_ids"]
        policy_top = pairs.gather_vocabulary(pairs.prefix(logits), top_ids) - pairs.per_token(
            pairs.prefix(log_normalizer)
        ).unsqueeze(-1)
        whole_vocabulary = top_ids.shape[-1] >= logits.shape[-1]
        per_token = coarsened_kl(stacked["reference_topk_logp"], policy_top, whole_vocabulary=whole_vocabulary)
        kl = sequence_kl(pairs.scored_only(per_token), pair_mask)
    return _ForwardResult(
        policy_logps=layout.token_logps(logits, stacked["input_ids"], log_normalizer),
        reference_logps=reference_logps,
        seq_kl=kl,
        pooled_hidden=_pooled_hidden(
            layout.hidden_per_token(out.hidden_states[-1].to(compute_dtype(out.hidden_states[-1]))), stacked["response_mask"]
        )
        if want_hidden
        else None,
        tokens=layout.tokens,
    )


def compute_batch_loss(
    policy: torch.nn.Module,
    reference: ReferenceFn | torch.nn.Module | None,
    batch: dict[str, Any],
    loss_config: LossConfig,
    sides: Sequence[str],
    pad_token_id: int,
    weights_fn: WeightsFn | None = None,
    batch_layout: BatchLayout = "shared_prompt",
    attention: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss and statistics of one micro-batch; the model runs once over all sides.

    `reference` gives full reference logits (needed for SeqKL when alpha > 0): a function of the model's
    keyword inputs, or a module used as a frozen reference. Without it SeqKL comes from the batch's cached
    reference top-k. The log-ratios use the batch's precomputed reference log-probs (DuckDB) where it has
    them, and the reference's otherwise.
    `batch_layout` picks one row per pair with the prompt read once (`shared_prompt`, tidpo_core.packing)
    or one padded row per side (`padded`); the two give the same loss up to rounding. `attention` is the
    policy's attention implementation (read from the model when not given).
    """
    if isinstance(reference, torch.nn.Module):
        reference = frozen_reference(reference)
    stacked = stack_sides(batch, sides, pad_token_id)
    if weights_fn is not None:
        stacked["weights"] = weights_fn(stacked)
    want_hidden = loss_config.loss_type == "tidpo" and loss_config.triplet_space == "hidden"
    attention = attention or attention_implementation(getattr(policy, "config", None))
    layout = lay_out(stacked, len(sides), pad_token_id, batch_layout, attention)
    result = _forward(policy, reference, layout, stacked, loss_config, want_hidden)
    batch_size = layout.batch_size

    def side(i: int) -> SideTensors:
        part = slice(i * batch_size, (i + 1) * batch_size)
        return SideTensors(
            policy_logps=result.policy_logps[part],
            response_mask=stacked["response_mask"][part],
            reference_logps=None if result.reference_logps is None else result.reference_logps[part],
            weights=stacked["weights"][part],
            seq_kl=None if result.seq_kl is None or i >= 2 else result.seq_kl[part],
            hidden=None if result.pooled_hidden is None else result.pooled_hidden[part],
        )

    chosen, rejected = side(0), side(1)
    anchor = side(2) if len(sides) > 2 else None
    loss, stats = compute_loss(loss_config, chosen, rejected, anchor)
    return loss, stats, result.tokens


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


def _mixed_precision(config: TrainConfig, cpu: bool) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _model_dtype(config: TrainConfig) -> str | torch.dtype:
    return "auto" if config.model_dtype == "auto" else getattr(torch, config.model_dtype)


# Pairs whose stored token weights are read and turned into features at a time: the rows of one chunk
# are the loader's peak memory, whatever the size of the data set.
FEATURE_CHUNK_PAIRS = 512


def load_training_features(
    config: TrainConfig, tokenizer, timings: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Pairs and anchors read from DuckDB in bulk, token weights in chunks of pairs, turned into features."""
    timings = timings if timings is not None else {}
    loss_config = config.loss_config()
    settings = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    read_s = features_s = 0.0
    features: list[dict[str, Any]] = []
    started = time.perf_counter()
    con = store.connect(config.duckdb_path, read_only=True)
    try:
        pairs = store.read_pairs(con, split="train")
        anchors = None
        if loss_config.needs_anchor:
            if not config.anchors_fingerprint:
                raise ValueError("loss tidpo with gamma > 0 needs anchors_fingerprint (the anchor_responses asset)")
            anchors = store.read_anchors(con, config.anchors_fingerprint)
        read_s += time.perf_counter() - started
        if not pairs:
            raise ValueError(f"no training pairs in {config.duckdb_path}")
        if not config.weights_fingerprint and loss_config.needs_reference and not loss_config.needs_kl:
            raise ValueError(f"loss {config.loss_type} needs precomputed reference log-probs: set weights_fingerprint")
        if not config.weights_fingerprint and config.cached_reference_kl:
            raise ValueError("reference_kl: cached reads the reference top-k stored with the token weights: set weights_fingerprint")
        pairs = sorted(pairs, key=lambda p: p.pair_id)  # chunks are id ranges; the loader shuffles anyway
        for begin in range(0, len(pairs), FEATURE_CHUNK_PAIRS):
            chunk = pairs[begin : begin + FEATURE_CHUNK_PAIRS]
            started = time.perf_counter()
            stored = None
            if config.weights_fingerprint:
                id_range = (chunk[0].pair_id, chunk[-1].pair_id)
                stored = store.read_token_weights(
                    con, config.weights_fingerprint, pair_id_range=id_range, with_reference_topk=config.cached_reference_kl
                )
            read_s += time.perf_counter() - started
            started = time.perf_counter()
            features += build_features(
                tokenizer,
                chunk,
                settings,
                anchors=anchors,
                stored=stored,
                lambda_=config.weight_lambda,
                normalization=config.weight_normalization,
                uniform_weights=config.uniform_token_weights,
            )
            features_s += time.perf_counter() - started
    finally:
        con.close()
    timings["duckdb_read_s"] = read_s
    timings["features_s"] = features_s
    return features


def _peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux's VmHWM (the high-water mark of this process image) first: getrusage's ru_maxrss survives
    exec, so a training process started by a large parent (a Dagster run, a benchmark holding a model)
    reported at least the parent's size at fork.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024**2 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


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


def _numel(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter; under DeepSpeed ZeRO-3 the local tensor is an empty shard, `ds_numel` the whole."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


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


def _zero_stage(accelerator: Accelerator) -> int | None:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def _check_sharding_support(config: TrainConfig, accelerator: Accelerator) -> None:
    """Online weights and anchor re-sampling run the unwrapped policy outside its wrapper (an embedding
    gradient, generate()), which a sharded model (FSDP, ZeRO-3) cannot do without gathering its weights."""
    sharded = accelerator.distributed_type == DistributedType.FSDP or _zero_stage(accelerator) == 3
    if not sharded:
        return
    unsupported = [
        name for name, used in (
            ("weights_mode: online", config.weights_mode == "online" and config.loss_type == "tidpo"),
            ("anchor_refresh_every > 0", config.anchor_refresh_every > 0),
        ) if used
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


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def sample_anchor_features(
    policy: torch.nn.Module,
    weigher: torch.nn.Module,
    tokenizer: Any,
    prompts: dict[str, str],
    config: TrainConfig,
    seed: int,
    texts: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, np.ndarray]]]:
    """Anchors for the given prompts, sampled from `policy` (or the given texts), with their weights.

    `weigher` computes the attribution and the reference log-probs of the anchors: the reference model,
    so that a refreshed anchor's log-ratio means what a stored one's does. An empty sample keeps no
    anchor (the pair's previous one stays).
    """
    ids = sorted(prompts)
    if texts is None:
        settings = SamplingSettings(seed=seed, max_prompt_tokens=config.max_prompt_tokens)
        sampled = sample_responses(policy, tokenizer, [prompts[i] for i in ids], settings)
        texts = {i: t for i, t in zip(ids, sampled, strict=True) if t.strip()}
    encoding = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    keep = [i for i in ids if i in texts]
    encoded = [encode_response(tokenizer, prompts[i], texts[i], encoding) for i in keep]
    importances = compute_token_importance(
        weigher, encoded, lambda_=config.weight_lambda, normalization=config.weight_normalization
    )
    sides: dict[str, dict[str, np.ndarray]] = {}
    for pair_id, enc, imp in zip(keep, encoded, importances, strict=True):
        response_ids = np.asarray(enc.input_ids)[np.asarray(enc.response_mask, dtype=bool)]
        weights = store.StoredWeights(response_ids, imp.attribution, imp.prior, imp.weight, imp.reference_logp)
        sides[pair_id] = side_features(
            "anchor", enc, weights, lambda_=config.weight_lambda, normalization=config.weight_normalization,
            uniform_weights=config.uniform_token_weights, label=f"{pair_id}/anchor",
        )
    return texts, sides


@dataclass
class _AnchorRefresh:
    """State of periodic anchor re-sampling: the texts of the current anchors, and how to weigh new ones."""

    config: TrainConfig
    weigher: torch.nn.Module
    tokenizer: Any
    prompts: dict[str, str]
    collator: TrainingCollator
    texts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, config, loss_config, reference_module, tokenizer, pad_token_id) -> _AnchorRefresh | None:
        if config.anchor_refresh_every <= 0:
            return None
        if not loss_config.needs_anchor:
            raise ValueError("anchor_refresh_every needs a loss with a triplet term (loss_type tidpo, gamma > 0)")
        weigher = reference_module if reference_module is not None else _load_reference(config)[0]
        con = store.connect(config.duckdb_path, read_only=True)
        try:
            prompts = {p.pair_id: p.prompt for p in store.read_pairs(con, split="train")}
        finally:
            con.close()
        return cls(config, weigher, tokenizer, prompts, TrainingCollator(pad_token_id, ("anchor",)))

    def apply(self, policy, features_by_id, *, seed: int = 0, texts: dict[str, str] | None = None) -> int:
        """Sample (or restore) the anchors and put them into the features; returns how many changed."""
        self.weigher.to(next(policy.parameters()).device)
        new_texts, sides = sample_anchor_features(policy, self.weigher, self.tokenizer, self.prompts, self.config, seed, texts)
        for pair_id, side in sides.items():
            if pair_id in features_by_id:
                features_by_id[pair_id].update(side)
        self.texts.update(new_texts)
        return len(sides)

    def for_batch(self, policy, batch: dict[str, Any], features_by_id, device, *, seed: int) -> dict[str, Any]:
        """The batch with fresh anchors for its own prompts, sampled from `policy` now (anchor_refresh_every 1)."""
        self.weigher.to(next(policy.parameters()).device)
        prompts = {pair_id: self.prompts[pair_id] for pair_id in batch["pair_id"]}
        new_texts, sides = sample_anchor_features(policy, self.weigher, self.tokenizer, prompts, self.config, seed)
        for pair_id, side in sides.items():
            features_by_id[pair_id].update(side)
        self.texts.update(new_texts)
        return self.override(batch, features_by_id, device)

    def override(self, batch: dict[str, Any], features_by_id, device) -> dict[str, Any]:
        """The batch with its anchor side rebuilt from the current features: the data loader may have
        collated it before the last refresh."""
        fresh = self.collator([features_by_id[p] for p in batch["pair_id"]])
        return {**batch, **{k: v.to(device) for k, v in fresh.items() if k.startswith("anchor_")}}


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainSummary:
    """Run (or resume) one training run; see the module docstring."""
    cpu = _use_cpu(config)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(config, cpu),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    reporter = Reporter(config, accelerator.is_main_process)
    failure_file = Path(config.output_dir) / FAILURE_FILE
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
    on_step: Callable[[int, dict[str, float]], None] | None,
    stop: StopSignals,
) -> TrainSummary:
    loss_config = config.loss_config()
    timings: dict[str, float] = {}
    set_seed(config.seed)
    _warn_single_cpu_launch(accelerator, reporter)
    _check_sharding_support(config, accelerator)
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"

    started = time.perf_counter()
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
    timings["model_load_s"] = time.perf_counter() - started
    pad_token_id = tokenizer.pad_token_id
    sides = ("chosen", "rejected", "anchor") if loss_config.needs_anchor else ("chosen", "rejected")

    features = load_training_features(config, tokenizer, timings)
    features_by_id = {f["pair_id"]: f for f in features}
    refresh = _AnchorRefresh.create(config, loss_config, reference_module, tokenizer, pad_token_id)
    loader = DataLoader(
        features,  # type: ignore[arg-type]
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=TrainingCollator(pad_token_id, sides),
        generator=torch.Generator().manual_seed(config.seed),
        drop_last=False,
    )
    model_config = getattr(policy, "config", None)
    attention = attention_implementation(model_config)
    if config.batch_layout == "shared_prompt":
        obstacle = shared_prompt_obstacle(model_config, config.max_prompt_tokens + config.max_response_tokens + 1)
        if obstacle:
            raise ValueError(f"batch_layout: shared_prompt cannot run this model: {obstacle}; set batch_layout: padded")
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
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Not passed to prepare(): accelerate's prepared scheduler steps num_processes times per optimizer step,
    # which would make the schedule depend on the process count. Stepped here once per optimizer step,
    # and saved/restored with the checkpoints.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(config.lr_scheduler, min(config.warmup_steps, total_steps), total_steps)
    )
    accelerator.register_for_checkpointing(scheduler)
    reference: ReferenceFn | None = None
    if reference_module is not None:
        reference = frozen_reference(_place_reference(accelerator, reference_module), accelerator.autocast)
    elif loss_config.needs_kl and peft_model is not None and not config.cached_reference_kl:
        reference = adapter_disabled_reference(policy, accelerator.unwrap_model(policy))
    weights_fn = None
    if config.weights_mode == "online" and config.loss_type == "tidpo" and not config.uniform_weights:
        weights_fn = online_weights(accelerator.unwrap_model(policy), config.weight_lambda, config.weight_normalization)

    step, resumed_from, history = 0, None, []
    if accelerator.is_main_process:
        if not config.resume and complete_checkpoints(checkpoint_root):
            # Checkpoints of an earlier run would mix into the keep-last-K rotation (and a later resume).
            reporter.log(f"resume: false, removing the earlier checkpoints in {checkpoint_root}")
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        _remove_incomplete(checkpoint_root)
    accelerator.wait_for_everyone()
    checkpoints = complete_checkpoints(checkpoint_root) if config.resume else []
    layout = {
        "num_processes": accelerator.num_processes,
        "per_device_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": gas,
        "seed": config.seed,
    }
    if checkpoints:
        step, path = checkpoints[-1]
        if accelerator.distributed_type == DistributedType.FSDP:
            materialize_optimizer_state(optimizer)
        accelerator.load_state(str(path))
        state = json.loads((path / COMPLETE_MARKER).read_text())
        history = state.get("history", [])
        resumed_from = str(path)
        if any(state.get("layout", {}).get(k, v) != v for k, v in layout.items()):
            reporter.log(
                f"warning: checkpoint {path} was written with {state.get('layout')}, resuming with {layout}: "
                "the data order after resuming differs from an uninterrupted run"
            )
        reporter.log(f"resumed from {path} at step {step}")
        if refresh is not None and state.get("anchors"):
            refresh.apply(accelerator.unwrap_model(policy), features_by_id, texts=state["anchors"])
            reporter.log(f"restored {len(state['anchors'])} anchors re-sampled before step {step}")

    def checkpoint_state(at_step: int) -> dict[str, Any]:
        return {
            "step": at_step,
            "epoch": at_step // steps_per_epoch,
            "batches_into_epoch": (at_step % steps_per_epoch) * gas,
            "layout": layout,
            "history": history,
            **({"anchors": refresh.texts} if refresh is not None and refresh.texts else {}),
        }

    reporter.log(
        f"training {config.loss_type}{' + LoRA' if config.lora else ''} on {len(features)} pairs: {total_steps} steps "
        f"({steps_per_epoch}/epoch), {accelerator.num_processes} process(es) [{accelerator.distributed_type.value}], "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}, "
        f"{trainable_count:,} of {total_count:,} parameters trainable"
        + (f", SeqKL from {'the cached reference top-k' if config.cached_reference_kl else 'a reference forward'}"
           if loss_config.needs_kl else "")
    )
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (config.progress and accelerator.is_main_process),
        desc=f"train {config.loss_type}",
        dynamic_ncols=True,
    )
    loop_started = time.perf_counter()
    step_started = loop_started
    tokens_seen = 0
    start_step = step
    report_every = max(1, total_steps // 10)
    policy.train()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if step >= total_steps:
            break
        loader.set_epoch(epoch)
        skip = (step - epoch * steps_per_epoch) * gas
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        micro: list[dict[str, torch.Tensor]] = []
        micro_tokens = 0
        for batch in epoch_loader:
            if refresh is not None and config.anchor_refresh_every == 1:
                # Seeded by the micro-batch's place in the run, so a resumed run samples what it would have.
                batch = refresh.for_batch(
                    accelerator.unwrap_model(policy), batch, features_by_id, accelerator.device,
                    seed=config.seed + 1_000_003 * accelerator.process_index + step * gas + len(micro),
                )
            elif refresh is not None and refresh.texts:
                batch = refresh.override(batch, features_by_id, accelerator.device)
            with accelerator.accumulate(policy):
                loss, stats, tokens = compute_batch_loss(
                    policy, reference, batch, loss_config, sides, pad_token_id, weights_fn, config.batch_layout, attention
                )
                if (
                    config.inject_nan_at_step is not None
                    and step + 1 == config.inject_nan_at_step
                    and accelerator.process_index == accelerator.num_processes - 1
                ):
                    loss = loss * float("nan")
                _guard_finite(
                    accelerator, loss.detach(), "loss", step, epoch, len(micro), batch, checkpoint_root,
                    checkpoint_state, config,
                )
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
                    if grad_norm is not None:  # DeepSpeed clips itself and reports a float (or None)
                        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=accelerator.device)
                    if grad_norm is not None and accelerator.mixed_precision != "fp16":
                        # fp16's scaler skips overflowing steps by itself; elsewhere inf grads are a failure.
                        _guard_finite(
                            accelerator, grad_norm.detach(), "gradient norm", step, epoch, len(micro), batch,
                            checkpoint_root, checkpoint_state, config,
                        )
                    learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro.append({"loss": loss.detach(), **stats})
            micro_tokens += tokens
            if not accelerator.sync_gradients:
                continue
            if not optimizer.step_was_skipped:
                scheduler.step()
            step += 1
            keys = list(micro[0].keys())
            local = torch.stack([torch.stack([m[k].float() for k in keys]) for m in micro]).mean(0)
            reduced = accelerator.reduce(local.to(accelerator.device), reduction="mean")
            step_tokens = accelerator.reduce(torch.tensor([micro_tokens], device=accelerator.device), "sum")
            tokens_seen += int(step_tokens.item())
            now = time.perf_counter()
            metrics = {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            metrics["learning_rate"] = float(learning_rate)
            metrics["tokens_per_second"] = tokens_seen / max(now - loop_started, 1e-9)
            metrics["num_tokens"] = float(tokens_seen)
            metrics["epoch"] = step / steps_per_epoch
            metrics["step_seconds"] = now - step_started
            step_started = now
            micro, micro_tokens = [], 0
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
            if step % report_every == 0 and not (config.progress and accelerator.is_main_process):
                reporter.log(
                    f"step {step}/{total_steps} loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.2f} "
                    f"{metrics['tokens_per_second']:.0f} tok/s"
                )
            if (
                refresh is not None
                and config.anchor_refresh_every > 1
                and step % config.anchor_refresh_every == 0
                and step < total_steps
            ):
                count = refresh.apply(accelerator.unwrap_model(policy), features_by_id, seed=config.seed + step)
                reporter.custom({"event": "anchors_refreshed", "step": step, "anchors": count})
                reporter.log(f"re-sampled {count} anchors from the policy after step {step}")
            if config.checkpoint_every > 0 and step % config.checkpoint_every == 0 and step < total_steps:
                path = save_checkpoint(
                    accelerator, checkpoint_root, step, checkpoint_state(step), config.keep_checkpoints
                )
                reporter.custom({"event": "checkpoint", "step": step, "path": str(path)})
                reporter.log(f"checkpoint {path}")
            if config.inject_kill_at_step is not None and step == config.inject_kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if config.inject_sigterm_at_step == step and accelerator.is_main_process:
                os.kill(os.getpid(), signal.SIGTERM)
            if step < total_steps and stop.should_stop(accelerator):
                path = save_checkpoint(
                    accelerator, checkpoint_root, step, checkpoint_state(step), config.keep_checkpoints
                )
                reporter.custom({"event": "checkpoint", "step": step, "path": str(path)})
                name = signal.Signals(stop.received).name if stop.received is not None else "a signal on another process"
                raise TrainingInterrupted(
                    f"stopped by {name} after optimizer step {step} of {total_steps}; the state is saved in {path} "
                    "and a re-run (re-materialize the asset) resumes from it"
                )
            if step >= total_steps:
                break
    bar.close()
    seconds = time.perf_counter() - loop_started
    timings["loop_s"] = seconds

    started = time.perf_counter()
    final_path = output_dir / "final"
    _save_final(accelerator, policy, tokenizer, config, final_path)
    timings["save_s"] = time.perf_counter() - started
    steps_this_run = step - start_step
    summary = TrainSummary(
        steps=step,
        epochs_completed=min(num_epochs, math.ceil(step / steps_per_epoch)),
        final_model_path=str(final_path),
        first_loss=history[0]["loss"] if history else float("nan"),
        last_loss=history[-1]["loss"] if history else float("nan"),
        resumed_from=resumed_from,
        tokens_per_second=tokens_seen / max(seconds, 1e-9),
        seconds=seconds,
        history=history,
        steps_this_run=steps_this_run,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        mixed_precision=str(accelerator.mixed_precision),
        trainable_parameters=trainable_count,
        total_parameters=total_count,
        peak_rss_mb=_peak_rss_mb(),
        timings={k: round(v, 4) for k, v in timings.items()},
    )
    if accelerator.is_main_process:
        tmp = output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(asdict(summary), indent=1))
        tmp.replace(output_dir / "summary.json")
    return summary


def _guard_finite(
    accelerator: Accelerator,
    value: torch.Tensor,
    what: str,
    step: int,
    epoch: int,
    micro_index: int,
    batch: dict[str, Any],
    checkpoint_root: Path,
    checkpoint_state: Callable[[int], dict[str, Any]],
    config: TrainConfig,
) -> None:
    """Stop every process when `value` is non-finite on any of them, after checkpointing the last good state.

    Collective (a one-element all-reduce): a process that stopped alone would leave the others waiting
    in the next gradient all-reduce. The update of the failing step has not been applied, so the model,
    optimizer and scheduler are still those after `step` optimizer steps.
    """
    bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad.item()) == 0.0:
        return
    local = {
        "process": accelerator.process_index,
        "finite": bool(torch.isfinite(value).all()),
        "value": float(value.float().flatten()[0]) if value.numel() else float("nan"),
        "pairs": list(batch.get("pair_id", [])),
    }
    everyone = gather_object([local]) if accelerator.num_processes > 1 else [local]
    culprits = [r for r in everyone if not r["finite"]]
    path = save_checkpoint(accelerator, checkpoint_root, step, checkpoint_state(step), config.keep_checkpoints)
    where = "; ".join(
        f"process {r['process']}: {what} {r['value']} on pairs {r['pairs'][:8]}{'...' if len(r['pairs']) > 8 else ''}"
        for r in culprits
    )
    raise NonFiniteLossError(
        f"non-finite {what} at optimizer step {step + 1} (epoch {epoch}, micro-batch {micro_index + 1} of "
        f"{accelerator.gradient_accumulation_steps}; {where}). The update was not applied; the last good state "
        f"(after step {step}) is saved in {path}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a policy with TI-DPO (or dpo/ipo/simpo).")
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig fields")
    args = parser.parse_args(argv)
    try:
        train(TrainConfig.from_yaml(args.config))
    except TrainingInterrupted as exc:
        print(f"tidpo.train: {exc}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
