"""The paper's comparison on a pretrained chat model: DPO, TI-DPO (the paper's attribution and the contrastive
estimator) and SimPO, fine-tuned from SmolLM2-135M-Instruct on Anthropic HH-RLHF harmless-base, three seeds each.

The grid runs through the method_comparison job's own step (tidpo_core.steps.compare.compare_methods), on a
data dir of its own (`--work`, default .tidpo/bench-real) that keeps every stage: the imported model, the pairs,
anchors, both weight tables, the contrastive models, the judge and each evaluated run. Stopped anywhere, the
same command resumes at the first run it had not evaluated. Each run records the commit that trained it; the
results say whether all came from one.

Split (pairs sorted by pair_id, a content hash): the first `train` pairs train, the next `eval` are held out,
and the next `judge` train the judge, a reward model on the same backbone whose pairs no policy saw. Each model
answers the same `sample_prompts` held-out prompts (pure sampling); judged_win_rate is the share of prompts on
which the judge prefers the model's answer to the reference's.

    python -m bench.bench_real                  # all three parts (hours on a 2-core CPU; the grid resumes)
    python -m bench.bench_real --part grid      # or one: grid, importance (precision@k), trl (TRL's DPOTrainer)
    python -m bench.bench_real --part rejudge   # the grid's kept models answer again; win rate at equal lengths
    python -m bench.bench_real --quick          # the smoke test's sizes

Results go to bench/results/real.json ("methods", "importance", "trl", "rejudged": each part replaces its own
section; "frontier", the win rate at matched KL, follows the grid) and the trade-off picture beside it
(real-tradeoff.png)."""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import common, real_frontier
from bench.verdicts import verdicts

NAME = "real"
MODEL = "smollm2-135m-instruct"
DATA_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"
TRUTHFULQA_FILE = "TruthfulQA.csv"
METHODS = ("dpo", "tidpo", "tidpo_contrastive", "simpo")
# What real.json keeps per method (mean, std, seeds); the run's full metrics stay in its comparison report.
REPORTED = (
    "reward_accuracy",
    "reward_margin",
    "judged_win_rate",
    "judged_win_rate_length_controlled",
    "reward_model_score",
    "kl_to_reference",
    "mean_length",
    "distinct_2",
    "truthfulqa_mc1",
    "truthfulqa_mc2",
    "train_seconds",
    "final_train_loss",
)

# The metrics the table judges (label, higher is better); mean length has no better direction.
VERDICT_METRICS: dict[str, tuple[str, bool]] = {
    "reward_accuracy": ("held-out implicit-reward accuracy", True),
    "judged_win_rate": ("judged win rate over the reference's answers", True),
    "judged_win_rate_length_controlled": ("judged win rate at equal answer lengths", True),
    "reward_model_score": ("judge's mean score of sampled answers", True),
    "kl_to_reference": ("KL to the reference, nats per answer: lower stayed closer", False),
    "distinct_2": ("distinct bigrams of sampled answers", True),
    "truthfulqa_mc1": ("TruthfulQA MC1", True),
    "truthfulqa_mc2": ("TruthfulQA MC2", True),
    "train_seconds": ("wall-clock training time, s", False),
}


@dataclass(frozen=True)
class GridSizes:
    train: int = 512
    eval: int = 256
    judge: int = 1024
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    max_steps: int = -1
    """-1: one epoch of the train pairs."""
    batch_size: int = 4
    warmup_steps: int = 12
    max_prompt_tokens: int = 160
    max_response_tokens: int = 64
    anchor_new_tokens: int = 64
    sample_prompts: int = 128
    contrastive_sft_steps: int = 96
    sft_batch_size: int = 8
    judge_batch_size: int = 4
    truthfulqa_questions: int = 300
    eval_batch_size: int = 16


QUICK = GridSizes(
    train=8,
    eval=4,
    judge=8,
    seeds=(0,),
    max_steps=1,
    batch_size=2,
    warmup_steps=0,
    max_prompt_tokens=64,
    max_response_tokens=16,
    anchor_new_tokens=8,
    sample_prompts=2,
    contrastive_sft_steps=1,
    sft_batch_size=2,
    judge_batch_size=4,
    truthfulqa_questions=3,
    eval_batch_size=4,
)


@dataclass
class Split:
    train: list[Any]
    eval: list[Any]
    judge: list[Any]
    info: dict[str, Any] = field(default_factory=dict)


def split_pairs(path: Path, sizes: GridSizes) -> Split:
    """train, eval and judge pairs: consecutive, disjoint slices of the file's pairs sorted by pair_id."""
    from tidpo_core.data.files import load_preferences

    loaded = load_preferences(path)
    ordered = sorted(loaded.pairs, key=lambda p: p.pair_id)
    needed = sizes.train + sizes.eval + sizes.judge
    if len(ordered) < needed:
        raise ValueError(f"{path} has {len(ordered)} valid pairs; the grid needs {needed}")
    train, rest = ordered[: sizes.train], ordered[sizes.train :]
    held_out, judge = rest[: sizes.eval], rest[sizes.eval : sizes.eval + sizes.judge]
    info = {
        "rows_read": loaded.rows_read,
        "accepted": loaded.accepted,
        "quarantined": len(loaded.quarantined),
    }
    return Split(
        train, held_out, judge, {**info, "train": len(train), "eval": len(held_out), "judge": len(judge)}
    )


def truthfulqa_sample(source: Path, questions: int, out: Path) -> Path:
    """One fixed sample of the TruthfulQA questions (seed 0), the same file for every model."""
    with source.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = sorted(random.Random(0).sample(range(len(rows)), min(questions, len(rows))))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in chosen)
    return out


def prepare(work: Path, model: str, split: Split, sizes: GridSizes) -> dict[str, Any]:
    """The pipeline's stages up to the comparison, each reused when already in `work`."""
    from tidpo_core.data.pairs import LoadResult
    from tidpo_core.models.contrastive import ContrastiveSFT
    from tidpo_core.models.generation import SamplingSettings
    from tidpo_core.models.modeling import TinyModelConfig
    from tidpo_core.runtime.layout import DataDir
    from tidpo_core.steps import database_at
    from tidpo_core.steps.anchors import sample_anchors
    from tidpo_core.steps.contrastive import train_contrastive_models
    from tidpo_core.steps.pairs import store_pairs
    from tidpo_core.steps.reference import ReferenceRecipe, build_reference
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    layout = DataDir.at(work)
    layout.root.mkdir(parents=True, exist_ok=True)
    open_db = database_at(layout.database)
    timings: dict[str, float] = {}
    say = lambda message: common.log(NAME, message)  # noqa: E731
    pairs = split.train + split.eval
    with common.timed(timings, "pairs"):
        ingested = store_pairs(
            open_db, LoadResult(pairs, [], len(pairs)), 0.0, {p.pair_id for p in split.eval}
        )
    with common.timed(timings, "reference_model"):
        reference = build_reference(
            open_db,
            ReferenceRecipe(model_name_or_path=model),
            TinyModelConfig(),
            layout,
            ingested.digest,
            log=say,
        ).handle
    with common.timed(timings, "anchor_responses"):
        sampling = SamplingSettings(
            max_new_tokens=sizes.anchor_new_tokens, max_prompt_tokens=sizes.max_prompt_tokens, batch_size=16
        )
        anchors = sample_anchors(open_db, reference, sampling, progress=True, log=say).fingerprint
    if "tidpo_contrastive" in sizes.methods:
        with common.timed(timings, "contrastive_models"):
            recipe = ContrastiveSFT(
                sft_steps=sizes.contrastive_sft_steps, sft_batch_size=sizes.sft_batch_size
            )
            train_contrastive_models(
                open_db, reference, recipe, layout, ingested.digest, progress=True, log=say
            )
    with common.timed(timings, "token_weights"):
        weighing = WeighingSettings(
            batch_size=8,
            max_prompt_tokens=sizes.max_prompt_tokens,
            max_response_tokens=sizes.max_response_tokens,
        )
        report = weigh_tokens(open_db, reference, anchors, weighing, progress=True, log=say)
    weights = {
        "fingerprint": report.fingerprint,
        "encoding": weighing.encoding.__dict__,
        "importance": report.importance,
        "reference_kl_top_k": 0,
    }
    return {
        "layout": layout,
        "open_db": open_db,
        "digest": ingested.digest,
        "reference": reference,
        "anchors": anchors,
        "weights": weights,
        "timings": timings,
    }


def train_judge(work: Path, reference: Any, split: Split, sizes: GridSizes) -> dict[str, Any]:
    """The judge: a reward model from the reference's backbone, on the judge pairs (no policy trains on them),
    with its accuracy on the held-out pairs."""
    from tidpo_core.models.reward import (
        RewardTraining,
        held_out_accuracy,
        is_built,
        load_reward_function,
        train_reward_model,
    )
    from tidpo_core.runtime.fingerprint import digest

    training = RewardTraining(
        batch_size=sizes.judge_batch_size,
        max_train_pairs=None,
        max_prompt_tokens=sizes.max_prompt_tokens,
        max_response_tokens=sizes.max_response_tokens,
    ).settled(pretrained=True)
    key = digest(
        {
            "reference": reference.fingerprint,
            "pairs": sorted(p.pair_id for p in split.judge),
            "training": asdict(training),
        }
    )
    out = work / "judge"
    tic = time.perf_counter()
    if not is_built(out, key):
        common.log(NAME, f"training the judge on {len(split.judge)} pairs")
        train_reward_model(reference.path, split.judge, out, training, build_key=key, progress=True)
    held_out = held_out_accuracy(load_reward_function(out, batch_size=sizes.eval_batch_size), split.eval)
    common.log(NAME, f"judge: held-out accuracy {held_out.accuracy:.3f} on {held_out.pairs} pairs")
    return {
        "path": str(out),
        "train_pairs": len(split.judge),
        "held_out": held_out.as_metrics(),
        "training": asdict(training),
        "seconds": time.perf_counter() - tic,
    }


def grid_settings(sizes: GridSizes) -> Any:
    """The comparison's settings for the grid (ComparisonSettings)."""
    from tidpo_core.steps.compare import ComparisonSettings

    return ComparisonSettings(
        methods=list(sizes.methods),
        seeds=list(sizes.seeds),
        max_steps=sizes.max_steps,
        batch_size=sizes.eval_batch_size,
        sample_prompts=sizes.sample_prompts,
        max_new_tokens=sizes.max_response_tokens,
        critical_pairs=0,  # HH-RLHF has no planted critical spans
        # Kept (about 0.5 GB each): a later judge re-evaluates the runs without training them again (--part rejudge).
        keep_models=True,
    )


def grid_engine_options(sizes: GridSizes, judge_path: str) -> dict[str, Any]:
    return {
        "per_device_batch_size": sizes.batch_size,
        "warmup_steps": sizes.warmup_steps,
        # The judge scores the sampled answers (reward_model_score, judged_win_rate); GRPO is not in the grid.
        "grpo_reward": "model",
        "grpo_reward_model": judge_path,
    }


def run_grid(work: Path, model: str, sizes: GridSizes) -> dict[str, Any]:
    """Prepare, train the judge, then compare the methods through the method_comparison step."""
    from tidpo_core.evaluation.benchmarks import BenchmarkOptions
    from tidpo_core.runtime import tracking
    from tidpo_core.steps import RunTracking
    from tidpo_core.steps.compare import compare_methods

    split = split_pairs(common.SHARED_DATA / DATA_FILE, sizes)
    common.log(NAME, f"HH-RLHF harmless-base: {split.info}")
    stages = prepare(work, model, split, sizes)
    judge = train_judge(work, stages["reference"], split, sizes)
    questions = truthfulqa_sample(
        common.SHARED_DATA / TRUTHFULQA_FILE, sizes.truthfulqa_questions, work / "truthfulqa_sample.csv"
    )
    layout = stages["layout"]
    tracking_to = RunTracking(
        layout.tracking_uri,
        tracking.ensure_experiment(layout.tracking_uri, layout.artifacts.as_uri()),
        {"tidpo.bench": NAME},
    )
    settings = grid_settings(sizes)
    engine_options = grid_engine_options(sizes, judge["path"])
    report = compare_methods(
        stages["open_db"],
        layout,
        tracking_to,
        stages["digest"],
        stages["reference"],
        stages["anchors"],
        stages["weights"],
        settings,
        engine_options,
        benchmarks=["truthfulqa"],
        benchmark_options=BenchmarkOptions(
            data_files={"truthfulqa": str(questions)}, batch_size=sizes.eval_batch_size
        ),
        record={"commit": common.git_commit()},
        log=lambda message: common.log(NAME, message),
    )
    return {
        "setup": {
            "model": model,
            "data": DATA_FILE,
            "split": "sorted by pair_id: first `train` pairs train, the next `eval` held out, the next `judge` train the judge",
            "split_info": split.info,
            "sizes": asdict(sizes),
            "engine_options": {k: v for k, v in engine_options.items() if k != "grpo_reward_model"},
            "truthfulqa_questions": sizes.truthfulqa_questions,
            "prepare_s": stages["timings"],
            "comparison_id": report.comparison_id,
            "report_dir": str(report.report_dir),
        },
        "judge": judge,
        **method_rows(report.result),
    }


def method_rows(result: Any) -> dict[str, Any]:
    """real.json's "methods" (per method and metric: mean, std and the per-seed values) and the runs' commits."""
    methods: dict[str, dict[str, Any]] = {}
    for run in result.runs:
        row = methods.setdefault(run.method, {})
        for metric in REPORTED:
            if metric in run.metrics:
                row.setdefault(metric, {"seeds": []})["seeds"].append(float(run.metrics[metric]))
    for row in methods.values():
        for cell in row.values():
            cell.update(common.mean_std(cell["seeds"]))
    commits = sorted({str(run.info.get("commit", "unknown")) for run in result.runs})
    runs = [
        {
            "method": r.method,
            "seed": r.seed,
            "commit": r.info.get("commit"),
            "reused": r.reused,
            "train_s": r.train_seconds,
            "eval_s": r.eval_seconds,
        }
        for r in result.runs
    ]
    return {"methods": methods, "commits": commits, "one_commit": len(commits) == 1, "runs": runs}


def beats_dpo(methods: dict[str, Any], metric: str = "judged_win_rate") -> dict[str, Any]:
    """The issue's target on `metric`, measured: does some TI-DPO beat DPO by more than both spreads?"""
    dpo = methods.get("dpo", {}).get(metric)
    out: dict[str, Any] = {}
    if dpo is None:
        return out
    for method in (m for m in methods if m.startswith("tidpo")):
        cell = methods[method].get(metric)
        if cell is None:
            continue
        gap = cell["mean"] - dpo["mean"]
        out[f"{method} {metric} beats dpo by more than both stds"] = {
            "gap": gap,
            "spreads": cell["std"] + dpo["std"],
            "met": bool(gap > cell["std"] + dpo["std"]),
        }
    return out


def merge_results(section: dict[str, Any], quick: bool, started: float) -> dict[str, Any]:
    """real.json with this part's sections replaced and the other parts' kept."""
    path = common.result_path(NAME, quick)
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures.pop("machine", None)
    figures.update(section)
    rejudged = figures.get("rejudged", {}).get("methods", {})
    figures["targets"] = {
        **figures.get("targets", {}),
        **beats_dpo(figures.get("methods", {})),
        **beats_dpo(rejudged, "judged_win_rate_length_controlled"),
    }
    figures["verdicts"] = verdicts(figures.get("methods", {}), VERDICT_METRICS)
    figures["frontier"] = real_frontier.win_rate_frontier(figures.get("methods", {}))
    real_frontier.save_tradeoffs(
        figures, common.results_dir() / f"{NAME}{'-quick' if quick else ''}-tradeoff.png"
    )
    return common.write_results(NAME, figures, quick, started)


def run(
    quick: bool = False, work: Path | None = None, model: str = MODEL, part: str = "all"
) -> dict[str, Any]:
    common.setup_threads()
    started = time.perf_counter()
    if not (common.SHARED_DATA / DATA_FILE).exists():
        reason = f"skipped: {common.SHARED_DATA / DATA_FILE} not found (HH-RLHF lives in the project's shared data folder)"
        common.log(NAME, reason)
        return common.write_results(NAME, {"skipped": reason}, quick, started)
    sizes = QUICK if quick else GridSizes()
    work = work or common.ROOT / ".tidpo" / (f"bench-{NAME}-quick" if quick else f"bench-{NAME}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    from bench import real_parts  # it builds on this module's grid

    figures: dict[str, Any] = {}
    if part in ("grid", "all"):
        figures = merge_results(run_grid(work, model, sizes), quick, started)
    if part in ("importance", "all"):
        figures = merge_results(real_parts.importance_section(model, quick), quick, started)
    if part in ("trl", "all"):
        figures = merge_results(real_parts.trl_section(model, quick), quick, started)
    if part == "rejudge":
        figures = merge_results(real_parts.rejudge_section(work, model, sizes, quick), quick, started)
    return figures


# rejudge is not in "all": a grid evaluated by this commit's comparison already carries every judged figure.
PARTS = ("grid", "importance", "trl", "rejudge", "all")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="the paper's comparison on a pretrained chat model (resumable)"
    )
    parser.add_argument("--quick", action="store_true", help="the smoke test's sizes")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the data dir that keeps every stage (default .tidpo/bench-real)",
    )
    parser.add_argument(
        "--model", default=MODEL, help="reference model: hub id, HF folder, GGUF file or shipped name"
    )
    parser.add_argument(
        "--part",
        default="all",
        choices=PARTS,
        help="the grid, the estimators' precision@k, TRL's timing, all three, or rejudge (the grid's kept models' answers judged again, with the win rate at equal lengths)",
    )
    args = parser.parse_args()
    run(quick=args.quick, work=args.work, model=args.model, part=args.part)


if __name__ == "__main__":
    main()
