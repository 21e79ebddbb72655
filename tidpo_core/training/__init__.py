"""The TI-DPO training engine.

One code path for every scale:

    python -m tidpo_core.training --config run.yaml                                    # one process
    accelerate launch --multi_gpu --num_processes 2 -m tidpo_core.training --config run.yaml  # DDP (CPU: gloo)
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m tidpo_core.training --config run.yaml

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

Modules, one concern each:

- config: TrainConfig (the run's YAML; its field docstrings are the Dagster Launchpad's descriptions).
- data: the training features read from DuckDB.
- setup: devices, mixed precision, the models (LoRA, the reference under ZeRO-3), optimizer, lr schedule.
- forward: one micro-batch's forward and loss (compute_batch_loss), the reference and online weights;
  a micro-batch is a tidpo_core.batching.batch.TrainingBatch (built by features.TrainingCollator).
- anchors: anchors re-sampled from the policy during training.
- checkpoints: checkpoints and their COMPLETE marker, the final model.
- signals: stopping early (non-finite loss, SIGTERM/SIGINT).
- reporting: TrainSummary, metrics to MLflow and Dagster Pipes, log lines.
- state: a run prepared for its first step (accelerate's prepare, the reference, resuming).
- loop: train(), the optimizer-step loop.
- grpo: loss_type grpo, the GRPO baseline, trained by TRL's GRPOTrainer into the same run folder and summary
  (the computation is stated in tidpo_core.method.grpo).

tidpo_core.training is the command line (``python -m tidpo_core.training``) and re-exports these names.
"""

from tidpo_core.training.anchors import sample_anchor_features
from tidpo_core.training.checkpoints import (
    CHECKPOINT_PATTERN,
    COMPLETE_MARKER,
    complete_checkpoints,
    materialize_optimizer_state,
    save_checkpoint,
    without_tied_copies,
)
from tidpo_core.training.config import DEFAULT_LORA_TARGETS, STEP_METRICS, TrainConfig
from tidpo_core.training.forward import (
    ReferenceFn,
    WeightsFn,
    adapter_disabled_reference,
    compute_batch_loss,
    frozen_reference,
    online_weights,
)
from tidpo_core.training.loading import FEATURE_CHUNK_PAIRS, load_training_features
from tidpo_core.training.loop import train
from tidpo_core.training.reporting import Reporter, TrainSummary
from tidpo_core.training.setup import lr_schedule
from tidpo_core.training.signals import (
    INTERRUPTED_EXIT_CODE,
    NonFiniteLossError,
    StopSignals,
    TrainingInterrupted,
)

__all__ = [
    "CHECKPOINT_PATTERN",
    "COMPLETE_MARKER",
    "DEFAULT_LORA_TARGETS",
    "FEATURE_CHUNK_PAIRS",
    "INTERRUPTED_EXIT_CODE",
    "STEP_METRICS",
    "NonFiniteLossError",
    "ReferenceFn",
    "Reporter",
    "StopSignals",
    "TrainConfig",
    "TrainSummary",
    "TrainingInterrupted",
    "WeightsFn",
    "adapter_disabled_reference",
    "complete_checkpoints",
    "compute_batch_loss",
    "frozen_reference",
    "load_training_features",
    "lr_schedule",
    "materialize_optimizer_state",
    "online_weights",
    "sample_anchor_features",
    "save_checkpoint",
    "train",
    "without_tied_copies",
]
