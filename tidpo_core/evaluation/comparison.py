"""The paper's method comparison in miniature: DPO, SimPO, TI-DPO and its three ablations, and on request
the GRPO baseline, trained from one reference model on one data set over several seeds, each evaluated
with every metric of `tidpo_core.evaluation.evaluate` (and, on request, the benchmarks), aggregated to mean and
spread per method.

Every trained run also reports `train_seconds` (its wall-clock training time) and, when a reward is
available, `reward_model_score`: the mean reward of its sampled answers to the eval prompts (the same
samples the KL and diversity metrics use), under the reward model of grpo_reward: model, or else the
rule reward of the built-in data (tidpo_core.method.grpo.PhraseReward over the eval pairs). GRPO's policy is
scored like every other: its implicit reward is the DPO one, beta times its summed log-ratio to the
reference, so reward accuracy and margin mean for it what they mean for DPO.

Plain functions over paths and fingerprints: `run_method_comparison` trains in-process through
`tidpo_core.training.train`, so a notebook, a test or the Dagster asset drive it alike. The reward that judges the sampled answers
is in comparison_judge.py; the table, CSV, DuckDB rows and training curves in comparison_report.py.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tidpo_core import store
from tidpo_core.batching.chat import stop_token_ids
from tidpo_core.data.pairs import PreferencePair
from tidpo_core.evaluation.benchmark_runner import run_benchmarks
from tidpo_core.evaluation.benchmarks import BenchmarkOptions, BenchmarkResult, benchmark_metrics
from tidpo_core.evaluation.comparison_judge import (
    grpo_reward_setting,
    judged_answers,
    judged_metrics,
    scoring_reward,
)
from tidpo_core.evaluation.evaluate import evaluate_model
from tidpo_core.evaluation.preference import score_pairs
from tidpo_core.evaluation.settings import ModelEvalSettings
from tidpo_core.method.grpo import RewardFunction, phrase_reward
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.launch import LaunchSettings, run_training
from tidpo_core.runtime.layout import RunDir
from tidpo_core.training import TrainConfig

# Method name -> TrainConfig fields that make it. The three ablations are the paper's (docs/method.md):
# lambda 0 drops the gradient attribution, lambda 1 the Gaussian prior, gamma 0 the triplet term.
METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"loss_type": "dpo"},
    "simpo": {"loss_type": "simpo"},
    "tidpo": {"loss_type": "tidpo"},
    "tidpo_no_attribution": {"loss_type": "tidpo", "weight_lambda": 0.0},
    "tidpo_no_prior": {"loss_type": "tidpo", "weight_lambda": 1.0},
    "tidpo_no_triplet": {"loss_type": "tidpo", "gamma": 0.0},
    # TI-DPO with another importance estimator (docs/method.md section 1, other estimators) than the token weights' own: trained on a second
    # weight table (ComparisonInputs.weights_by_method), which the method_comparison step weighs.
    "tidpo_surprisal": {"loss_type": "tidpo"},
    "tidpo_contrastive": {"loss_type": "tidpo"},
    # GRPO (docs/method.md section 8, the baselines): sampled completions and a reward (grpo_reward) instead of the pairs.
    "grpo": {"loss_type": "grpo"},
}
# The methods that train on their own estimator's weights, and that estimator.
ESTIMATOR_METHODS: dict[str, str] = {"tidpo_surprisal": "surprisal", "tidpo_contrastive": "contrastive"}
# What a comparison trains unless told otherwise: grpo is asked for by name, because it needs a reward
# (the built-in data's phrases or a reward model) and samples G completions per prompt at every step; the
# estimator methods too, because each weighs every response again (contrastive also needs its two models).
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "grpo" and m not in ESTIMATOR_METHODS)
REFERENCE = "reference"


@dataclass(frozen=True)
class ComparisonInputs:
    """The shared starting point: data, reference model, stored token weights and anchors."""

    duckdb_path: str
    reference_model_path: str
    weights_fingerprint: str
    anchors_fingerprint: str
    reference_revision: str | None = None
    trust_remote_code: bool = False
    weight_lambda: float = 0.7
    weight_normalization: str = "max"
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    weights_by_method: Mapping[str, str] = field(default_factory=dict)
    """Method -> the fingerprint of its own weight table (the estimator methods); the others train on
    `weights_fingerprint`."""


@dataclass
class ComparisonRun:
    method: str
    seed: int
    metrics: dict[str, float]
    model_path: str = ""
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    reused: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """What the caller asked to record with the run when it was evaluated (e.g. the commit that trained it)."""


@dataclass
class ComparisonResult:
    runs: list[ComparisonRun]
    table: list[dict[str, Any]]
    seconds: float
    reward: str = ""
    """The reward behind reward_model_score (empty: none was available, so no run has that metric)."""

    def methods(self) -> list[str]:
        return [str(row["method"]) for row in self.table]


def method_train_config(
    method: str, seed: int, inputs: ComparisonInputs, output_dir: str | Path, overrides: Mapping[str, Any]
) -> TrainConfig:
    """The TrainConfig of one (method, seed): shared inputs, the method's switches, common overrides."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    fields = {
        "duckdb_path": inputs.duckdb_path,
        "reference_model_path": inputs.reference_model_path,
        "reference_revision": inputs.reference_revision,
        "trust_remote_code": inputs.trust_remote_code,
        "output_dir": str(output_dir),
        "weights_fingerprint": inputs.weights_by_method.get(method, inputs.weights_fingerprint),
        "anchors_fingerprint": inputs.anchors_fingerprint,
        "weight_lambda": inputs.weight_lambda,
        "weight_normalization": inputs.weight_normalization,
        "max_prompt_tokens": inputs.max_prompt_tokens,
        "max_response_tokens": inputs.max_response_tokens,
        "checkpoint_every": 0,
        "keep_checkpoints": 0,
        "resume": False,
        "progress": False,
        **dict(overrides),
        **METHODS[method],
        "seed": seed,
    }
    return TrainConfig(**fields)


def _train_or_reuse(
    config: TrainConfig, launch_settings: LaunchSettings
) -> tuple[dict[str, Any], bool, float]:
    """Train, unless this exact config already finished in its output folder (then reuse it); returns the
    summary, whether it was reused, and the wall-clock seconds its training took (when reused, those of
    the run that trained it)."""
    out = Path(config.output_dir)
    wanted = yaml.safe_dump(asdict(config), sort_keys=True)
    summary_file, config_file, timing_file = (
        RunDir(out).summary,
        out / "comparison_config.yaml",
        out / "comparison_timing.json",
    )
    if summary_file.exists() and config_file.exists() and config_file.read_text() == wanted:
        summary = json.loads(summary_file.read_text())
        if Path(summary["final_model_path"]).exists():
            seconds = (
                json.loads(timing_file.read_text())["train_seconds"] if timing_file.exists() else float("nan")
            )
            return summary, True, float(seconds)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tic = time.perf_counter()
    summary = run_training(config, launch_settings)
    seconds = time.perf_counter() - tic
    config_file.write_text(wanted)
    timing_file.write_text(json.dumps({"train_seconds": seconds}))
    return summary, False, seconds


def run_method_comparison(
    inputs: ComparisonInputs,
    output_dir: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    train_overrides: Mapping[str, Any] | None = None,
    eval_settings: ModelEvalSettings = ModelEvalSettings(),
    benchmarks: Sequence[str] = (),
    benchmark_options: BenchmarkOptions | None = None,
    keep_models: bool = True,
    launch_settings: LaunchSettings = LaunchSettings(launcher="in_process"),
    record: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ComparisonResult:
    """Train every method with every seed from the same reference and data, evaluate each, aggregate.

    The reference is evaluated once (row "reference"); eval sampling uses the same seed for every run,
    so differences between runs come from training. A run whose training config and evaluation are
    unchanged is reused, evaluated or not: its metrics are kept beside it (`comparison_eval.json`), so a
    comparison stopped halfway resumes at the first run it had not finished, even with keep_models False
    (each policy folder deleted once evaluated). `record` is stored with each run as it is evaluated
    (ComparisonRun.info: a caller's commit, say). Training and evaluation run under the thread plan
    (tidpo_core.runtime.threads). `launch_settings` says how each run is trained: in this process by default (the
    runs are short and share the loaded reference's pages), or through `accelerate launch` for multi-GPU runs.
    """
    plan = _ComparisonPlan.make(
        inputs,
        output_dir,
        methods,
        seeds,
        train_overrides,
        eval_settings,
        benchmarks,
        benchmark_options,
        record,
    )
    return _run_plan(plan, keep_models, launch_settings, log)


@dataclass(frozen=True)
class _ComparisonPlan:
    """What every run of one comparison shares: its inputs, runs, evaluation and the key of that evaluation."""

    inputs: ComparisonInputs
    output_dir: Path
    runs: list[tuple[str, int]]
    overrides: dict[str, Any]
    settings: ModelEvalSettings
    benchmarks: tuple[str, ...]
    benchmark_options: BenchmarkOptions
    eval_pairs: list[PreferencePair]
    scorer: RewardFunction | None
    reward_name: str
    eval_key: str
    record: dict[str, Any]

    @classmethod
    def make(
        cls,
        inputs,
        output_dir,
        methods,
        seeds,
        train_overrides,
        eval_settings,
        benchmarks,
        benchmark_options,
        record,
    ) -> _ComparisonPlan:  # noqa: ANN001
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {sorted(METHODS)}")
        unweighed = [m for m in methods if m in ESTIMATOR_METHODS and m not in inputs.weights_by_method]
        if unweighed:
            raise ValueError(
                f"{unweighed} train on their estimator's own weights: give them in ComparisonInputs.weights_by_method"
            )
        if not seeds:
            raise ValueError("at least one seed is needed")
        overrides = dict(train_overrides or {})
        pairs = store.read_pairs_at(inputs.duckdb_path, split="eval")
        if not pairs:
            raise ValueError(f"no eval pairs in {inputs.duckdb_path}: the comparison needs a held-out split")
        # Before any training, so that a reward GRPO cannot have fails now rather than after every other method
        # has trained: the reward model loads here (grpo_reward: model), and the train pairs must carry phrases.
        scorer, reward_name = scoring_reward(overrides, pairs)
        if "grpo" in methods and grpo_reward_setting(overrides)[0] == "phrases":
            phrase_reward(store.read_pairs_at(inputs.duckdb_path, split="train"))
        settings = replace(
            eval_settings,
            weight_lambda=inputs.weight_lambda,
            weight_normalization=inputs.weight_normalization,  # type: ignore[arg-type]
        )
        options = benchmark_options or BenchmarkOptions()
        eval_key = digest(
            {
                "settings": asdict(settings),
                "benchmarks": list(benchmarks),
                "benchmark_options": repr(options),
                "reward": reward_name,
                "reference": [inputs.reference_model_path, inputs.reference_revision],
                "eval_pairs": sorted(p.pair_id for p in pairs),
            }
        )
        runs = [(m, s) for m in methods for s in seeds]
        return cls(
            inputs,
            Path(output_dir),
            runs,
            overrides,
            settings,
            tuple(benchmarks),
            options,
            pairs,
            scorer,
            reward_name,
            eval_key,
            dict(record or {}),
        )

    def config(self, method: str, seed: int) -> TrainConfig:
        return method_train_config(
            method, seed, self.inputs, self.output_dir / method / f"seed_{seed}", self.overrides
        )


class _Reference:
    """The reference model, loaded and scored on the eval pairs only when some run still needs evaluating."""

    def __init__(self, plan: _ComparisonPlan):
        self.plan = plan
        self._loaded: tuple[Any, Any, Any] | None = None

    def loaded(self) -> tuple[Any, Any, Any]:
        """(model, tokenizer, its scores of the eval pairs)."""
        if self._loaded is None:
            inputs = self.plan.inputs
            model, tokenizer = load_model_and_tokenizer(
                inputs.reference_model_path,
                revision=inputs.reference_revision,
                trust_remote_code=inputs.trust_remote_code,
            )
            settings = self.plan.settings
            self._loaded = (
                model,
                tokenizer,
                score_pairs(model, tokenizer, self.plan.eval_pairs, settings.encoding, settings.batch_size),
            )
        return self._loaded


def _run_plan(
    plan: _ComparisonPlan, keep_models: bool, launch_settings: LaunchSettings, log: Callable[[str], None]
) -> ComparisonResult:
    started = time.perf_counter()
    if plan.scorer is not None:
        log(f"reward_model_score and judged_win_rate: the {plan.reward_name}")
    reference = _Reference(plan)
    reference_run = _cached_run(plan.output_dir / REFERENCE, plan.eval_key, config_text="")
    if reference_run is None:
        reference_run = _evaluate_reference(plan, reference)
        _store_run(plan.output_dir / REFERENCE, plan.eval_key, "", reference_run, plan.record)
    baseline = reference_run.info
    runs = [reference_run]
    for index, (method, seed) in enumerate(plan.runs, start=1):
        config = plan.config(method, seed)
        config_text = yaml.safe_dump(asdict(config), sort_keys=True)
        run = _cached_run(Path(config.output_dir), plan.eval_key, config_text)
        if run is None:
            summary, reused, train_seconds = _train_or_reuse(config, launch_settings)
            run = _evaluate_run(plan, reference, method, seed, summary, reused, train_seconds, baseline)
            _store_run(Path(config.output_dir), plan.eval_key, config_text, run, plan.record)
            if not keep_models:
                shutil.rmtree(Path(summary["final_model_path"]), ignore_errors=True)
        runs.append(run)
        log(
            f"[{index}/{len(plan.runs)}] {method} seed {seed}: "
            f"{'reused' if run.reused else f'trained in {run.train_seconds:.0f} s'}, evaluated in {run.eval_seconds:.0f} s, "
            f"reward_accuracy {run.metrics.get('reward_accuracy', float('nan')):.3f}"
            + (
                f", judged_win_rate {run.metrics['judged_win_rate']:.3f}"
                if "judged_win_rate" in run.metrics
                else ""
            )
        )
    return ComparisonResult(
        runs=runs, table=aggregate(runs), seconds=time.perf_counter() - started, reward=plan.reward_name
    )


def _evaluate_reference(plan: _ComparisonPlan, reference: _Reference) -> ComparisonRun:
    model, tokenizer, scores = reference.loaded()
    tic = time.perf_counter()
    evaluation = evaluate_model(
        model, model, tokenizer, plan.eval_pairs, plan.settings, reference_scores=scores
    )
    run = ComparisonRun(REFERENCE, 0, evaluation.metrics, plan.inputs.reference_model_path)
    _judged(run, plan, evaluation.samples, tokenizer)
    if plan.benchmarks:
        _add_benchmarks(run, plan.inputs.reference_model_path, plan)
    run.eval_seconds = time.perf_counter() - tic
    return run


def _evaluate_run(
    plan: _ComparisonPlan,
    reference: _Reference,
    method: str,
    seed: int,
    summary: Mapping[str, Any],
    reused: bool,
    train_seconds: float,
    baseline: Mapping[str, Any],
) -> ComparisonRun:
    """Evaluate one trained run; `baseline` is the reference run's info (its judged answers)."""
    model, tokenizer, scores = reference.loaded()
    tic = time.perf_counter()
    model_path = str(summary["final_model_path"])
    policy, _ = load_model_and_tokenizer(model_path, trust_remote_code=plan.inputs.trust_remote_code)
    evaluation = evaluate_model(
        policy, model, tokenizer, plan.eval_pairs, plan.settings, reference_scores=scores
    )
    del policy
    gc.collect()
    run = ComparisonRun(
        method,
        seed,
        evaluation.metrics,
        model_path,
        train_seconds=train_seconds,
        reused=reused,
        history=summary.get("history", []),
    )
    _judged(run, plan, evaluation.samples, tokenizer, baseline)
    if plan.benchmarks:
        _add_benchmarks(run, model_path, plan)
    run.eval_seconds = time.perf_counter() - tic
    run.metrics["train_seconds"] = train_seconds
    run.metrics["final_train_loss"] = float(summary.get("last_loss", float("nan")))
    return run


def _judged(
    run: ComparisonRun,
    plan: _ComparisonPlan,
    samples: Any,
    tokenizer: Any,
    baseline: Mapping[str, Any] | None = None,
) -> None:
    """The judge's figures of the run's answers (the reference run's info is the `baseline` of the others),
    and the answers' rewards and lengths kept in the run's info."""
    answers = judged_answers(plan.scorer, samples, stop_token_ids(tokenizer))
    if answers is not None:
        run.info.update(answers)
        run.metrics.update(judged_metrics(answers, baseline))


def _add_benchmarks(run: ComparisonRun, model_path: str, plan: _ComparisonPlan) -> None:
    results: list[BenchmarkResult] = run_benchmarks(model_path, plan.benchmarks, plan.benchmark_options)
    run.metrics.update(benchmark_metrics(results))
    run.benchmarks = [b.as_dict() for b in results]


EVALUATED_FILE = "comparison_eval.json"


def _store_run(
    folder: Path, eval_key: str, config_text: str, run: ComparisonRun, record: Mapping[str, Any]
) -> None:
    """Keep the evaluated run beside its training config, written whole (a resumed comparison reuses it)."""
    run.info = {**run.info, **record}
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / (EVALUATED_FILE + ".tmp")
    staging.write_text(
        json.dumps({"eval_key": eval_key, "config": config_text, "run": asdict(run)}, default=str)
    )
    staging.replace(folder / EVALUATED_FILE)


def _cached_run(folder: Path, eval_key: str, config_text: str) -> ComparisonRun | None:
    """The run evaluated in `folder` with this training config and evaluation, else None."""
    path = folder / EVALUATED_FILE
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored.get("eval_key") != eval_key or stored.get("config") != config_text:
        return None
    return replace(ComparisonRun(**stored["run"]), reused=True)


def aggregate(runs: Sequence[ComparisonRun]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): seeds, and per metric its mean and sample std over seeds.

    std is NaN with a single seed. Non-finite values are left out of a metric's mean.
    """
    order: list[str] = []
    by_method: dict[str, list[ComparisonRun]] = {}
    for run in runs:
        if run.method not in by_method:
            order.append(run.method)
        by_method.setdefault(run.method, []).append(run)
    rows = []
    for method in order:
        group = by_method[method]
        metrics = list(dict.fromkeys(k for r in group for k in r.metrics))
        row: dict[str, Any] = {"method": method, "seeds": len(group)}
        for metric in metrics:
            values = np.array([r.metrics.get(metric, float("nan")) for r in group], dtype=np.float64)
            finite = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(finite.mean()) if finite.size else float("nan")
            row[f"{metric}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        rows.append(row)
    return rows
