"""Real data: DPO, SimPO and TI-DPO on Anthropic HH-RLHF (harmless-base test split, 2,312 dialogues).

The file lives in the project's shared data folder (../shared/data from the repository root); without it
the benchmark is skipped with a reason. Split by hash: pairs sorted by pair_id (a content hash), the first
2,000 train, the rest (312) held out. A tiny Llama is trained from scratch on the train split (tokenizer +
short SFT on both answers) and serves as the reference of every method; metrics as in bench_quality
(held-out implicit-reward accuracy vs the reference, and the policy's own likelihood preference).
Prompts keep their last 128 tokens and responses their first 64, to fit the 2-core time budget.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import bench_quality, common, preparation, quality_eval

# No critical spans or phrases here; the estimators other than the paper's wait for a longer sitting (the contrastive
# pair needs two more SFT runs on this data).
HH_METHODS = {name: bench_quality.METHODS[name] for name in ("dpo", "simpo", "tidpo")}

NAME = "hh"
DATA_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
TRAIN_PAIRS = 2000


def data_path() -> Path:
    return common.SHARED_DATA / DATA_FILE


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "train": 24,
            "eval": 6,
            "seeds": [0],
            "sft_steps": 4,
            "anchor_new_tokens": 8,
            "tiny": True,
            "max_steps": 3,
        }
    return {
        "train": TRAIN_PAIRS,
        "eval": None,
        "seeds": [0, 1],
        "sft_steps": 200,
        "anchor_new_tokens": 32,
        "tiny": False,
        "max_steps": -1,
    }


def load_split(train: int, eval_limit: int | None) -> tuple[list[Any], set[str], dict[str, Any]]:
    from tidpo_core.data.files import load_preferences

    result = load_preferences(data_path())
    ordered = sorted(result.pairs, key=lambda p: p.pair_id)
    train_pairs, eval_pairs = ordered[:train], ordered[train:]
    if eval_limit is not None:
        eval_pairs = eval_pairs[:eval_limit]
    info = {
        "rows_read": result.rows_read,
        "accepted": result.accepted,
        "quarantined": len(result.quarantined),
        "quarantine_reasons": result.reason_counts(),
        "train": len(train_pairs),
        "eval": len(eval_pairs),
    }
    return train_pairs + eval_pairs, {p.pair_id for p in eval_pairs}, info


# Prompts keep their last 128 tokens, responses their first 64 (the 2-core time budget).
MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS = 128, 64


def prepare_split(
    data_dir: Path, pairs: list[Any], eval_ids: set[str], sizes: dict[str, Any]
) -> preparation.Prepared:
    """The reference (tokenizer + tiny Llama + SFT on the train split), anchors and token weights for HH-RLHF."""
    model_config = preparation.tiny_model_config(sizes["tiny"])
    return preparation.prepare(
        data_dir,
        pairs,
        eval_ids=eval_ids,
        model_config=model_config,
        vocab_size=model_config.vocab_size,
        sft_steps=sizes["sft_steps"],
        anchor_new_tokens=sizes["anchor_new_tokens"],
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_response_tokens=MAX_RESPONSE_TOKENS,
    )


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    if not data_path().exists():
        reason = f"skipped: {data_path()} not found (HH-RLHF lives in the project's shared data folder)"
        common.log(NAME, reason)
        return common.write_results(NAME, {"skipped": reason}, quick, started)
    sizes = _sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-hh-"))
    try:
        pairs, eval_ids, data_info = load_split(sizes["train"], sizes["eval"])
        common.log(
            NAME, f"HH-RLHF harmless-base: {data_info['train']} train / {data_info['eval']} eval pairs"
        )
        prepared = prepare_split(work / "data", pairs, eval_ids, sizes)
        estimator_s = quality_eval.estimator_weights(prepared, sizes, HH_METHODS)
        evaluator = quality_eval.Evaluator(prepared, sample_new_tokens=0, phrases=False)
        common.log(NAME, f"reference: {evaluator.reference}")
        runs = []
        for seed in sizes["seeds"]:
            for method, overrides in HH_METHODS.items():
                result = quality_eval.train_and_evaluate(
                    prepared, evaluator, method, overrides, seed, work, sizes["max_steps"]
                )
                runs.append(result)
                common.log(
                    NAME,
                    f"seed {seed} {method:<6} {bench_quality.HEADLINE} {result[bench_quality.HEADLINE]:.3f}",
                )
        table = bench_quality.aggregate(runs, list(HH_METHODS))
        notes = bench_quality.investigate("hh-rlhf", table, evaluator.reference)
        for note in notes:
            common.log(NAME, note)
        figures = {
            "setup": {
                "data": str(data_path().name),
                "split": "sorted by pair_id (content hash): first 2,000 train, the rest eval",
                "data_info": data_info,
                "model_parameters": prepared.parameters,
                "max_prompt_tokens": MAX_PROMPT_TOKENS,
                "max_response_tokens": MAX_RESPONSE_TOKENS,
                "seeds": sizes["seeds"],
                "seed_controls": "training data order (reference, anchors and weights shared)",
                "training": "1 epoch, batch 8, AdamW lr 5e-4 cosine, beta 0.1; tidpo: lambda 0.7, alpha 0.5 (inside beta), "
                "gamma 0.1, triplet Eq. 13",
                "estimator_weights_s": estimator_s,
                "headline_metric": bench_quality.HEADLINE,
            },
            "prepare_s": prepared.timings,
            "reference": evaluator.reference,
            "methods": table,
            "runs": runs,
            "notes": notes,
            "sizes": sizes,
        }
        return common.write_results(NAME, figures, quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.main_for(run)
