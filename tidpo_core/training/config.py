"""What one training run is: TrainConfig (the YAML handed to the training process) and its constants.

The docstring under each field is also its description in the Dagster Launchpad
(tidpo_pipeline/config_from_core.py reads it from this source).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from tidpo_core.batching.packing import BATCH_LAYOUTS, BatchLayout
from tidpo_core.method.grpo import GRPO_REWARDS, GrpoReward
from tidpo_core.method.importance import Normalization
from tidpo_core.method.losses import LossConfig

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
# Optimizer settings a run takes when its config leaves them empty (TrainConfig.optimizer_recipe).
OPTIMIZER_RECIPES: dict[str, dict[str, Any]] = {
    # The embedded ~1M-parameter model learns from scratch-initialised SFT weights: a large step suits it.
    "scratch": {"learning_rate": 5e-4, "optimizer": "adamw", "warmup_steps": 10},
    # docs/method.md, the reference code's recipe for pretrained 7-8B models.
    "paper": {"learning_rate": 5e-6, "optimizer": "rmsprop", "warmup_steps": 150},
}


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
    loss_type: Literal["dpo", "ipo", "simpo", "tidpo", "grpo"] = "tidpo"
    """The preference losses (docs/method.md), or `grpo`: the GRPO baseline, trained by TRL's GRPOTrainer on the
    train prompts with the reward named by grpo_reward (the grpo_* settings below; the pair losses' settings,
    token weights and anchors do not apply)."""
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
    """Re-sample every train pair's anchor from the current policy every N optimizer steps (docs/method.md's
    option; each refresh samples all train prompts and weighs the new anchors with the reference).
    1 is the authors' algorithm: each micro-batch's anchors are sampled from the current policy right
    before its forward (its prompts only). 0: the anchor_responses asset's reference samples throughout."""
    reference_kl: Literal["forward", "cached"] = "forward"
    """Where SeqKL (alpha > 0) gets the reference distribution. `forward`: a frozen reference runs every
    step over chosen and rejected, the full vocabulary exactly as docs/method.md writes it. `cached`: the
    reference's top-k next-token distribution stored by the token_weights asset (reference_kl_top_k > 0),
    so a step runs the policy only and no second model is held; the KL is then the coarsened
    (top-k + rest) KL, a lower bound equal to the exact one when k covers the vocabulary."""
    batch_layout: BatchLayout = "shared_prompt"
    """`shared_prompt`: one row per pair, the prompt read once and each response attending to it
    (tidpo_core.batching.packing; needs sdpa or eager attention). `padded`: one padded row per side, the layout
    of TRL's DPOTrainer. Both give the same loss up to rounding."""
    weights_mode: Literal["precomputed", "online"] = "precomputed"
    """`precomputed`: the token_weights table (attribution by the reference, once). `online`: attribution
    recomputed with the current policy every step, as the paper does (one extra forward+backward)."""
    # GRPO (loss_type grpo; docs/method.md section 8, the baselines; defaults are TRL's GRPOConfig's unless said)
    grpo_num_generations: int = 8
    """G: completions sampled per prompt, the group whose rewards give each one's advantage. A micro-batch
    holds per_device_batch_size prompts, so per_device_batch_size x G completions."""
    grpo_beta: float = 0.0
    """Weight of the k3 KL penalty to the reference (0: no reference is loaded, TRL's default)."""
    grpo_epsilon: float = 0.2
    """Clip range of the importance ratio: [1 - epsilon, 1 + epsilon]."""
    grpo_num_iterations: int = 1
    """Optimisation passes over each batch of completions (TRL's num_iterations, mu). With 1 the ratio is 1
    at every step and the clipping never acts."""
    grpo_max_completion_length: int = 64
    """Most tokens sampled per completion (TRL's default, 512, is far beyond the built-in answers and slow
    on a CPU; 64 is the anchors' length)."""
    grpo_temperature: float = 1.0
    """Sampling temperature of the completions (no top-k, no top-p); TRL also divides the logits by it when
    it computes the log-probs."""
    grpo_reward: GrpoReward = "phrases"
    """`phrases`: the rule reward of the built-in data, +1 when a completion contains its prompt's safe
    phrase, -1 for the risky one, 0 otherwise. `model`: the reward model in grpo_reward_model
    (tidpo_core.models.reward.load_reward_function)."""
    grpo_reward_model: str | None = None
    """With grpo_reward: model, the reward model's folder. Left empty in the pipeline (tidpo_policy,
    method_comparison): the newest reward model the reward_model asset trained on this reference."""
    # optimisation
    optimizer_recipe: Literal["auto", "scratch", "paper"] = "auto"
    """Where learning_rate, optimizer and warmup_steps come from when left empty. `scratch`: the embedded
    tiny model's (5e-4, AdamW, 10 warm-up steps). `paper`: the paper's recipe for a pretrained model
    (5e-6, RMSprop, 150 warm-up steps). `auto`: `paper` when the reference is a pretrained checkpoint
    (the pipeline knows it from the reference_model asset), else `scratch`."""
    learning_rate: float | None = None
    """Empty: the optimizer recipe's (see optimizer_recipe)."""
    optimizer: str | None = None
    """`adamw` or `rmsprop`; empty: the optimizer recipe's (see optimizer_recipe)."""
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int | None = None
    """Empty: the optimizer recipe's (see optimizer_recipe)."""
    num_epochs: int = 1
    max_steps: int = -1
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    """`auto`: bf16 (or fp16) on a GPU; on a CPU with native bf16 (AMX, AVX512-BF16) bf16 autocast for a model of
    50M parameters or more, else none (docs/real-models.md has the measurements); an explicit value wins
    over the launcher's."""
    model_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """dtype the policy is loaded in; float32 master weights are what mixed precision expects."""
    cpu: bool | None = None
    """None: run on CPU exactly when no GPU/accelerator is visible (also under torchrun: gloo)."""
    seed: int = 0
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    # parameter-efficient training
    lora: bool = False
    """Train a LoRA adapter instead of all weights; the KL reference is the base with the adapter disabled."""
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
    def is_grpo(self) -> bool:
        """GRPO: sampled completions and a reward instead of the stored pairs' preference loss."""
        return self.loss_type == "grpo"

    @property
    def cached_reference_kl(self) -> bool:
        """SeqKL from the stored reference top-k instead of a reference forward."""
        return not self.is_grpo and self.reference_kl == "cached" and self.loss_config().needs_kl

    @property
    def uniform_token_weights(self) -> bool:
        """Every token counts once: asked for, or a loss that does not weigh tokens."""
        return self.uniform_weights or self.loss_type != "tidpo"

    def loss_config(self) -> LossConfig:
        if self.is_grpo:
            raise ValueError(
                "loss_type grpo has no preference loss: it trains through tidpo_core.training.grpo_loop"
            )
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
        if self.optimizer_recipe == "auto":
            # A TrainConfig built outside the pipeline knows nothing of its reference: today's default.
            self.optimizer_recipe = "scratch"
        if self.optimizer_recipe not in OPTIMIZER_RECIPES:
            raise ValueError(
                f"optimizer_recipe must be auto, scratch or paper, got {self.optimizer_recipe!r}"
            )
        for name, value in OPTIMIZER_RECIPES[self.optimizer_recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.optimizer not in ("adamw", "rmsprop"):
            raise ValueError(f"optimizer must be adamw or rmsprop, got {self.optimizer!r}")
        if self.reference_kl not in ("forward", "cached"):
            raise ValueError(f"reference_kl must be 'forward' or 'cached', got {self.reference_kl!r}")
        if self.batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"batch_layout must be one of {BATCH_LAYOUTS}, got {self.batch_layout!r}")
        if self.weights_mode not in ("precomputed", "online"):
            raise ValueError(f"weights_mode must be 'precomputed' or 'online', got {self.weights_mode!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.init_model_path and self.lora:
            # LoRA's reference is its base with the adapter off: starting from other weights would change it.
            raise ValueError(
                "init_model_path cannot be combined with lora: under LoRA the starting weights are the reference"
            )
        self.lora_target_modules = list(self.lora_target_modules)
        if self.is_grpo:
            self._check_grpo()

    def _check_grpo(self) -> None:
        if self.grpo_num_generations < 2:
            raise ValueError(
                f"grpo_num_generations must be >= 2 (a group's std needs two rewards), got {self.grpo_num_generations}"
            )
        if self.grpo_max_completion_length < 1:
            raise ValueError(
                f"grpo_max_completion_length must be >= 1, got {self.grpo_max_completion_length}"
            )
        if self.grpo_num_iterations < 1:
            raise ValueError(f"grpo_num_iterations must be >= 1, got {self.grpo_num_iterations}")
        # Written as "not (x > 0)" so that NaN is rejected too.
        if not self.grpo_temperature > 0:
            raise ValueError(f"grpo_temperature must be > 0, got {self.grpo_temperature}")
        for name in ("grpo_beta", "grpo_epsilon"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grpo_reward not in GRPO_REWARDS:
            raise ValueError(f"grpo_reward must be one of {GRPO_REWARDS}, got {self.grpo_reward!r}")
        if self.grpo_reward == "model" and not self.grpo_reward_model:
            raise ValueError("grpo_reward: model needs grpo_reward_model, the reward model's folder")
