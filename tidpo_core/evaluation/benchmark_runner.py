"""Running the benchmarks through lm-evaluation-harness on a saved checkpoint: which tasks can run
(and why the others cannot), the model loaded once, each task's scores or its error."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tidpo_core.batching.chat import has_chat_template
from tidpo_core.evaluation.benchmark_files import data_file
from tidpo_core.evaluation.benchmark_tasks import task_config, task_scores
from tidpo_core.evaluation.benchmarks import (
    BENCHMARK_DATA,
    BENCHMARK_GROUPS,
    BENCHMARKS,
    BenchmarkOptions,
    BenchmarkResult,
    expand_benchmarks,
)
from tidpo_core.evaluation.ifeval import ifeval_dependencies
from tidpo_core.runtime.offline import apply_offline_defaults
from tidpo_core.runtime.quiet import LM_EVAL_CUSTOM_DATASET_NOISE, without_log_messages

logger = logging.getLogger(__name__)


def _unavailable_reason(task: str, options: BenchmarkOptions) -> str | None:
    if task not in BENCHMARK_DATA:
        return f"no offline adapter for this task; supported: {', '.join((*BENCHMARKS, *BENCHMARK_GROUPS))}"
    key = BENCHMARK_DATA[task]
    configured = options.data_files.get(key) or ""
    path = data_file(key, configured)
    if not path:
        if configured:
            return f"tidpo ships no built-in sample of {key}: set its path to a local file"
        return f"no data file configured for {key} (set its path in the config, or 'builtin' where tidpo ships a sample); the hub is not used offline"
    if not Path(path).is_file():
        return f"data file not found: {path}"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm_eval is not installed (pip install 'tidpo[eval]')"
    if task == "ifeval":
        return ifeval_dependencies()
    if task == "humaneval" and not options.allow_code_execution:
        return "running generated code is off: set allow_code_execution to true (each program runs in a limited subprocess)"
    return None


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_benchmarks(
    model_path: str | os.PathLike, tasks: Sequence[str], options: BenchmarkOptions = BenchmarkOptions()
) -> list[BenchmarkResult]:
    """Run each requested benchmark on the checkpoint folder; one result per task, in order.

    The model is loaded once (lm-eval's HFLM) and shared by the tasks; a task that fails is reported
    with its error and does not stop the others.
    """
    results: list[BenchmarkResult] = []
    runnable: list[str] = []
    for task in expand_benchmarks(tasks):
        reason = _unavailable_reason(task, options)
        if reason is None:
            runnable.append(task)
        results.append(BenchmarkResult(task, "unavailable" if reason else "ok", reason=reason or ""))
    if not runnable:
        return results
    apply_offline_defaults()
    from lm_eval.models.huggingface import HFLM

    # HFLM fixes accelerate's process-wide state; a training run later in this process must find none.
    from tidpo_core.training.setup import accelerate_state_left_as_found

    with accelerate_state_left_as_found():
        lm = HFLM(
            pretrained=str(model_path),
            device=_resolve_device(options.device),
            dtype=options.dtype,
            batch_size=options.batch_size,
            max_length=options.max_length,
        )
        _run_tasks(lm, runnable, {r.task: r for r in results}, options)
    return results


def _run_tasks(
    lm: Any, runnable: Sequence[str], by_task: Mapping[str, BenchmarkResult], options: BenchmarkOptions
) -> None:
    """Each task through lm-eval on the loaded model, its scores (or why it failed) into its result."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # A chat model answers questions put to it as a user turn in its chat template (lm-eval's
    # --apply_chat_template); a base or tiny model reads the raw text.
    chat = has_chat_template(lm.tokenizer)
    manager = TaskManager(include_defaults=False)
    for task in runnable:
        result = by_task[task]
        started = time.perf_counter()
        state: dict[str, Any] = {}
        path = data_file(BENCHMARK_DATA[task], options.data_files[BENCHMARK_DATA[task]])
        try:
            with without_log_messages("lm_eval.api.task", *LM_EVAL_CUSTOM_DATASET_NOISE):
                output = simple_evaluate(
                    model=lm,
                    tasks=[task_config(task, path, options, state)],
                    task_manager=manager,
                    limit=options.limit,
                    bootstrap_iters=0,
                    log_samples=False,
                    confirm_run_unsafe_code=options.allow_code_execution,
                    apply_chat_template=chat,
                )
            raw = (output or {}).get("results", {}).get(task)
            if raw is None:
                raise RuntimeError(f"lm-eval returned no results for {task}")
            result.metrics, result.details = task_scores(task, raw, state)
            result.documents = int((output or {}).get("n-samples", {}).get(task, {}).get("effective", 0))
        except Exception as exc:  # one broken task must not hide the others' scores
            logger.exception("benchmark %s failed", task)
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
        result.seconds = time.perf_counter() - started
