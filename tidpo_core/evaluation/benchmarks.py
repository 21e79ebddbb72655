"""The paper's benchmarks (TruthfulQA MC1/MC2, IFEval, HumanEval) through lm-evaluation-harness, offline.

lm-eval's own task configs fetch their data from the Hugging Face hub. Here every task is an inline
lm-eval task config (a Python dict handed to `simple_evaluate`) whose `custom_dataset` reads a local
file named by the caller, so nothing is downloaded; the model runs through lm-eval's `hf` backend
(HFLM) on a saved checkpoint folder. A task that cannot run is returned with status "unavailable"
and the reason (no data file, a missing optional dependency, code execution not enabled), never
silently dropped.

- TruthfulQA: the CSV of the TruthfulQA repository (Question, Best Answer, Correct Answers,
  Incorrect Answers; answers separated by ';') or JSON/JSONL rows in the hub's multiple_choice layout
  (question, mc1_targets, mc2_targets). From the CSV, MC1 asks for the best answer among it and the
  incorrect ones, MC2 scores the normalized probability mass of all correct answers (lm-eval's
  process_results_mc2), both with lm-eval's 6-shot QA preamble.
- IFEval: the input_data.jsonl of google-research (key, prompt, instruction_id_list, kwargs), scored
  with lm-eval's instruction checkers, strict and loose, prompt- and instruction-level. Checkers that
  need data that cannot be had offline (nltk's punkt tokenizers) are reported per instruction id with
  the reason; their instructions are left out of the instruction-level scores and their prompts out
  of the prompt-level ones.
- HumanEval: HumanEval.jsonl(.gz); pass@1 with greedy decoding. Generated code runs only when the
  caller opts in (`allow_code_execution`), each program in its own subprocess with a timeout, memory,
  CPU-time and file-size limits, an empty working directory and a minimal environment.

This module names the benchmarks and holds their settings and results; benchmark_files.py reads the
data files, benchmark_tasks.py builds the lm-eval task configs, ifeval.py scores IFEval, sandbox.py
runs generated code, and benchmark_runner.py runs the tasks (`run_benchmarks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tidpo_core.evaluation.benchmark_files import BUILTIN

# Benchmark name -> the data file key it reads (several benchmarks can share one file).
BENCHMARK_DATA: dict[str, str] = {
    "truthfulqa_mc1": "truthfulqa",
    "truthfulqa_mc2": "truthfulqa",
    "ifeval": "ifeval",
    "humaneval": "humaneval",
}
BENCHMARKS: tuple[str, ...] = tuple(BENCHMARK_DATA)
# Names that stand for several benchmarks.
BENCHMARK_GROUPS: dict[str, tuple[str, ...]] = {"truthfulqa": ("truthfulqa_mc1", "truthfulqa_mc2")}

Status = Literal["ok", "unavailable", "failed"]


def expand_benchmarks(names: Sequence[str]) -> list[str]:
    """Benchmark names with groups expanded ("truthfulqa" -> MC1 and MC2), in order, without repeats.

    Unknown names are kept: `run_benchmarks` reports them as unavailable with the reason.
    """
    out: list[str] = []
    for name in names:
        for task in BENCHMARK_GROUPS.get(name.strip().lower(), (name.strip().lower(),)):
            if task not in out:
                out.append(task)
    return out


@dataclass(frozen=True)
class BenchmarkOptions:
    """Where the benchmark data lives and how to run it.

    data_files maps "truthfulqa", "ifeval" and "humaneval" to local files, or to "builtin" for the small
    samples shipped with tidpo (TruthfulQA and IFEval); limit caps the documents per task (the first
    `limit` of the file), for a quick subset.
    """

    data_files: Mapping[str, str] = field(default_factory=dict)
    limit: int | None = None
    allow_code_execution: bool = False
    code_timeout_s: float = 10.0
    code_memory_mb: int = 1024
    max_gen_toks: int = 256
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None


def _default_benchmarks() -> list[str]:
    return ["truthfulqa", "ifeval"]


@dataclass(frozen=True)
class BenchmarkSelection:
    """Which lm-eval benchmarks a run scores and on what data: the settings a user chooses (the
    evaluation asset and the method comparison take them), from which `options()` builds BenchmarkOptions."""

    benchmarks: list[str] = field(default_factory=_default_benchmarks)
    """lm-eval benchmarks per run: truthfulqa (= truthfulqa_mc1 + truthfulqa_mc2), ifeval, humaneval; [] for none.
    The default runs TruthfulQA and IFEval on the built-in 16-document samples: seconds on the embedded model."""
    benchmark_limit: int | None = None
    """Documents per benchmark (the first N of each file); None: all."""
    truthfulqa_path: str = BUILTIN
    """TruthfulQA.csv of the TruthfulQA repository, JSON/JSONL in the hub's multiple_choice layout, or
    "builtin" (16 questions shipped with tidpo)."""
    ifeval_path: str = BUILTIN
    """IFEval's input_data.jsonl, or "builtin" (16 prompts shipped with tidpo)."""
    humaneval_path: str = ""
    """HumanEval.jsonl(.gz); runs only with allow_code_execution."""
    allow_code_execution: bool = False
    """HumanEval runs model-written code (in a limited subprocess): only with this set."""
    code_timeout_s: float = 10.0
    """Seconds each HumanEval program may run."""
    code_memory_mb: int = 1024
    """Memory each HumanEval program may use."""
    benchmark_max_gen_tokens: int = 256
    """Most tokens generated per benchmark answer."""
    benchmark_batch_size: int = 8
    """Documents per lm-eval batch."""

    def options(self) -> BenchmarkOptions:
        return BenchmarkOptions(
            data_files={
                "truthfulqa": self.truthfulqa_path,
                "ifeval": self.ifeval_path,
                "humaneval": self.humaneval_path,
            },
            limit=self.benchmark_limit,
            allow_code_execution=self.allow_code_execution,
            code_timeout_s=self.code_timeout_s,
            code_memory_mb=self.code_memory_mb,
            max_gen_toks=self.benchmark_max_gen_tokens,
            batch_size=self.benchmark_batch_size,
        )


@dataclass
class BenchmarkResult:
    task: str
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    documents: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark_metrics(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """All scores of the tasks that ran, as one flat dict (e.g. truthfulqa_mc1, ifeval_prompt_strict)."""
    return {k: v for r in results if r.status == "ok" for k, v in r.metrics.items()}
