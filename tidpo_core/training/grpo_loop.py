"""loss_type grpo: the GRPO baseline trained by TRL's GRPOTrainer, in tidpo's run folder and summary.

TRL 1.16's GRPOTrainer runs as it is (offline, without vLLM: completions come from the policy's own
`generate`, on CPU or GPU, under accelerate like every transformers Trainer; `accelerate launch` gives it
several processes). This module only translates: the TrainConfig into a GRPOConfig, the stored train
prompts into its data set, tidpo's reward into its reward function; and TRL's results back into what
every tidpo run leaves (RunDir): `final/` (a plain Hugging Face model folder), `summary.json` (a
TrainSummary: steps, losses, the per-step history under TRL's metric names) and `failure.txt`.

What the settings mean in TRL's terms (tidpo_core.method.grpo states the computation):

- a micro-batch holds per_device_batch_size prompts x grpo_num_generations completions (TRL's
  per_device_train_batch_size counts completions); an optimizer step sees per_device_batch_size x
  gradient_accumulation_steps x processes prompts, as the pair losses see that many pairs;
- the loss is TRL's loss_type "grpo" (the paper's per-completion token mean; TRL's default is "dapo") with
  group-scaled advantages (scale_rewards "group", std unbiased); sampling is pure (top-k 0, top-p 1) at
  grpo_temperature; grpo_beta > 0 loads the reference (the reference_model_path folder, also when the
  policy starts from init_model_path) for the k3 KL;
- learning rate, schedule, warm-up, optimizer, steps, epochs (over the unique train prompts), gradient
  clipping, seed, mixed precision, LoRA and checkpoints are the shared TrainConfig settings; activation
  checkpointing is off (TRL turns it on by default), as in tidpo's engine;
- SIGTERM/SIGINT stop the run after the current optimizer step with a checkpoint (TrainingInterrupted);
  `resume: true` continues from the newest checkpoint (HF's `checkpoint-N` folders under checkpoints/).

Not supported for grpo (a clear error, not a silent difference): LoRA under FSDP or DeepSpeed, and the
planted faults of the reliability tests (TIDPO_FAULTS).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from tidpo_core import store
from tidpo_core.batching.chat import has_chat_template
from tidpo_core.batching.tokenization import encode_prompt
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.method.grpo import RewardFunction, reward_function
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.runtime.faults import Faults
from tidpo_core.runtime.layout import RunDir
from tidpo_core.runtime.quiet import quiet_trainer_output
from tidpo_core.runtime.threads import threads_for
from tidpo_core.training.config import TrainConfig
from tidpo_core.training.reporting import Reporter, TrainSummary, _peak_rss_mb
from tidpo_core.training.setup import _mixed_precision, _model_dtype, _use_cpu
from tidpo_core.training.signals import NonFiniteLossError, StopSignals, TrainingInterrupted

SOURCE_PROMPT = "source_prompt"
"""The data set's column with each prompt as stored (the `prompt` column is the text TRL tokenizes)."""


def train_prompts(config: TrainConfig) -> list[PreferencePair]:
    """The train pairs (their prompts are what GRPO samples for; the rule reward reads their phrases)."""
    pairs = store.read_pairs_at(config.duckdb_path, split="train")
    if not pairs:
        raise ValueError(f"no training pairs in {config.duckdb_path}")
    return pairs


def prompt_text(tokenizer: Any, prompt: str, max_prompt_tokens: int) -> str:
    """The text TRL tokenizes (`tokenizer(text=...)`) for `prompt`, so that it reads the ids tidpo's sampling
    and training read (`tokenization.encode_prompt`; TRL 1.16 does not truncate prompts). With a chat
    template that is the rendered conversation; without one, bos (when the tokenizer does not add it
    itself) and the prompt's last max_prompt_tokens tokens."""
    if has_chat_template(tokenizer):
        return tokenizer.decode(encode_prompt(tokenizer, prompt, max_prompt_tokens))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids[-max_prompt_tokens:]) if len(ids) > max_prompt_tokens else prompt
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is not None and bos_id is not None:
        head = tokenizer(text=text)["input_ids"][:1]
        if head != [bos_id]:
            text = bos + text
    return text


def trl_reward(reward: RewardFunction, name: str):
    """`reward` as TRL calls a reward function (keyword arguments, one list per data set column), given the
    prompts as stored rather than as tokenized; named `name` (TRL's metric rewards/<name>/mean)."""

    def score(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        source = columns.get(SOURCE_PROMPT, prompts)
        return [float(r) for r in reward(list(source), list(completions))]

    score.__name__ = name
    return score


def grpo_arguments(config: TrainConfig, output_dir: Path) -> Any:
    """TRL's GRPOConfig for this run (see the module docstring for the mapping)."""
    from trl import GRPOConfig

    cpu = _use_cpu(config)
    precision = _mixed_precision(config, cpu)
    optimizers = {"adamw": "adamw_torch", "rmsprop": "rmsprop"}
    model_init_kwargs = (
        {"revision": config.reference_revision} if config.reference_revision and config.grpo_beta else None
    )
    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_batch_size * config.grpo_num_generations,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_generations=config.grpo_num_generations,
        max_completion_length=config.grpo_max_completion_length,
        temperature=config.grpo_temperature,
        top_k=0,
        top_p=1.0,
        beta=config.grpo_beta,
        epsilon=config.grpo_epsilon,
        num_iterations=config.grpo_num_iterations,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        optim=optimizers[config.optimizer],
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 0.0,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.num_epochs,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=cpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=False,
        logging_steps=config.log_every,
        report_to="none",
        save_strategy="steps" if config.checkpoint_every > 0 else "no",
        save_steps=max(config.checkpoint_every, 1),
        save_total_limit=config.keep_checkpoints if config.keep_checkpoints > 0 else None,
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in the loss
        dataloader_pin_memory=not cpu,
        trust_remote_code=config.trust_remote_code,
        model_init_kwargs=model_init_kwargs,
    )


def _is_step_log(entry: dict[str, Any]) -> bool:
    """A training step's log line (not the run's closing train_runtime line)."""
    return "train_runtime" not in entry and ("loss" in entry or "reward" in entry)


def _numeric(entry: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
            continue
        values[key] = float(value)
    return values


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{**_numeric(h), "step": int(h["step"])} for h in log_history if _is_step_log(h)]


def _make_callback(
    config: TrainConfig, reporter: Reporter, stop: StopSignals, on_step: Any, started: list[float]
):
    from transformers import TrainerCallback

    class TidpoCallback(TrainerCallback):
        """Step metrics to MLflow / Pipes / on_step, progress lines, non-finite losses, and the stop on a signal."""

        def __init__(self) -> None:
            self.trainer: Any = None
            self.stopped_at: int | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not _is_step_log(logs):
                return
            step = int(state.global_step)
            values = _numeric(logs)
            if "num_tokens" in values:
                values["tokens_per_second"] = values["num_tokens"] / max(
                    time.perf_counter() - started[0], 1e-9
                )
            if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm") if k in values):
                raise NonFiniteLossError(
                    f"non-finite GRPO loss or gradient norm at optimizer step {step}: {logs}"
                )
            reporter.metrics(step, values)
            if on_step is not None:
                on_step(step, values)
            report_every = max(1, (state.max_steps or 1) // 10)
            if not config.progress and (step % report_every == 0 or step == state.max_steps):
                reporter.log(
                    f"step {step}/{state.max_steps} reward {values.get('reward', float('nan')):.3f} "
                    f"reward_std {values.get('reward_std', float('nan')):.3f} loss {values.get('loss', float('nan')):.4f}"
                )

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and stop.should_stop(self.trainer.accelerator):
                self.stopped_at = int(state.global_step)
                control.should_save = True
                control.should_training_stop = True
            return control

    return TidpoCallback()


def train_grpo(config: TrainConfig, on_step: Any = None) -> TrainSummary:
    """Train `config` (loss_type grpo) with TRL's GRPOTrainer; returns the summary (also summary.json)."""
    if not config.is_grpo:
        raise ValueError(f"train_grpo trains loss_type grpo, not {config.loss_type!r}")
    if Faults.from_env() != Faults():
        raise ValueError("the planted faults (TIDPO_FAULTS) are not supported by loss_type grpo")
    run_dir = RunDir(Path(config.output_dir))
    timings: dict[str, float] = {}
    is_main = int(os.environ.get("RANK", "0")) == 0  # until accelerate has set the processes up
    reporter: Reporter | None = None
    try:
        tic = time.perf_counter()
        args = grpo_arguments(config, run_dir.checkpoints)  # imports TRL (seconds) and sets up the processes
        timings["import_s"] = time.perf_counter() - tic
        is_main = args.process_index == 0
        reporter = Reporter(config, is_main)
        with StopSignals() as stop:
            summary = _train(config, args, reporter, stop, on_step, timings)
    except BaseException as exc:
        if is_main:
            # The launcher (a Dagster asset, a script) sees only an exit status; this says why.
            run_dir.failure.parent.mkdir(parents=True, exist_ok=True)
            run_dir.failure.write_text(f"{type(exc).__name__}: {exc}")
        if reporter is not None:
            reporter.close(None, exc)
        raise
    if is_main:
        run_dir.failure.unlink(missing_ok=True)
    reporter.close(asdict(summary))
    return summary


def _train(
    config: TrainConfig,
    args: Any,
    reporter: Reporter,
    stop: StopSignals,
    on_step: Any,
    timings: dict[str, float],
) -> TrainSummary:
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = RunDir(Path(config.output_dir))
    set_seed(config.seed)
    started = [time.perf_counter()]
    callback = _make_callback(config, reporter, stop, on_step, started)
    trainer, policy, tokenizer, prompts = _grpo_trainer(config, args, callback, timings)
    accelerator = trainer.accelerator
    if accelerator.is_main_process and not config.resume:
        shutil.rmtree(run_dir.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    last = (
        get_last_checkpoint(str(run_dir.checkpoints))
        if config.resume and run_dir.checkpoints.is_dir()
        else None
    )
    _log_start(config, trainer, reporter, len(prompts), last)
    start_step = int(Path(last).name.split("-")[-1]) if last else 0
    started[0] = time.perf_counter()
    with warnings.catch_warnings(), threads_for(policy) as thread_plan:
        reporter.log(f"torch threads: {thread_plan.intra_op} ({thread_plan.reason})")
        # TRL 1.16 reads transformers' deprecated gradient_checkpointing names around every generation.
        warnings.filterwarnings(
            "ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning
        )
        trainer.train(resume_from_checkpoint=last)
        threads_used = torch.get_num_threads()
    timings["loop_s"] = seconds = time.perf_counter() - started[0]
    if callback.stopped_at is not None:
        saved = run_dir.checkpoints / f"checkpoint-{callback.stopped_at}"
        name = (
            signal.Signals(stop.received).name if stop.received is not None else "a signal on another process"
        )
        raise TrainingInterrupted(
            f"stopped by {name} after optimizer step {callback.stopped_at} of {trainer.state.max_steps}; the state is saved in "
            f"{saved} and a re-run resumes from it"
        )
    tic = time.perf_counter()
    _save_final(trainer, tokenizer, config, run_dir.final_model)
    timings["save_s"] = time.perf_counter() - tic
    summary = _summary(trainer, run_dir, last, start_step, seconds, threads_used, timings)
    if accelerator.is_main_process:
        tmp = run_dir.summary.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(summary), indent=1))
        tmp.replace(run_dir.summary)
    accelerator.wait_for_everyone()
    return summary


def _grpo_trainer(
    config: TrainConfig, args: Any, callback: Any, timings: dict[str, float]
) -> tuple[Any, Any, Any, list[str]]:
    """TRL's GRPOTrainer on the train prompts with the configured reward: (trainer, policy, tokenizer, prompts)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tic = time.perf_counter()
    pairs = train_prompts(config)
    reward = reward_function(config.grpo_reward, config.grpo_reward_model, pairs)
    policy, tokenizer = load_model_and_tokenizer(
        config.init_model_path or config.reference_model_path,
        dtype=_model_dtype(config),
        revision=None if config.init_model_path else config.reference_revision,
        trust_remote_code=config.trust_remote_code,
    )
    # With grpo_beta > 0 TRL loads its reference from the policy's config path: the reference, always.
    policy.config._name_or_path = config.reference_model_path
    timings["model_load_s"] = time.perf_counter() - tic
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    dataset = Dataset.from_list(
        [{"prompt": prompt_text(tokenizer, p, config.max_prompt_tokens), SOURCE_PROMPT: p} for p in prompts]
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[trl_reward(reward, config.grpo_reward)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=_lora_config(config, args),
    )
    callback.trainer = trainer
    # Progress: a bar with the reward (progress: true) or a line every tenth of the run (the callback), not
    # transformers' dict of every metric at every step.
    quiet_trainer_output(trainer, ("reward", "loss"))
    return trainer, policy, tokenizer, prompts


def _lora_config(config: TrainConfig, args: Any) -> Any:
    """peft's LoRA settings when the run trains adapters (None: full fine-tuning)."""
    if not config.lora:
        return None
    from peft import LoraConfig

    if args.distributed_state.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ValueError("loss_type grpo with lora runs on one process or DDP, not under FSDP or DeepSpeed")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
    )


def _parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(
        p.numel() for p in model.parameters()
    )


def _log_start(config: TrainConfig, trainer: Any, reporter: Reporter, prompts: int, last: str | None) -> None:
    accelerator = trainer.accelerator
    trainable, total = _parameter_counts(trainer.model)
    reporter.log(
        f"training grpo{' + LoRA' if config.lora else ''} with TRL's GRPOTrainer on {prompts} prompts "
        f"({config.grpo_num_generations} completions each, reward {config.grpo_reward}): "
        f"{accelerator.num_processes} process(es) [{accelerator.distributed_type.value}], device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}, {trainable:,} of {total:,} parameters trainable"
        + (f", resuming from {last}" if last else "")
    )


def _summary(
    trainer: Any,
    run_dir: RunDir,
    last: str | None,
    start_step: int,
    seconds: float,
    threads_used: int,
    timings: dict[str, float],
) -> TrainSummary:
    state, accelerator = trainer.state, trainer.accelerator
    history = _history(state.log_history)
    tokens = history[-1].get("num_tokens", 0.0) if history else 0.0
    trainable, total = _parameter_counts(trainer.model)
    return TrainSummary(
        steps=int(state.global_step),
        epochs_completed=int(math.ceil(state.epoch or 0.0)),
        final_model_path=str(run_dir.final_model),
        first_loss=history[0].get("loss", float("nan")) if history else float("nan"),
        last_loss=history[-1].get("loss", float("nan")) if history else float("nan"),
        resumed_from=last,
        tokens_per_second=tokens / max(seconds, 1e-9),
        seconds=seconds,
        history=history,
        steps_this_run=int(state.global_step) - start_step,
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type.value),
        mixed_precision=str(accelerator.mixed_precision),
        trainable_parameters=trainable,
        total_parameters=total,
        peak_rss_mb=_peak_rss_mb(),
        torch_threads=threads_used,
        timings={k: round(v, 4) for k, v in timings.items()},
    )


def _save_final(trainer: Any, tokenizer: Any, config: TrainConfig, final_path: Path) -> None:
    """The trained policy as a plain Hugging Face folder (LoRA merged unless merge_lora is false), written
    beside final/ and renamed into place."""
    accelerator = trainer.accelerator
    staging = final_path.with_name(final_path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    if config.lora and config.merge_lora:
        if accelerator.is_main_process:
            merged = accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # gathers a sharded model; writes on the main process
        if accelerator.is_main_process:
            tokenizer.save_pretrained(staging)
            (staging / "training_args.bin").unlink(
                missing_ok=True
            )  # a pickle of TRL's arguments, not the model's
    if accelerator.is_main_process:
        shutil.rmtree(final_path, ignore_errors=True)
        staging.rename(final_path)
    accelerator.wait_for_everyone()
