"""Throughput against Hugging Face TRL's DPOTrainer, side by side in one process.

Same tiny Llama (tokenizer trained on the data, short SFT), same token ids, same 1,000 built-in pairs,
batch size, learning rate, AdamW, cosine schedule with warm-up, gradient clipping, fp32, 2 threads.
TRL: DPOTrainer, sigmoid loss, precompute_ref_log_probs=True, no gradient checkpointing, no hub,
report_to=[]. tidpo: tidpo_core.training.train on the pairs/weights/anchors stored in DuckDB, once with the
`dpo` loss and once with `tidpo` (the paper's setting: weights, TDPO KL alpha 0.5, triplet gamma 0.1).

Methods are timed in alternating rounds (ABC ABC) so that load from other processes on the machine hits
all of them alike; the ratios use each method's best round. Before timing, the first-batch loss of
tidpo's `dpo` is checked against TRL's on identical token ids and identical weights.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from tidpo_core.batching.chat import has_chat_template

NAME = "trl"
TARGET_DPO_OVER_TRL = 0.75
TARGET_CACHED_KL_OVER_TRL = 1.0


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        # A small corpus trains a small vocabulary, hence long token sequences: no truncation at 320.
        return {"pairs": 24, "batch_size": 4, "sft_steps": 4, "anchor_new_tokens": 8, "rounds": 1, "tiny": True,
                "max_response_tokens": 320}
    return {"pairs": 1000, "batch_size": 8, "sft_steps": 100, "anchor_new_tokens": 64, "rounds": 2, "tiny": False,
            "max_response_tokens": 128}


LEARNING_RATE = 5e-4
# A second round only if it fits: on an idle 2-core machine both rounds take ~10 minutes.
ROUNDS_BUDGET_S = 1500
WARMUP_STEPS = 10
BETA = 0.1


def _trl_rows(prepared: common.Prepared, tokenizer) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """TRL's text rows, and tidpo's features, for the same train pairs in the same order.

    tidpo encodes [bos] + prompt + response + [eos], tokenizing prompt and response separately. TRL
    tokenizes prompt and prompt+completion and appends the eos text; giving it the bos *text* in front of
    the prompt makes both produce the same ids (checked id by id below, never assumed).
    """
    from tidpo_core.training import load_training_features

    features = load_training_features(common.train_config(prepared, "dpo", prepared.data_dir / "unused"), tokenizer)
    if has_chat_template(tokenizer):
        return [_decoded_row(tokenizer, f) for f in features], features
    pairs = {p.pair_id: p for p in common.train_pairs(prepared)}
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


def _trl_args(output_dir: Path, batch_size: int, seed: int = 0, learning_rate: float = LEARNING_RATE, **extra: Any):
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
        if (
            example["prompt_ids"] + example["chosen_ids"] != list(feature["chosen_input_ids"])
            or example["prompt_ids"] + example["rejected_ids"] != list(feature["rejected_input_ids"])
        ):
            mismatched += 1
    return {"pairs": len(features), "mismatched_pairs": mismatched}


def time_trl(prepared: common.Prepared, rows, features, batch_size: int, work: Path, learning_rate: float = LEARNING_RATE) -> dict[str, Any]:
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
        "epoch_cpu_s": common.epoch_from_intervals(cpu),
        "step_median_cpu_s": statistics.median(cpu[1:] or cpu) if cpu else math.nan,
        "steps": len(clock.stamps),
        "setup_s": setup,
        "setup_includes": "tokenization + precompute_ref_log_probs",
        "wall_s": wall,
        "last_logged_loss": losses[-1] if losses else math.nan,
        "token_ids": ids,
    }


def time_tidpo(
    prepared: common.Prepared, loss_type: str, batch_size: int, work: Path, learning_rate: float = LEARNING_RATE, **overrides: Any
) -> dict[str, Any]:
    out = work / f"tidpo-{loss_type}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}"
    shutil.rmtree(out, ignore_errors=True)
    config = common.train_config(
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
    run = common.run_training(config)
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
    prepared: common.Prepared, policy_path: Path, rows, features, batch_size: int, work: Path, learning_rate: float = LEARNING_RATE
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
        padded, _, _ = compute_batch_loss(policy, None, batch, config, sides, tokenizer.pad_token_id, batch_layout="padded")

    trl_policy, _ = load_model_and_tokenizer(policy_path)
    trl_reference, _ = load_model_and_tokenizer(prepared.reference_path)
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=trl_reference,
        args=_trl_args(work / "trl-check", batch_size, learning_rate=learning_rate, precompute_ref_batch_size=batch_size),
        train_dataset=datasets.Dataset.from_list(batch_rows),
        processing_class=tokenizer,
    )
    ids = _check_ids(trainer, batch_features)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(batch_rows))])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_value, stored_value, live_value, padded_value = float(trl_loss), float(stored), float(live), float(padded)
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


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    from tidpo_core.data.synthetic import generate_synthetic_pairs
    from tidpo_core.models.modeling import TinyModelConfig, load_model_and_tokenizer

    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-trl-"))
    try:
        model_config = (
            TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
            if sizes["tiny"]
            else TinyModelConfig()
        )
        common.log(NAME, f"preparing {sizes['pairs']} synthetic pairs (tokenizer, tiny Llama + SFT, anchors, token weights)")
        prepared = common.prepare(
            work / "data",
            generate_synthetic_pairs(sizes["pairs"], seed=0),
            eval_fraction=0.0,
            model_config=model_config,
            vocab_size=model_config.vocab_size,
            sft_steps=sizes["sft_steps"],
            anchor_new_tokens=sizes["anchor_new_tokens"],
            max_response_tokens=sizes["max_response_tokens"],
            reference_kl_top_k=common.REFERENCE_KL_TOP_K,
        )
        _, tokenizer = load_model_and_tokenizer(prepared.reference_path)
        rows, features = _trl_rows(prepared, tokenizer)
        batch = sizes["batch_size"]

        methods = {
            "trl_dpo": lambda: time_trl(prepared, rows, features, batch, work),
            "tidpo_dpo": lambda: time_tidpo(prepared, "dpo", batch, work),
            "tidpo_tidpo": lambda: time_tidpo(prepared, "tidpo", batch, work),
            # Where the time goes: the same loss without the TDPO KL term (no reference forward, no
            # full-vocabulary KL), i.e. token weights + triplet only.
            "tidpo_tidpo_alpha0": lambda: time_tidpo(prepared, "tidpo", batch, work, alpha=0.0),
            # The full loss with SeqKL from the reference's cached top-64: the policy is the only model.
            "tidpo_tidpo_cached_kl": lambda: time_tidpo(prepared, "tidpo", batch, work, reference_kl="cached"),
            # The full loss in TRL's layout (one padded row per side): what the shared-prompt rows save.
            "tidpo_tidpo_padded": lambda: time_tidpo(prepared, "tidpo", batch, work, batch_layout="padded"),
        }
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        timing_started = time.perf_counter()
        for r in range(sizes["rounds"]):
            elapsed = time.perf_counter() - timing_started
            if r > 0 and elapsed / r * (r + 1) > ROUNDS_BUDGET_S:
                common.log(NAME, f"round {r + 1} skipped: rounds so far took {elapsed:.0f}s (budget {ROUNDS_BUDGET_S}s)")
                break
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for method in order:
                result = methods[method]()
                rounds[method].append(result)
                common.log(
                    NAME,
                    f"round {r + 1} {method:<18} epoch {result['epoch_s']:.1f}s ({result['epoch_cpu_s']:.0f} CPU s)  "
                    f"step {result['step_median_s'] * 1000:.0f}ms ({result['step_median_cpu_s'] * 1000:.0f} CPU ms)",
                )

        check = first_batch_loss_check(
            prepared, Path(rounds["tidpo_dpo"][0]["final_model_path"]), rows, features, batch, work
        )
        common.log(
            NAME,
            f"first-batch loss: TRL {check['trl_loss']:.8f} tidpo {check['tidpo_loss_stored_reference']:.8f} "
            f"(|diff| {check['abs_diff_stored']:.2e}, live reference {check['abs_diff_live']:.2e}) "
            f"{'PASS' if check['passed'] else 'FAIL'}",
        )

        token_counts = _token_counts(features, prepared)
        summary: dict[str, Any] = {}
        for method, results in rounds.items():
            best = min(results, key=lambda x: x["epoch_s"])
            summary[method] = {
                "epoch_s_best": best["epoch_s"],
                "epoch_s_rounds": [x["epoch_s"] for x in results],
                "step_median_s_best": min(x["step_median_s"] for x in results),
                "epoch_cpu_s_best": min(x["epoch_cpu_s"] for x in results),
                "step_median_cpu_s_best": min(x["step_median_cpu_s"] for x in results),
                "steps": best["steps"],
                "pairs_per_s": len(features) / best["epoch_s"],
                "policy_tokens_per_s": token_counts[method] / best["epoch_s"],
                "wall_s_best": min(x["wall_s"] for x in results),
            }
            if method == "trl_dpo":
                summary[method]["setup_s_best"] = min(x["setup_s"] for x in results)
                summary[method]["token_ids"] = results[0]["token_ids"]
        trl_epoch = summary["trl_dpo"]["epoch_s_best"]
        trl_step = summary["trl_dpo"]["step_median_s_best"]
        trl_cpu = summary["trl_dpo"]["epoch_cpu_s_best"]
        for method in summary:
            summary[method]["epoch_ratio_vs_trl"] = summary[method]["epoch_s_best"] / trl_epoch
            summary[method]["step_ratio_vs_trl"] = summary[method]["step_median_s_best"] / trl_step
            summary[method]["epoch_cpu_ratio_vs_trl"] = summary[method]["epoch_cpu_s_best"] / trl_cpu
        ratio = summary["tidpo_tidpo"]["epoch_ratio_vs_trl"]
        figures = {
            "setup": {
                "pairs": len(features),
                "batch_size": batch,
                "model_parameters": prepared.parameters,
                "max_prompt_tokens": prepared.max_prompt_tokens,
                "max_response_tokens": prepared.max_response_tokens,
                "optimizer": f"AdamW lr {LEARNING_RATE}, cosine, warmup {WARMUP_STEPS}, clip 1.0, fp32",
                "threads": common.THREADS,
                "rounds": len(rounds["trl_dpo"]),
                "timing": "epoch_s: wall time of the training loop (TRL: on_train_begin..on_train_end; tidpo: "
                "TrainSummary.seconds); step: median interval between optimizer steps, first left out; *_cpu_s: "
                "process CPU time (all threads) over the same steps, less sensitive to other load on a shared machine",
                "tidpo_tidpo_loss": "tidpo defaults: weights lambda 0.7, alpha 0.5 (reference forward per step), gamma 0.1 (anchor side)",
                "policy_tokens_per_epoch": token_counts,
            },
            "prepare_s": prepared.timings,
            "methods": summary,
            "first_batch_loss_check": check,
            # Standing guards (2026-12): tidpo's DPO at most 0.75x TRL's epoch (the engine's own speed), the full
            # loss with the cached KL at most TRL's. The full loss with the live reference forward has no
            # target: its anchor tokens and reference pass are the method's work ("0.8x TRL" is withdrawn).
            "target": {
                "tidpo_dpo_max": TARGET_DPO_OVER_TRL,
                "tidpo_cached_kl_max": TARGET_CACHED_KL_OVER_TRL,
                "dpo_met": summary["tidpo_dpo"]["epoch_ratio_vs_trl"] <= TARGET_DPO_OVER_TRL,
                "cached_kl_met": summary["tidpo_tidpo_cached_kl"]["epoch_ratio_vs_trl"] <= TARGET_CACHED_KL_OVER_TRL,
                "met": summary["tidpo_dpo"]["epoch_ratio_vs_trl"] <= TARGET_DPO_OVER_TRL
                and summary["tidpo_tidpo_cached_kl"]["epoch_ratio_vs_trl"] <= TARGET_CACHED_KL_OVER_TRL,
                "tidpo_tidpo_epoch_over_trl_dpo": ratio,
                "tidpo_dpo_epoch_over_trl_dpo": summary["tidpo_dpo"]["epoch_ratio_vs_trl"],
                "tidpo_tidpo_alpha0_epoch_over_trl_dpo": summary["tidpo_tidpo_alpha0"]["epoch_ratio_vs_trl"],
                "tidpo_tidpo_cached_kl_epoch_over_trl_dpo": summary["tidpo_tidpo_cached_kl"]["epoch_ratio_vs_trl"],
                "tidpo_tidpo_padded_epoch_over_trl_dpo": summary["tidpo_tidpo_padded"]["epoch_ratio_vs_trl"],
                "tidpo_tidpo_epoch_cpu_over_trl_dpo": summary["tidpo_tidpo"]["epoch_cpu_ratio_vs_trl"],
            },
            "sizes": sizes,
        }
        for method, values in summary.items():
            common.log(
                NAME,
                f"{method:<18} epoch {values['epoch_s_best']:7.1f}s  step {values['step_median_s_best'] * 1000:6.0f}ms  "
                f"x{values['epoch_ratio_vs_trl']:.2f} of TRL (CPU time x{values['epoch_cpu_ratio_vs_trl']:.2f})",
            )
        return common.write_results(NAME, figures, quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# On a pretrained chat model (bench_real's TRL part): the timed rows, a learning rate that does not wreck it.
PRETRAINED_METHODS = ("trl_dpo", "tidpo_dpo", "tidpo_tidpo", "tidpo_tidpo_cached_kl")
PRETRAINED_LEARNING_RATE = 5e-6
TARGET_PRETRAINED = {"tidpo_dpo": 0.8, "tidpo_tidpo": 1.1}
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
# SmolLM2's vocabulary is 49,152 tokens; the cache keeps the same 64 most likely as on the tiny model.
REFERENCE_KL_TOP_K_PRETRAINED = 64


def _pretrained_sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pairs": 8, "batch_size": 2, "rounds": 1, "max_prompt_tokens": 64, "max_response_tokens": 16, "anchor_new_tokens": 8}
    return {"pairs": 64, "batch_size": 4, "rounds": 3, "max_prompt_tokens": 160, "max_response_tokens": 64, "anchor_new_tokens": 32}


def _prepare_pretrained(model: str, sizes: dict[str, Any], work: Path) -> common.Prepared:
    """The first HH-RLHF pairs by pair_id (bench_real's first train pairs) on `model`, weights with the top-k cache."""
    from tidpo_core.data.files import load_preferences

    pairs = sorted(load_preferences(common.SHARED_DATA / HH_FILE).pairs, key=lambda p: p.pair_id)[: sizes["pairs"]]
    return common.prepare_uncached(
        work / "data",
        pairs,
        eval_fraction=0.0,
        model_name_or_path=model,
        anchor_new_tokens=sizes["anchor_new_tokens"],
        sampling_batch_size=16,
        max_prompt_tokens=sizes["max_prompt_tokens"],
        max_response_tokens=sizes["max_response_tokens"],
        weight_batch_size=8,
        reference_kl_top_k=REFERENCE_KL_TOP_K_PRETRAINED,
    )


def paired_ratios(rounds: dict[str, list[dict[str, Any]]], baseline: str = "trl_dpo") -> dict[str, dict[str, Any]]:
    """Per method: its epoch time over the baseline's in each round (timed back to back), and their median."""
    out: dict[str, dict[str, Any]] = {}
    for method, results in rounds.items():
        ratios = [r["epoch_s"] / b["epoch_s"] for r, b in zip(results, rounds[baseline], strict=True)]
        out[method] = {
            "epoch_s_rounds": [r["epoch_s"] for r in results],
            "epoch_ratio_vs_trl_rounds": ratios,
            "epoch_ratio_vs_trl": statistics.median(ratios),
            "steps": results[0]["steps"],
        }
    return out


def run_pretrained(model: str, quick: bool = False) -> dict[str, Any]:
    """TRL's DPOTrainer against tidpo's `dpo`, `tidpo` and `tidpo` with the cached KL on a pretrained chat model:
    same pairs (HH-RLHF, in the model's chat template), batch and steps, fp32, rounds interleaved (ABCD DCBA
    ...), each ratio the median over rounds of the per-round ratio; then the first-batch loss against TRL's."""
    from tidpo_core.models.modeling import load_model_and_tokenizer

    started = time.perf_counter()
    sizes = _pretrained_sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-trl-pretrained-"))
    try:
        prepared = _prepare_pretrained(model, sizes, work)
        _, tokenizer = load_model_and_tokenizer(prepared.reference_path)
        rows, features = _trl_rows(prepared, tokenizer)
        batch, lr = sizes["batch_size"], PRETRAINED_LEARNING_RATE
        methods = {
            "trl_dpo": lambda: time_trl(prepared, rows, features, batch, work, learning_rate=lr),
            "tidpo_dpo": lambda: time_tidpo(prepared, "dpo", batch, work, learning_rate=lr),
            "tidpo_tidpo": lambda: time_tidpo(prepared, "tidpo", batch, work, learning_rate=lr),
            "tidpo_tidpo_cached_kl": lambda: time_tidpo(prepared, "tidpo", batch, work, learning_rate=lr, reference_kl="cached"),
        }
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for r in range(sizes["rounds"]):
            for method in list(methods) if r % 2 == 0 else list(reversed(methods)):
                rounds[method].append(methods[method]())
                common.log(NAME, f"{model} round {r + 1} {method:<22} epoch {rounds[method][-1]['epoch_s']:.1f}s")
        check = first_batch_loss_check(prepared, Path(rounds["tidpo_dpo"][0]["final_model_path"]), rows, features, batch, work, learning_rate=lr)
        summary = paired_ratios(rounds)
        summary["trl_dpo"]["token_ids"] = rounds["trl_dpo"][0]["token_ids"]
        figures = {
            "setup": {"model": model, "data": HH_FILE, **sizes, "precision": "fp32 (TRL bf16=False, tidpo mixed_precision no)",
                      "optimizer": f"AdamW lr {lr}, cosine, warmup {WARMUP_STEPS}, clip 1.0", "model_parameters": prepared.parameters,
                      "timing": "epoch_s: wall time of one epoch's training loop; ratios: median over rounds of the per-round ratio"},
            "prepare_s": prepared.timings,
            "methods": summary,
            "first_batch_loss_check": check,
            "first_batch_loss_abs_diff": check["abs_diff_stored"],
            "target": {f"{m} <= {t}x TRL": summary[m]["epoch_ratio_vs_trl"] <= t for m, t in TARGET_PRETRAINED.items()},
        }
        for method, values in summary.items():
            common.log(NAME, f"{model} {method:<22} x{values['epoch_ratio_vs_trl']:.2f} of TRL (rounds {values['epoch_ratio_vs_trl_rounds']})")
        return common.write_results(f"{NAME}-{Path(model).name.lower()}", figures, quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _token_counts(features: list[dict[str, Any]], prepared: common.Prepared) -> dict[str, int]:
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
        config = common.train_config(prepared, "tidpo", prepared.data_dir / "unused")
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

if __name__ == "__main__":
    common.main_for(run)
