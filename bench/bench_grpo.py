"""GRPO, the paper's third system, against TI-DPO and DPO: quality and cost over 3 seeds, on the built-in data
and on HH-RLHF (harmless-base test split).

Every run goes through the `method_comparison` job's own code (`tidpo_core.evaluation.comparison.run_method_comparison`),
so the table is what a user's comparison would show: the same reference, anchors and token weights for every
method, the same eval pairs and sampling seed, the seed setting the data order (and GRPO's samples).
- Built-in data: 2,000 pairs of the embedded default corpus (hash split, 10 % eval); GRPO's reward is the
  rule reward of the data's phrases (+1 safe, -1 risky), and `reward_model_score` scores every method's
  sampled eval answers with the same rule.
- HH-RLHF: the split of bench_hh (2,000 train by pair_id, the rest eval), prompts cut to their last 128
  tokens and answers to their first 64. A Bradley-Terry reward model (TRL's RewardTrainer on the reference
  backbone, all 2,000 train pairs) is GRPO's reward and scores every method's answers; its own held-out
  accuracy is recorded, since GRPO can only be as good as it.
Each run trains `max_steps` optimizer steps of 8 prompts (GRPO: 8 prompts x G = 8 completions) on one torch
thread, as the comparison job's default does; `train_seconds` is each run's wall-clock training time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import bench_hh, common, preparation
from bench.verdicts import verdicts as judge_methods

NAME = "grpo"
METHODS = ("dpo", "tidpo", "grpo")
# metric -> (what it says, True when higher is better). KL has no better direction for quality: it is how far a
# method moved from the reference, so the verdict names the method that stayed closest.
VERDICT_METRICS: dict[str, tuple[str, bool]] = {
    "reward_accuracy": ("held-out reward accuracy (implicit DPO reward)", True),
    "likelihood_win_rate": ("held-out likelihood win rate", True),
    "reward_model_score": ("mean reward of sampled eval answers", True),
    "critical_phrase_chosen_rate": ("sampled answers with the safe phrase (of those with a phrase)", True),
    "critical_phrase_neither_rate": ("sampled answers with neither phrase", False),
    "kl_to_reference": ("KL(policy || reference), nats per answer: lower stayed closer", False),
    "distinct_2": ("distinct bigrams of sampled answers", True),
    "train_seconds": ("wall-clock training time, s", False),
}


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "builtin_pairs": 40,
            "hh_train": 24,
            "hh_eval": 6,
            "seeds": [0],
            "sft_steps": 4,
            "anchor_new_tokens": 8,
            "tiny": True,
            "max_steps": 2,
            "grpo": {"grpo_num_generations": 2, "grpo_max_completion_length": 4},
            "sample_prompts": 4,
            "max_new_tokens": 4,
            "critical_pairs": 4,
            "reward_max_train_pairs": 24,
        }
    return {
        "builtin_pairs": 2000,
        "hh_train": bench_hh.TRAIN_PAIRS,
        "hh_eval": None,
        "seeds": [0, 1, 2],
        "sft_steps": 200,
        "anchor_new_tokens": 64,
        "tiny": False,
        "max_steps": 100,
        "grpo": {},
        "sample_prompts": 32,
        "max_new_tokens": 64,
        "critical_pairs": 32,
        "reward_max_train_pairs": None,
    }


def verdicts(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per metric of VERDICT_METRICS: the leader and whether it leads by more than the spreads (bench.verdicts)."""
    return judge_methods(table, VERDICT_METRICS)


def _table(result: Any) -> dict[str, dict[str, Any]]:
    """The comparison's rows as {method: {metric: {mean, std, n}}}."""
    table: dict[str, dict[str, Any]] = {}
    for row in result.table:
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            if key.endswith("_mean"):
                name = key[: -len("_mean")]
                std = row.get(f"{name}_std")
                metrics[name] = {
                    "mean": value,
                    "std": 0.0 if std is None or not math.isfinite(std) else std,
                    "n": row.get("seeds", 1),
                }
        table[str(row["method"])] = metrics
    return table


def _compare(
    prepared: preparation.Prepared,
    sizes: dict[str, Any],
    work: Path,
    overrides: dict[str, Any],
    critical_pairs: int,
) -> dict[str, Any]:
    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.evaluation.comparison import ComparisonInputs, run_method_comparison
    from tidpo_core.models.generation import SamplingSettings
    from tidpo_core.steps.evaluate import eval_settings_for

    inputs = ComparisonInputs(
        duckdb_path=str(prepared.duckdb_path),
        reference_model_path=str(prepared.reference_path),
        weights_fingerprint=prepared.weights_fingerprint,
        anchors_fingerprint=prepared.anchors_fingerprint or "",
        max_prompt_tokens=prepared.max_prompt_tokens,
        max_response_tokens=prepared.max_response_tokens,
    )
    encoding = EncodingSettings(prepared.max_prompt_tokens, prepared.max_response_tokens)
    sampling = SamplingSettings(
        max_new_tokens=sizes["max_new_tokens"], top_k=0, top_p=1.0, temperature=1.0, seed=0
    )
    result = run_method_comparison(
        inputs,
        work / "comparison",
        methods=METHODS,
        seeds=sizes["seeds"],
        train_overrides={"max_steps": sizes["max_steps"], **sizes["grpo"], **overrides},
        eval_settings=eval_settings_for(
            0.1,
            encoding,
            batch_size=32,
            sample_prompts=sizes["sample_prompts"],
            critical_pairs=critical_pairs,
            sampling=sampling,
        ),
        keep_models=False,
        log=lambda message: common.log(NAME, message),
    )
    table = _table(result)
    runs = [
        {
            "method": r.method,
            "seed": r.seed,
            "train_seconds": r.train_seconds,
            "eval_seconds": r.eval_seconds,
            **r.metrics,
        }
        for r in result.runs
    ]
    return {
        "reward": result.reward,
        "methods": table,
        "runs": runs,
        "verdicts": verdicts(table),
        "seconds": result.seconds,
    }


def run_builtin(sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    from tidpo_core.data.synthetic import generate_synthetic_pairs

    model_config = preparation.tiny_model_config(sizes["tiny"])
    prepared = preparation.prepare(
        work / "data",
        generate_synthetic_pairs(sizes["builtin_pairs"], seed=0),
        eval_fraction=0.1 if not sizes["tiny"] else 0.25,
        model_config=model_config,
        vocab_size=model_config.vocab_size,
        sft_steps=sizes["sft_steps"],
        anchor_new_tokens=sizes["anchor_new_tokens"],
    )
    common.log(NAME, f"built-in: {prepared.n_train} train / {prepared.n_eval} eval pairs, reference ready")
    out = _compare(prepared, sizes, work, {"grpo_reward": "phrases"}, sizes["critical_pairs"])
    return {
        "data": f"built-in synthetic, {sizes['builtin_pairs']} pairs, hash split",
        "train_pairs": prepared.n_train,
        "eval_pairs": prepared.n_eval,
        "prepare_s": prepared.timings,
        **out,
    }


def run_hh(sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    from tidpo_core.models.reward import (
        RewardTraining,
        held_out_accuracy,
        load_reward_function,
        train_reward_model,
    )

    pairs, eval_ids, data_info = bench_hh.load_split(sizes["hh_train"], sizes["hh_eval"])
    # bench_hh's preparation, anchors at most 32 tokens as there.
    prepared = bench_hh.prepare_split(
        work / "data", pairs, eval_ids, {**sizes, "anchor_new_tokens": min(sizes["anchor_new_tokens"], 32)}
    )
    train = [p for p in pairs if p.pair_id not in eval_ids]
    evaluation = [p for p in pairs if p.pair_id in eval_ids]
    training = RewardTraining(
        max_prompt_tokens=bench_hh.MAX_PROMPT_TOKENS,
        max_response_tokens=bench_hh.MAX_RESPONSE_TOKENS,
        max_train_pairs=sizes["reward_max_train_pairs"],
    )
    reward_dir = work / "reward_model"
    reward = train_reward_model(prepared.reference_path, train, reward_dir, training)
    held_out = held_out_accuracy(load_reward_function(reward_dir), evaluation)
    common.log(
        NAME,
        f"HH-RLHF reward model: {reward.train_pairs} pairs in {reward.seconds:.0f} s, held-out accuracy {held_out.accuracy:.3f}",
    )
    out = _compare(prepared, sizes, work, {"grpo_reward": "model", "grpo_reward_model": str(reward_dir)}, 0)
    return {
        "data": f"{bench_hh.DATA_FILE}: sorted by pair_id, first {sizes['hh_train']:,} train, the rest eval",
        "data_info": data_info,
        "reward_model": {
            "train_pairs": reward.train_pairs,
            "steps": reward.steps,
            "train_seconds": reward.seconds,
            "held_out_accuracy": held_out.accuracy,
            "held_out_margin": held_out.margin,
            "eval_pairs": held_out.pairs,
        },
        "prepare_s": prepared.timings,
        **out,
    }


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    # The comparison job's default: each run on one torch thread (tidpo_core.runtime.threads honours the override).
    os.environ.setdefault("TIDPO_NUM_THREADS", "1")
    datasets: dict[str, Any] = {}

    def figures(complete: bool) -> dict[str, Any]:
        return {
            "complete": complete,
            "setup": {
                "methods": list(METHODS),
                "seeds": sizes["seeds"],
                "seed_controls": "training data order and GRPO's samples (reference, anchors, weights, eval samples shared)",
                "training": f"{sizes['max_steps']} optimizer steps of 8 prompts, AdamW lr 5e-4 cosine, beta 0.1; tidpo: lambda 0.7, "
                "alpha 0.5, gamma 0.1; grpo: G 8 completions of up to 64 tokens, epsilon 0.2, grpo_beta 0 (TRL's defaults)",
                "torch_threads": os.environ["TIDPO_NUM_THREADS"],
                "eval": f"{sizes['sample_prompts']} sampled eval prompts x {sizes['max_new_tokens']} tokens, temperature 1",
            },
            "datasets": datasets,
            "sizes": sizes,
        }

    # One sitting may not hold both data sets: TIDPO_GRPO_REUSE names an earlier results file whose finished data
    # sets are kept (each keeps the commit and date of its own file), TIDPO_GRPO_DATASETS the ones to run now.
    reuse_path = os.environ.get("TIDPO_GRPO_REUSE")
    if reuse_path:
        earlier = json.loads(Path(reuse_path).read_text())
        for name, doc in earlier.get("datasets", {}).items():
            if "skipped" not in doc:
                datasets[name] = {
                    **doc,
                    "reused_from": {"commit": earlier.get("commit"), "created_at": earlier.get("created_at")},
                }
    wanted = [d for d in os.environ.get("TIDPO_GRPO_DATASETS", "builtin,hh").split(",") if d]
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-grpo-"))
    try:
        if "builtin" in wanted:
            datasets["builtin"] = run_builtin(sizes, work / "builtin")
            common.write_results(NAME, figures(complete=False), quick, started)
        if "hh" in wanted and bench_hh.data_path().exists():
            datasets["hh"] = run_hh(sizes, work / "hh")
        elif "hh" in wanted:
            datasets["hh"] = {
                "skipped": f"{bench_hh.data_path()} not found (HH-RLHF lives in the project's shared data folder)"
            }
        for name, doc in datasets.items():
            for verdict in doc.get("verdicts", {}).values():
                common.log(NAME, f"[{name}] {verdict['sentence']}")
        return common.write_results(NAME, figures(complete=True), quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.main_for(run)
