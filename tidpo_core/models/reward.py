"""A Bradley-Terry reward model trained on the stored preference pairs: the reward of the GRPO baseline
(docs/method.md section 8, the baselines).

The model is the reference's backbone with a one-output sequence-classification head
(`AutoModelForSequenceClassification`, `num_labels=1`): the reward of a (prompt, completion) is the head's
output at the sequence's last token. Training minimises the Bradley-Terry loss
-log sigmoid(r(prompt + chosen) - r(prompt + rejected)), with TRL's `RewardTrainer` and `RewardConfig`:
TRL loads the backbone and adds the head (seeded, its known load-report noise silenced), sets
`pad_token_id` in the model config (the head reads the last non-pad token), computes the loss and logs its
metric names (`loss`, `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`, `grad_norm`,
`learning_rate`). It runs offline on the embedded tiny model on a CPU no slower than a plain PyTorch loop
(docs/evaluation.md), so tidpo has no loop of its own for it.

Sequences are encoded the way the rest of tidpo encodes them (`tokenization.encode_prompt_response`:
[bos] + prompt + completion + [eos], prompt and completion tokenized separately, a long prompt keeps its
end, a long completion its start) and handed to TRL already tokenized, so training and scoring
(`load_reward_function`) see the same token ids; the lengths are recorded in the model folder.

`load_reward_function(model_dir)` is the contract with the GRPO baseline: a callable taking
(prompts, completions) and returning one float reward per completion, batched, without gradients.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tidpo_core.batching.tokenization import encode_prompt_response, pad_right
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.grpo import RewardFunction
from tidpo_core.models.modeling import resolve_device, save_model_and_tokenizer
from tidpo_core.runtime.quiet import quiet_trainer_output
from tidpo_core.runtime.threads import threads_for
from tidpo_core.training.setup import accelerate_state_left_as_found

__all__ = [
    "BUILD_MARKER",
    "RewardHeldOut",
    "RewardTraining",
    "RewardTrainingResult",
    "bradley_terry_loss",
    "build_info",
    "final_metrics",
    "held_out_accuracy",
    "is_built",
    "load_reward_function",
    "load_reward_model",
    "pair_accuracy",
    "score",
    "train_reward_model",
    "training_subset",
]

BUILD_MARKER = "tidpo_reward.json"
"""Written last into a finished model folder: the build key, the encoding, the training curve."""

SCRATCH_LEARNING_RATE = 1e-3
PRETRAINED_LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class RewardTraining:
    """How the reward model is trained. The defaults fit the embedded default (a sample of 512 train pairs, a
    few dozen steps on a CPU); a pretrained backbone gets a small learning rate (`settled`)."""

    epochs: float = 1.0
    """Passes over the train pairs used (TRL's num_train_epochs)."""
    learning_rate: float | None = None
    """AdamW's peak learning rate, after a linear warmup and before a linear decay to 0. None: 1e-3 for a model
    built from scratch (the embedded default), 1e-5 for a pretrained checkpoint, whose backbone a large rate
    would wreck (the reward_model step settles it by the reference; `train_reward_model` alone takes 1e-3)."""
    batch_size: int = 16
    """Pairs per optimizer step (each pair is two sequences: prompt + chosen, prompt + rejected)."""
    max_prompt_tokens: int = 192
    """A longer prompt keeps its last tokens (the ones nearest the completion)."""
    max_response_tokens: int = 128
    """A longer completion keeps its first tokens; eos included."""
    max_train_pairs: int | None = 512
    """Train on at most this many train pairs (a seeded sample); None: all of them."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming the learning rate up (below 1)."""
    weight_decay: float = 0.0
    seed: int = 0
    """Seeds the score head's initialisation, the sample of train pairs and the batch order."""
    logging_steps: int = 5
    """Training metrics (TRL's loss, accuracy, margin, ...) are averaged and logged every this many steps."""

    def settled(self, pretrained: bool) -> Self:
        """These settings with `learning_rate: None` replaced by the rate for a scratch or a pretrained backbone."""
        if self.learning_rate is not None:
            return self
        return replace(self, learning_rate=PRETRAINED_LEARNING_RATE if pretrained else SCRATCH_LEARNING_RATE)


@dataclass(frozen=True)
class RewardTrainingResult:
    path: Path
    train_pairs: int
    steps: int
    seconds: float
    history: list[dict[str, float]]
    """What TRL logged, each entry with its `step`: the metrics of each logging step (`loss`, `accuracy`,
    `margin`, `mean_reward`, `grad_norm`, `learning_rate`, ...), last the run's summary (`train_loss`, ...)."""

    @property
    def final(self) -> dict[str, float]:
        """The latest logged value of each training metric."""
        return final_metrics(self.history)


def final_metrics(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The latest value of each metric in a logged history (`step` and `epoch` left out)."""
    latest: dict[str, float] = {}
    for entry in history:
        latest.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
    return latest


@dataclass(frozen=True)
class RewardHeldOut:
    """The reward model on held-out pairs, in TRL's evaluation names (`as_metrics`)."""

    accuracy: float
    """Share of pairs where the chosen answer gets the higher reward (a tie counts half; nan without pairs)."""
    margin: float
    """Mean r(chosen) - r(rejected)."""
    loss: float
    """Mean Bradley-Terry loss."""
    pairs: int

    def as_metrics(self) -> dict[str, float]:
        return {
            "eval_accuracy": self.accuracy,
            "eval_margin": self.margin,
            "eval_loss": self.loss,
            "eval_pairs": float(self.pairs),
        }


# --- the pairwise loss and accuracy ----------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the observed
    preferences under the Bradley-Terry model (TRL's RewardTrainer loss without its optional margin)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards differ in shape: {tuple(chosen_rewards.shape)} vs {tuple(rejected_rewards.shape)}"
        )
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def pair_accuracy(
    chosen_rewards: Sequence[float] | np.ndarray, rejected_rewards: Sequence[float] | np.ndarray
) -> float:
    """Share of pairs whose chosen answer gets the higher reward; a tie counts half, so a constant reward
    scores 0.5 (chance), as the evaluation's win rates do. nan for no pairs."""
    chosen, rejected = (
        np.asarray(chosen_rewards, dtype=np.float64),
        np.asarray(rejected_rewards, dtype=np.float64),
    )
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {chosen.shape} vs {rejected.shape}")
    if chosen.size == 0:
        return float("nan")
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


# --- training ----------------------------------------------------------------------------------------------------


def training_subset(pairs: Sequence[PreferencePair], limit: int | None, seed: int) -> list[PreferencePair]:
    """At most `limit` pairs, a seeded sample in their original order (all of them for None)."""
    if limit is None or len(pairs) <= limit:
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def _load_tokenizer(source: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # As modeling.load_model_and_tokenizer: the head then reads the token before the first eos/pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    training: RewardTraining | dict[str, Any],
) -> list[int]:
    lengths = asdict(training) if isinstance(training, RewardTraining) else training
    return encode_prompt_response(
        tokenizer,
        prompt,
        completion,
        max_prompt_tokens=int(lengths["max_prompt_tokens"]),
        max_response_tokens=int(lengths["max_response_tokens"]),
    ).input_ids


def _trl_config(
    output_dir: Path, training: RewardTraining, progress: bool, revision: str | None, trust_remote_code: bool
) -> Any:
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(output_dir),
        model_init_kwargs={"dtype": "float32", **({"revision": revision} if revision else {})},
        trust_remote_code=trust_remote_code,
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=training.settled(pretrained=False).learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=training.warmup_ratio,  # below 1: a share of the steps
        weight_decay=training.weight_decay,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=training.seed,
        data_seed=training.seed,
        max_length=None,  # tidpo truncates when encoding (prompt end, completion start); TRL would drop pairs
        activation_checkpointing=False,  # TRL's default is on; a tiny model has nothing to save
        bf16=False,  # TRL's default is bf16 autocast; tidpo trains in fp32 as its training engine does on CPU
        fp16=False,
        disable_dropout=True,
        dataloader_num_workers=0,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",  # tidpo logs to MLflow itself (tracking.py); Trainer's own callback would write ./mlruns
        disable_tqdm=not progress,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only earns a warning
        push_to_hub=False,
    )


def build_info(model_dir: str | Path) -> dict[str, Any]:
    """The folder's build marker ({} when the folder is missing or unfinished)."""
    marker = Path(model_dir) / BUILD_MARKER
    return json.loads(marker.read_text()) if marker.exists() else {}


def is_built(model_dir: str | Path, build_key: str) -> bool:
    return build_info(model_dir).get("build_key") == build_key


def train_reward_model(
    model_path: str | Path,
    train_pairs: Sequence[PreferencePair],
    out_dir: str | Path,
    training: RewardTraining = RewardTraining(),
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    build_key: str = "",
    progress: bool = False,
) -> RewardTrainingResult:
    """Train a reward model from the backbone at `model_path` (a causal LM folder or hub id) on `train_pairs`
    and save it to `out_dir` (model, tokenizer and the build marker). The folder appears whole or not at all.
    Deterministic for a seed."""
    from datasets import Dataset
    from trl import RewardTrainer

    pairs = training_subset(train_pairs, training.max_train_pairs, training.seed)
    if not pairs:
        raise ValueError("the reward model needs at least one training pair")
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = _load_tokenizer(str(model_path), revision, trust_remote_code)
    rows = [
        {
            "chosen_ids": _encode(tokenizer, p.prompt, p.chosen, training),
            "rejected_ids": _encode(tokenizer, p.prompt, p.rejected, training),
        }
        for p in pairs
    ]
    with accelerate_state_left_as_found():
        trainer = RewardTrainer(
            model=str(model_path),  # TRL seeds, then loads the backbone with a one-output head (num_labels=1)
            args=_trl_config(staging / "trainer", training, progress, revision, trust_remote_code),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        quiet_trainer_output(trainer, ("loss", "accuracy", "margin"))
        model = trainer.model
        start = time.perf_counter()
        with threads_for(model):
            trainer.train()
        seconds = time.perf_counter() - start
    # Every logged entry: the training metrics of each logging step, and last the run's summary (train_loss,
    # train_runtime, ... and the metrics of the steps after the last logging step), each with its `step`.
    history = [
        {k: float(v) for k, v in entry.items() if isinstance(v, int | float)}
        for entry in trainer.state.log_history
    ]
    model.config.pad_token_id = (
        tokenizer.pad_token_id
    )  # the head reads the last non-pad token (TRL set it too)
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    save_model_and_tokenizer(model.eval(), tokenizer, staging)
    info = {
        "build_key": build_key,
        "trust_remote_code": trust_remote_code,
        "training": asdict(training),
        "train_pairs": len(pairs),
        "steps": int(trainer.state.global_step),
        "seconds": seconds,
        "history": history,
    }
    (staging / BUILD_MARKER).write_text(json.dumps(info, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return RewardTrainingResult(out_dir, len(pairs), info["steps"], seconds, history)


# --- scoring -----------------------------------------------------------------------------------------------------


def load_reward_model(
    model_dir: str | Path, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """(model in eval mode, tokenizer, encoding lengths) of a reward model folder written by train_reward_model."""
    model_dir = Path(model_dir)
    info = build_info(model_dir)
    if not info:
        raise FileNotFoundError(f"{model_dir} is not a finished tidpo reward model (no {BUILD_MARKER})")
    remote_code = bool(info.get("trust_remote_code", False))  # as the backbone it was trained from
    tokenizer = _load_tokenizer(str(model_dir), None, remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=remote_code
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"{model_dir}: a reward model has one output, this one has {model.config.num_labels}"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(resolve_device(device)).eval(), tokenizer, info["training"]


@torch.no_grad()
def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    encoding: dict[str, Any] | RewardTraining,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> list[float]:
    """The reward of each (prompt, completion), in batches, padded on the right as in training."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    device = next(model.parameters()).device
    rewards: list[float] = []
    with threads_for(model):
        for start in tqdm(
            range(0, len(prompts), batch_size), disable=not progress, desc="reward", unit="batch"
        ):
            ids = [
                _encode(tokenizer, p, c, encoding)
                for p, c in zip(
                    prompts[start : start + batch_size], completions[start : start + batch_size], strict=True
                )
            ]
            input_ids = pad_right(ids, tokenizer.pad_token_id, torch.long).to(device)
            attention_mask = pad_right([[1] * len(row) for row in ids], 0, torch.long).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            rewards.extend(logits[:, 0].float().tolist())
    return rewards


def load_reward_function(
    model_dir: str | Path, *, batch_size: int = 32, device: str = "auto"
) -> RewardFunction:
    """The reward model at `model_dir` as a function (prompts, completions) -> rewards: one float per
    completion, computed in batches of `batch_size` without gradients. Extra keyword arguments are ignored,
    so TRL's GRPOTrainer can call it as a reward function too."""
    model, tokenizer, encoding = load_reward_model(model_dir, device)

    def reward_model(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return score(model, tokenizer, prompts, completions, encoding, batch_size=batch_size)

    return reward_model


def held_out_accuracy(reward: RewardFunction, pairs: Sequence[PreferencePair]) -> RewardHeldOut:
    """Accuracy, mean margin and Bradley-Terry loss of `reward` on `pairs` (the eval split), exact per pair."""
    if not pairs:
        return RewardHeldOut(float("nan"), float("nan"), float("nan"), 0)
    prompts = [p.prompt for p in pairs]
    chosen = np.asarray(reward(prompts, [p.chosen for p in pairs]), dtype=np.float64)
    rejected = np.asarray(reward(prompts, [p.rejected for p in pairs]), dtype=np.float64)
    loss = float(bradley_terry_loss(torch.from_numpy(chosen), torch.from_numpy(rejected)))
    return RewardHeldOut(pair_accuracy(chosen, rejected), float(np.mean(chosen - rejected)), loss, len(pairs))
