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
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tidpo_core.batching.chat import has_chat_template
from tidpo_core.runtime.quiet import LM_EVAL_CUSTOM_DATASET_NOISE, without_log_messages

logger = logging.getLogger(__name__)

# Benchmark name -> the data file key it reads (several benchmarks can share one file).
BENCHMARK_DATA: dict[str, str] = {
    "truthfulqa_mc1": "truthfulqa",
    "truthfulqa_mc2": "truthfulqa",
    "ifeval": "ifeval",
    "humaneval": "humaneval",
}
BENCHMARKS: tuple[str, ...] = tuple(BENCHMARK_DATA)
# A data file given as "builtin" is the small sample shipped in tidpo_core/evaluation/benchmark_data (see its README).
BUILTIN = "builtin"
BUILTIN_DATA: dict[str, str] = {"truthfulqa": "truthfulqa_sample.csv", "ifeval": "ifeval_sample.jsonl"}


def data_file(key: str, configured: str) -> str:
    """The file a benchmark reads: the configured path, or for "builtin" the packaged sample ("" if none)."""
    if configured.strip().lower() != BUILTIN:
        return configured
    name = BUILTIN_DATA.get(key)
    return str(Path(__file__).parent / "benchmark_data" / name) if name else ""
# Names that stand for several benchmarks.
BENCHMARK_GROUPS: dict[str, tuple[str, ...]] = {"truthfulqa": ("truthfulqa_mc1", "truthfulqa_mc2")}

Status = Literal["ok", "unavailable", "failed"]

TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


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
            data_files={"truthfulqa": self.truthfulqa_path, "ifeval": self.ifeval_path, "humaneval": self.humaneval_path},
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


# --- reading the local data files ---------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _read_json_rows(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from json.loads(stripped)
        return
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


def _split_answers(cell: str) -> list[str]:
    return [a.strip() for a in (cell or "").split(";") if a.strip()]


def load_truthfulqa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows {question, mc1_targets, mc2_targets} from the TruthfulQA CSV or the hub's MC layout in JSON."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.name.endswith((".csv", ".csv.gz")):
        with _open_text(path) as handle:
            for record in csv.DictReader(handle):
                best = (record.get("Best Answer") or "").strip()
                incorrect = _split_answers(record.get("Incorrect Answers", ""))
                correct = _split_answers(record.get("Correct Answers", ""))
                if best and best not in correct:
                    correct.insert(0, best)
                if not (record.get("Question") and best and incorrect):
                    continue
                rows.append(
                    {
                        "question": record["Question"].strip(),
                        "mc1_targets": {"choices": [best, *incorrect], "labels": [1] + [0] * len(incorrect)},
                        "mc2_targets": {
                            "choices": [*correct, *incorrect],
                            "labels": [1] * len(correct) + [0] * len(incorrect),
                        },
                    }
                )
    else:
        for record in _read_json_rows(path):
            rows.append(
                {
                    "question": record["question"],
                    "mc1_targets": {"choices": list(record["mc1_targets"]["choices"]), "labels": list(record["mc1_targets"]["labels"])},
                    "mc2_targets": {"choices": list(record["mc2_targets"]["choices"]), "labels": list(record["mc2_targets"]["labels"])},
                }
            )
    if not rows:
        raise ValueError(f"no TruthfulQA questions read from {path}")
    return rows


def load_ifeval(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows {key, prompt, instruction_id_list, kwargs_json} (kwargs as JSON: their types vary per row)."""
    rows = [
        {
            "key": int(r["key"]),
            "prompt": r["prompt"],
            "instruction_id_list": list(r["instruction_id_list"]),
            "kwargs_json": json.dumps(r.get("kwargs") or [{} for _ in r["instruction_id_list"]]),
        }
        for r in _read_json_rows(Path(path))
    ]
    if not rows:
        raise ValueError(f"no IFEval prompts read from {path}")
    return rows


def load_humaneval(path: str | os.PathLike) -> list[dict[str, Any]]:
    keys = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    rows = [{k: str(r.get(k, "")) for k in keys} for r in _read_json_rows(Path(path))]
    if not rows:
        raise ValueError(f"no HumanEval problems read from {path}")
    return rows


def _dataset_factory(rows_fn: Callable[[], list[dict[str, Any]]]) -> Callable[..., Any]:
    def build(**_: Any) -> Any:
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows_fn())})

    return build


# --- the sandbox for generated code ----------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: Literal["passed", "failed", "timeout"]
    detail: str = ""


def run_python_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` in a fresh `python -I -S` subprocess; passed means it exited 0 within the limits.

    The child gets an empty temporary working directory, a minimal environment, no stdin, its own
    process group (killed whole on timeout), and rlimits on address space, CPU time, file size and
    core dumps. This contains accidents and runaway code; it is not a security boundary against
    hostile code (no network or filesystem isolation beyond that): run untrusted models' code in a
    container.
    """
    with tempfile.TemporaryDirectory(prefix="tidpo-sandbox-") as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(program, encoding="utf-8")
        memory = int(memory_mb) * 1024 * 1024
        cpu = max(1, math.ceil(timeout_s)) + 1

        def limit() -> None:  # runs in the child between fork and exec
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(script)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limit if os.name == "posix" else None,  # noqa: PLW1509 - needed for the rlimits
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.communicate()
            return SandboxResult(False, "timeout", f"no result within {timeout_s} s")
    if process.returncode == 0:
        return SandboxResult(True, "passed")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] if stderr else []
    return SandboxResult(False, "failed", tail[0][:300] if tail else f"exit code {process.returncode}")


def humaneval_program(doc: Mapping[str, str], completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


# --- IFEval checkers -----------------------------------------------------------------------------------


def ifeval_dependencies() -> str | None:
    """None when lm-eval's IFEval checkers import, else why not."""
    missing = []
    for module in ("langdetect", "immutabledict", "nltk"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"IFEval's checkers need {', '.join(missing)} (pip install 'lm_eval[ifeval]')"
    return None


def _ifeval_registry() -> Any:
    """lm-eval's instruction registry, imported without its attempt to download nltk data."""
    import nltk

    original = nltk.download
    nltk.download = lambda *args, **kwargs: False  # offline: never fetch at import time
    try:
        # lm-eval prints "Downloaded punkt_tab" even when the download did not happen: keep that quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = original
    return instructions_registry


class IFEvalScorer:
    """lm-eval's strict and loose IFEval scoring, one instruction at a time.

    An instruction whose checker raises LookupError (nltk data such as punkt_tab that cannot be had
    offline) is recorded in `unavailable` with the reason and left out, instead of failing the prompt.
    """

    def __init__(self) -> None:
        self.registry = _ifeval_registry().INSTRUCTION_DICT
        self.unavailable: dict[str, str] = {}
        self.unchecked_instructions = 0
        self.prompts_excluded = 0

    def _checker(self, instruction_id: str, kwargs: Mapping[str, Any], prompt: str) -> Any:
        instruction = self.registry[instruction_id](instruction_id)
        instruction.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        args = instruction.get_instruction_args()
        if args and "prompt" in args:
            instruction.build_description(prompt=prompt)
        return instruction

    @staticmethod
    def _loose_variants(response: str) -> list[str]:
        lines = response.split("\n")
        first, last, both = "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()
        variants = [response, response.replace("*", ""), first, last, both]
        return variants + [first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]

    def score(self, doc: Mapping[str, Any], response: str) -> dict[str, Any]:
        ids = list(doc["instruction_id_list"])
        all_kwargs = json.loads(doc["kwargs_json"]) if "kwargs_json" in doc else list(doc["kwargs"])
        strict: list[bool] = []
        loose: list[bool] = []
        skipped = 0
        for instruction_id, kwargs in zip(ids, all_kwargs, strict=True):
            if instruction_id in self.unavailable:
                skipped += 1
                continue
            if instruction_id not in self.registry:
                self.unavailable[instruction_id] = "unknown instruction id for lm-eval's IFEval registry"
                skipped += 1
                continue
            checker = self._checker(instruction_id, kwargs or {}, doc["prompt"])
            try:
                strict_ok = bool(response.strip() and checker.check_following(response))
                loose_ok = any(r.strip() and checker.check_following(r) for r in self._loose_variants(response))
            except LookupError as exc:  # nltk data missing offline
                self.unavailable[instruction_id] = _lookup_reason(exc)
                skipped += 1
                continue
            strict.append(strict_ok)
            loose.append(loose_ok)
        self.unchecked_instructions += skipped
        if skipped:
            self.prompts_excluded += 1
        judged = skipped == 0 and bool(ids)
        return {
            "prompt_level_strict_acc": all(strict) if judged else None,
            "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose) if judged else None,
            "inst_level_loose_acc": loose,
        }


def _lookup_reason(exc: LookupError) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"Resource\s+(\S+)\s+not found", text)
    resource = match.group(1).strip("'\"") if match else "data"
    return f"checker needs nltk resource '{resource}', which is not installed and cannot be downloaded offline"


def _mean_judged(items: Sequence[bool | None]) -> float:
    judged = [float(i) for i in items if i is not None]
    return sum(judged) / len(judged) if judged else float("nan")


def _mean_flat(items: Sequence[Sequence[bool]]) -> float:
    flat = [float(i) for sub in items for i in sub]
    return sum(flat) / len(flat) if flat else float("nan")


# --- task configs -------------------------------------------------------------------------------------


def _truthfulqa_text(doc: Mapping[str, Any]) -> str:
    return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {doc['question']}\nA:"


def _mc2_results(doc: Mapping[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's process_results_mc2: the normalized probability mass of the true answers."""
    import numpy as np

    loglikelihoods = np.array([r[0] for r in results], dtype=np.float64)
    probs = np.exp(loglikelihoods - loglikelihoods.max())
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(probs[labels == 1].sum() / probs.sum())}


def _task_config(task: str, path: str, options: BenchmarkOptions, state: dict[str, Any]) -> dict[str, Any]:
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        target = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
        config: dict[str, Any] = {
            "task": task,
            "custom_dataset": _dataset_factory(lambda: load_truthfulqa(path)),
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": _truthfulqa_text,
            "doc_to_target": 0,
            "doc_to_choice": lambda doc: list(doc[target]["choices"]),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "num_fewshot": 0,
            "metadata": {"version": 2.0},
        }
        if task == "truthfulqa_mc2":
            config["process_results"] = _mc2_results
        return config
    if task == "ifeval":
        scorer = IFEvalScorer()
        state["ifeval"] = scorer
        return {
            "task": "ifeval",
            "custom_dataset": _dataset_factory(lambda: load_ifeval(path)),
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": lambda doc: doc["prompt"],
            "doc_to_target": 0,
            "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": options.max_gen_toks},
            "process_results": lambda doc, results: scorer.score(doc, results[0]),
            "metric_list": [
                {"metric": "prompt_level_strict_acc", "aggregation": _mean_judged, "higher_is_better": True},
                {"metric": "inst_level_strict_acc", "aggregation": _mean_flat, "higher_is_better": True},
                {"metric": "prompt_level_loose_acc", "aggregation": _mean_judged, "higher_is_better": True},
                {"metric": "inst_level_loose_acc", "aggregation": _mean_flat, "higher_is_better": True},
            ],
            "num_fewshot": 0,
            "metadata": {"version": 4.0},
        }
    if task == "humaneval":
        outcomes: dict[str, int] = {"passed": 0, "failed": 0, "timeout": 0}
        state["humaneval"] = outcomes

        def process(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
            result = run_python_sandboxed(humaneval_program(doc, results[0]), options.code_timeout_s, options.code_memory_mb)
            outcomes[result.status] += 1
            return {"pass_at_1": float(result.passed)}

        return {
            "task": "humaneval",
            "custom_dataset": _dataset_factory(lambda: load_humaneval(path)),
            "test_split": "test",
            "unsafe_code": True,
            "output_type": "generate_until",
            "doc_to_text": lambda doc: doc["prompt"],
            "doc_to_target": lambda doc: f"{doc['test']}\ncheck({doc['entry_point']})",
            "generation_kwargs": {"until": list(HUMANEVAL_STOP), "do_sample": False, "max_gen_toks": options.max_gen_toks},
            "process_results": process,
            "metric_list": [{"metric": "pass_at_1", "aggregation": "mean", "higher_is_better": True}],
            "num_fewshot": 0,
            "repeats": 1,
            "metadata": {"version": 1.0},
        }
    raise KeyError(task)


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


def _scores(task: str, raw: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    def get(metric: str) -> float:
        value = raw.get(f"{metric},none", float("nan"))
        return float(value) if isinstance(value, int | float) else float("nan")

    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return {task: get("acc")}, {}
    if task == "ifeval":
        scorer: IFEvalScorer = state["ifeval"]
        metrics = {
            "ifeval_prompt_strict": get("prompt_level_strict_acc"),
            "ifeval_inst_strict": get("inst_level_strict_acc"),
            "ifeval_prompt_loose": get("prompt_level_loose_acc"),
            "ifeval_inst_loose": get("inst_level_loose_acc"),
            "ifeval_unchecked_instructions": float(scorer.unchecked_instructions),
        }
        details = {
            "unavailable_checks": dict(scorer.unavailable),
            "unchecked_instructions": scorer.unchecked_instructions,
            "prompts_excluded_from_prompt_level": scorer.prompts_excluded,
        }
        return metrics, details
    if task == "humaneval":
        return {"humaneval_pass_at_1": get("pass_at_1")}, {"outcomes": dict(state["humaneval"])}
    raise KeyError(task)


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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


def _run_tasks(lm: Any, runnable: Sequence[str], by_task: Mapping[str, BenchmarkResult], options: BenchmarkOptions) -> None:
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
                    tasks=[_task_config(task, path, options, state)],
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
            result.metrics, result.details = _scores(task, raw, state)
            result.documents = int((output or {}).get("n-samples", {}).get(task, {}).get("effective", 0))
        except Exception as exc:  # one broken task must not hide the others' scores
            logger.exception("benchmark %s failed", task)
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
        result.seconds = time.perf_counter() - started
