"""TRL's DPOTrainer and tidpo's training engine on the same rows: what bench_trl times and checks.

The rows (the same train pairs, in the same order, giving both the same token ids), TRL's configuration
matched to tidpo's (AdamW, cosine schedule with warm-up, clipping, fp32, no gradient checkpointing), one
timed epoch of each, the first-batch DPO loss of both on identical weights and ids, and the tokens each
layout reads per epoch.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.preparation import Prepared, train_pairs
from bench.training_runs import epoch_from_intervals, run_training, train_config
from tidpo_core.batching.chat import has_chat_template

LEARNING_RATE = 5e-4
WARMUP_STEPS = 10
BETA = 0.1


def trl_rows(prepared: Prepared, tokenizer) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """TRL's text rows, and tidpo's features, for the same train pairs in the same order.

    tidpo encodes [bos] + prompt + response + [eos], tokenizing prompt and response separately. TRL
    tokenizes prompt and prompt+completion and appends the eos text; giving it the bos *text* in front of
    the prompt makes both produce the same ids (checked id by id below, never assumed).
    """
    from tidpo_core.training import load_training_features

    features = load_training_features(train_config(prepared, "dpo", prepared.data_dir / "unused"), tokenizer)
    if has_chat_template(tokenizer):
        return [_decoded_row(tokenizer, f) for f in features], features
    pairs = {p.pair_id: p for p in train_pairs(prepared)}
    bos = tokenizer.bos_token or ""
    rows = [
        {
            "prompt": bos + pairs[f["pair_id"]].prompt,
            "chosen": pairs[f["pair_id"]].chosen,
            "rejected": pairs[f["pair_id"]].rejected,
        }
        for f in features
    ]
    return rows, features


def _decoded_row(tokenizer, feature: dict[str, Any]) -> dict[str, str]:
    """TRL's text row of a chat model's feature: the prompt as tidpo rendered it (chat template, turns dropped
    to fit), each answer without its closing end-of-turn token, which TRL appends as the eos text."""
    prompt_length = len(feature["chosen_input_ids"]) - int(sum(feature["chosen_response_mask"]))
    row = {"prompt": tokenizer.decode(list(feature["chosen_input_ids"])[:prompt_length])}
    for side in ("chosen", "rejected"):
        row[side] = tokenizer.decode(list(feature[f"{side}_input_ids"])[prompt_length:-1])
    return row


def _trl_args(
    output_dir: Path, batch_size: int, seed: int = 0, learning_rate: float = LEARNING_RATE, **extra: Any
):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_STEPS,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        max_length=None,  # tidpo already truncated (192 prompt / 128 response tokens); ids are compared below
        gradient_checkpointing=False,  # TRL's default is True; tidpo does not checkpoint
        bf16=False,  # TRL's default is bf16 autocast; tidpo runs fp32 on CPU
        fp16=False,
        use_cpu=True,
        disable_dropout=True,
        dataloader_num_workers=0,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        push_to_hub=False,
        seed=seed,
        data_seed=seed,
        **extra,
    )


def _trl_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin = self.end = math.nan
            self.stamps: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    return Clock()


def _check_ids(trainer, features: list[dict[str, Any]]) -> dict[str, int]:
    mismatched = 0
    for feature, example in zip(features, trainer.train_dataset, strict=True):
        if example["prompt_ids"] + example["chosen_ids"] != list(feature["chosen_input_ids"]) or example[
            "prompt_ids"
        ] + example["rejected_ids"] != list(feature["rejected_input_ids"]):
            mismatched += 1
    return {"pairs": len(features), "mismatched_pairs": mismatched}


def time_trl(
    prepared: Prepared, rows, features, batch_size: int, work: Path, learning_rate: float = LEARNING_RATE
) -> dict[str, Any]:
    import datasets
    from trl import DPOTrainer

    from tidpo_core.models.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(prepared.reference_path)
    clock = _trl_clock()
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=_trl_args(work / "trl", batch_size, learning_rate=learning_rate),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    setup = time.perf_counter() - start
    ids = _check_ids(trainer, features)
    trainer.train()
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
    cpu = [b - a for a, b in zip(clock.cpu[:-1], clock.cpu[1:], strict=True)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "epoch_s": clock.end - clock.begin,
        "step_median_s": statistics.median(steps[1:] or steps) if steps else math.nan,
        "epoch_cpu_s": epoch_from_intervals(cpu),
        "step_median_cpu_s": statistics.median(cpu[1:] or cpu) if cpu else math.nan,
        "steps": len(clock.stamps),
        "setup_s": setup,
        "setup_includes": "tokenization + precompute_ref_log_probs",
        "wall_s": wall,
        "last_logged_loss": losses[-1] if losses else math.nan,
        "token_ids": ids,
    }


def time_tidpo(
    prepared: Prepared,
    loss_type: str,
    batch_size: int,
    work: Path,
    learning_rate: float = LEARNING_RATE,
    **overrides: Any,
) -> dict[str, Any]:
    out = work / f"tidpo-{loss_type}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}"
    shutil.rmtree(out, ignore_errors=True)
    config = train_config(
        prepared,
        loss_type,
        out,
        per_device_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=WARMUP_STEPS,
        lr_scheduler="cosine",
        optimizer="adamw",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        num_epochs=1,
        seed=0,
        **overrides,
    )
    run = run_training(config)
    return {
        "epoch_s": run.summary.seconds,
        "step_median_s": run.per_step()["median_s"],
        "epoch_cpu_s": run.epoch_cpu_s,
        "step_median_cpu_s": run.per_step()["median_cpu_s"],
        "steps": run.summary.steps,
        "wall_s": run.wall,
        "last_loss": run.summary.last_loss,
        "final_model_path": run.summary.final_model_path,
    }


def first_batch_loss_check(
    prepared: Prepared,
    policy_path: Path,
    rows,
    features,
    batch_size: int,
    work: Path,
    learning_rate: float = LEARNING_RATE,
) -> dict[str, Any]:
    """tidpo's `dpo` loss vs TRL's sigmoid DPO loss: same policy weights, same reference, same token ids."""
    import datasets
    import torch
    from trl import DPOTrainer

    from tidpo_core.batching.features import TrainingCollator
    from tidpo_core.method.losses import LossConfig
    from tidpo_core.models.modeling import load_model_and_tokenizer
    from tidpo_core.training import compute_batch_loss

    batch_rows, batch_features = rows[:batch_size], features[:batch_size]
    policy, tokenizer = load_model_and_tokenizer(policy_path)
    reference, _ = load_model_and_tokenizer(prepared.reference_path)
    policy.train()
    sides = ("chosen", "rejected")
    batch = TrainingCollator(tokenizer.pad_token_id, sides)(batch_features)
    config = LossConfig(loss_type="dpo", beta=BETA)
    # Without its stored reference log-probs the batch gets them from the reference model.
    live_batch = batch.without_reference_logps()
    with torch.no_grad():
        # Reference log-probs as stored by the token_weights precompute (what training uses) ...
        stored, _, _ = compute_batch_loss(policy, None, batch, config, sides, tokenizer.pad_token_id)
        # ... and recomputed live from the reference model ...
        live, _, _ = compute_batch_loss(policy, reference, live_batch, config, sides, tokenizer.pad_token_id)
        # ... and in TRL's layout, one padded row per side (the default reads each prompt once).
        padded, _, _ = compute_batch_loss(
            policy, None, batch, config, sides, tokenizer.pad_token_id, batch_layout="padded"
        )

    trl_policy, _ = load_model_and_tokenizer(policy_path)
    trl_reference, _ = load_model_and_tokenizer(prepared.reference_path)
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=trl_reference,
        args=_trl_args(
            work / "trl-check", batch_size, learning_rate=learning_rate, precompute_ref_batch_size=batch_size
        ),
        train_dataset=datasets.Dataset.from_list(batch_rows),
        processing_class=tokenizer,
    )
    ids = _check_ids(trainer, batch_features)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(batch_rows))])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_value, stored_value, live_value, padded_value = (
        float(trl_loss),
        float(stored),
        float(live),
        float(padded),
    )
    return {
        "batch_pairs": len(batch_rows),
        "token_ids": ids,
        "policy": "tidpo `dpo` policy after one epoch (so that log-ratios are not zero)",
        "trl_loss": trl_value,
        "tidpo_loss_stored_reference": stored_value,
        "tidpo_loss_live_reference": live_value,
        "tidpo_loss_padded_layout": padded_value,
        "abs_diff_stored": abs(trl_value - stored_value),
        "abs_diff_live": abs(trl_value - live_value),
        "abs_diff_padded": abs(trl_value - padded_value),
        "tolerance": 1e-5,
        "passed": max(abs(trl_value - v) for v in (stored_value, live_value, padded_value)) <= 1e-5,
    }


def token_counts(features: list[dict[str, Any]], prepared: Prepared) -> dict[str, int]:
    """Non-pad tokens each method's policy reads per epoch. TRL and tidpo's padded layout read the prompt
    once per side; tidpo's shared-prompt rows (the default) once per pair. tidpo `tidpo` also reads the
    anchor's response."""
    prompts = sum(len(f["chosen_input_ids"]) - int(sum(f["chosen_response_mask"])) for f in features)
    two = sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features)
    anchors = 0
    if prepared.anchors_fingerprint:
        from tidpo_core.models.modeling import load_model_and_tokenizer
        from tidpo_core.training import load_training_features

        _, tokenizer = load_model_and_tokenizer(prepared.reference_path)
        config = train_config(prepared, "tidpo", prepared.data_dir / "unused")
        anchors = sum(int(sum(f["anchor_response_mask"])) for f in load_training_features(config, tokenizer))
    shared_two = two - prompts
    return {
        "trl_dpo": two,
        "tidpo_dpo": shared_two,
        "tidpo_tidpo": shared_two + anchors,
        "tidpo_tidpo_alpha0": shared_two + anchors,
        "tidpo_tidpo_cached_kl": shared_two + anchors,
        "tidpo_tidpo_padded": two + anchors + prompts,
    }
