"""bench_real's parts besides the grid: the estimators' precision@k and TRL on the pretrained model (each
delegating to its own bench), and rejudge, where the grid's kept models answer the held-out prompts again and
the judge scores them, for the win rate at equal answer lengths."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import common
from bench.bench_real import (
    DATA_FILE,
    NAME,
    GridSizes,
    grid_engine_options,
    grid_settings,
    prepare,
    split_pairs,
)


def importance_section(model: str, quick: bool) -> dict[str, Any]:
    """real.json's "importance": every estimator's precision@k (hybrid, and raw beside it) with `model` as the
    reference, at both span positions (bench_importance.run_pretrained, which also writes its own file)."""
    from bench import bench_importance

    doc = bench_importance.run_pretrained(model, quick=quick)
    section: dict[str, Any] = {}
    for position, rows in doc["span_position"].items():
        section[position] = {
            name: {key: row[key] for key in ("precision_at_k", "raw_precision_at_k") if key in row}
            for name, row in rows.items()
            if isinstance(row, dict) and "precision_at_k" in row
        }
    section["commit"] = doc["commit"]
    return {"importance": section, "importance_targets": doc["target"]}


def trl_section(model: str, quick: bool) -> dict[str, Any]:
    """real.json's "trl": tidpo's epoch time over TRL's DPOTrainer's on `model` (bench_trl.run_pretrained, which
    also writes its own file), and the first-batch loss difference."""
    from bench import bench_trl

    doc = bench_trl.run_pretrained(model, quick=quick)
    section: dict[str, Any] = {
        method: {
            "epoch_ratio_vs_trl": row["epoch_ratio_vs_trl"],
            "epoch_ratio_vs_trl_rounds": row["epoch_ratio_vs_trl_rounds"],
        }
        for method, row in doc["methods"].items()
        if method != "trl_dpo"
    }
    section["first_batch_loss_abs_diff"] = doc["first_batch_loss_abs_diff"]
    section["token_ids"] = doc["methods"]["trl_dpo"]["token_ids"]
    section["setup"] = doc["setup"]
    section["commit"] = doc["commit"]
    return {"trl": section, "trl_targets": doc["target"]}


REJUDGED = ("judged_win_rate", "judged_win_rate_length_controlled", "reward_model_score", "mean_length")


def rejudge_section(work: Path, model: str, sizes: GridSizes, quick: bool) -> dict[str, Any]:
    """real.json's "rejudged": the grid's kept models answer the same held-out prompts again (the comparison's
    settings and sampling seed), the judge scores each answer, and each run gets its win rate over the
    reference's answers, plain and at equal lengths (judged_win_rate_length_controlled). For a grid evaluated
    before the comparison kept its answers' lengths; "reproduces_grid" compares the plain figures with the
    grid's own. Each model's answers are kept in `work`/rejudged, so a stopped part resumes."""
    from tidpo_core import store
    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.evaluation.comparison_judge import judged_metrics
    from tidpo_core.evaluation.evaluate import sample_prompt_pairs
    from tidpo_core.steps.compare import comparison_eval_settings

    grid, folder = _evaluated_grid(work, quick)
    judge_dir = work / "judge"
    split = split_pairs(common.SHARED_DATA / DATA_FILE, sizes)
    stages = prepare(work, model, split, sizes)
    settings = comparison_eval_settings(
        grid_settings(sizes),
        grid_engine_options(sizes, str(judge_dir)),
        EncodingSettings(**stages["weights"]["encoding"]),
    )
    eval_pairs = store.read_pairs_at(str(stages["layout"].database), split="eval")
    prompts = [p.prompt for p in sample_prompt_pairs(eval_pairs, settings.sample_prompts)]
    judge = _Judge(judge_dir, eval_pairs)
    cache = work / "rejudged"
    stored = {"reference": _stored_eval(folder / "reference")}
    answers = {"reference": _answers(cache, "reference", stages["reference"].path, prompts, settings, judge)}
    for method in sizes.methods:
        for seed in sizes.seeds:
            name = f"{method}/seed_{seed}"
            stored[name] = _stored_eval(folder / method / f"seed_{seed}")
            answers[name] = _answers(cache, name, stored[name]["model_path"], prompts, settings, judge)
    reference = answers["reference"]
    methods: dict[str, Any] = {}
    differences: dict[str, list[float]] = {"judged_win_rate": [], "reward_model_score": [], "mean_length": []}
    for name, got in answers.items():
        figures = {
            **judged_metrics(got, None if name == "reference" else reference),
            "mean_length": sum(got["answer_lengths"]) / len(got["answer_lengths"]),
        }
        for metric, values in differences.items():
            if metric in figures and metric in stored[name]["metrics"]:
                values.append(abs(figures[metric] - float(stored[name]["metrics"][metric])))
        row = methods.setdefault(name.split("/")[0], {})
        for metric in REJUDGED:
            if metric in figures:
                row.setdefault(metric, {"seeds": []})["seeds"].append(figures[metric])
    for row in methods.values():
        for cell in row.values():
            cell.update(common.mean_std(cell["seeds"]))
    common.log(
        NAME,
        "rejudged: "
        + ", ".join(
            f"{m} {row['judged_win_rate_length_controlled']['mean']:.3f}"
            for m, row in methods.items()
            if "judged_win_rate_length_controlled" in row
        )
        + " (win rate at equal lengths)",
    )
    return {
        "rejudged": {
            "methods": methods,
            "reproduces_grid": {f"{m}_max_abs_diff": max(v, default=None) for m, v in differences.items()},
            "prompts": len(prompts),
            "grid_commits": grid.get("commits", []),
            "commit": common.git_commit(),
            "seconds": {name: got["seconds"] for name, got in answers.items()},
        }
    }


def _evaluated_grid(work: Path, quick: bool) -> tuple[dict[str, Any], Path]:
    """The grid's results (real.json) and the folder of its evaluated runs in `work`."""
    from tidpo_core.runtime.layout import DataDir

    path = common.result_path(NAME, quick)
    grid = json.loads(path.read_text()) if path.exists() else {}
    comparison_id = grid.get("setup", {}).get("comparison_id")
    folder = DataDir.at(work).comparison_run(comparison_id) if comparison_id else None
    if folder is None or not (folder / "reference").is_dir() or not (work / "judge").is_dir():
        raise FileNotFoundError(f"--part rejudge needs a grid evaluated in {work} and recorded in {path}")
    return grid, folder


class _Judge:
    """The grid's judge, loaded on first use (a resumed part whose answers are all kept never loads it)."""

    def __init__(self, path: Path, eval_pairs: list[Any]):
        self.path, self.eval_pairs, self._scorer = path, eval_pairs, None

    def __call__(self, samples: Any, stops: list[int]) -> dict[str, list[Any]]:
        """The comparison's record of judged answers: judge_rewards and answer_lengths."""
        from tidpo_core.evaluation.comparison_judge import judged_answers
        from tidpo_core.method.grpo import reward_function

        if self._scorer is None:
            self._scorer = reward_function("model", str(self.path), self.eval_pairs)
        answers = judged_answers(self._scorer, samples, stops)
        if answers is None:
            raise ValueError("no answers were sampled to judge")
        return answers


def _stored_eval(folder: Path) -> dict[str, Any]:
    """The grid's evaluation of one run (its comparison_eval.json): model_path and metrics."""
    return json.loads((folder / "comparison_eval.json").read_text())["run"]


def _answers(
    cache: Path, name: str, model_path: str, prompts: list[str], settings: Any, judge: _Judge
) -> dict[str, Any]:
    """One model's answers to `prompts` (the comparison's sampling), their judge rewards and lengths in tokens
    (the comparison's judged_answers); kept in `cache` under a key of the model, prompts, sampling and judge."""
    from tidpo_core.batching.chat import stop_token_ids
    from tidpo_core.evaluation.sampled_responses import sample_with_tokens
    from tidpo_core.models.modeling import load_model_and_tokenizer
    from tidpo_core.runtime.fingerprint import digest
    from tidpo_core.runtime.threads import threads_for

    key = digest(
        {
            "model": model_path,
            "prompts": prompts,
            "sampling": asdict(settings.sampling),
            "judge": (judge.path / "tidpo_reward.json").read_text()
            if (judge.path / "tidpo_reward.json").exists()
            else "",
        }
    )
    path = cache / f"{name.replace('/', '-')}.json"
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept
    tic = time.perf_counter()
    policy, tokenizer = load_model_and_tokenizer(model_path)
    with threads_for(policy):
        samples = sample_with_tokens(policy, tokenizer, prompts, settings.sampling, progress=True)
    del policy
    got = {
        "key": key,
        "model_path": model_path,
        "texts": samples.texts,
        **judge(samples, stop_token_ids(tokenizer)),
        "seconds": time.perf_counter() - tic,
    }
    cache.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(got))
    staging.replace(path)
    common.log(NAME, f"rejudged {name}: {len(got['judge_rewards'])} answers in {got['seconds']:.0f} s")
    return got
