"""The inline lm-eval task configs of TruthfulQA MC1/MC2, IFEval and HumanEval (each reading a local
file through `custom_dataset`), and the scores read back from lm-eval's results."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tidpo_core.evaluation.benchmark_files import load_humaneval, load_ifeval, load_truthfulqa
from tidpo_core.evaluation.benchmarks import BenchmarkOptions
from tidpo_core.evaluation.ifeval import IFEvalScorer
from tidpo_core.evaluation.sandbox import run_python_sandboxed

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


def _dataset_factory(rows_fn: Callable[[], list[dict[str, Any]]]) -> Callable[..., Any]:
    def build(**_: Any) -> Any:
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows_fn())})

    return build


def humaneval_program(doc: Mapping[str, str], completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def _mean_judged(items: Sequence[bool | None]) -> float:
    judged = [float(i) for i in items if i is not None]
    return sum(judged) / len(judged) if judged else float("nan")


def _mean_flat(items: Sequence[Sequence[bool]]) -> float:
    flat = [float(i) for sub in items for i in sub]
    return sum(flat) / len(flat) if flat else float("nan")


def _truthfulqa_text(doc: Mapping[str, Any]) -> str:
    return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {doc['question']}\nA:"


def _mc2_results(doc: Mapping[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's process_results_mc2: the normalized probability mass of the true answers."""
    import numpy as np

    loglikelihoods = np.array([r[0] for r in results], dtype=np.float64)
    probs = np.exp(loglikelihoods - loglikelihoods.max())
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(probs[labels == 1].sum() / probs.sum())}


def task_config(task: str, path: str, options: BenchmarkOptions, state: dict[str, Any]) -> dict[str, Any]:
    """The inline lm-eval config of `task` reading `path`; what its scoring collects goes into `state`."""
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return _truthfulqa_config(task, path)
    if task == "ifeval":
        return _ifeval_config(path, options, state)
    if task == "humaneval":
        return _humaneval_config(path, options, state)
    raise KeyError(task)


def _truthfulqa_config(task: str, path: str) -> dict[str, Any]:
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


def _ifeval_config(path: str, options: BenchmarkOptions, state: dict[str, Any]) -> dict[str, Any]:
    scorer = IFEvalScorer()
    state["ifeval"] = scorer
    return {
        "task": "ifeval",
        "custom_dataset": _dataset_factory(lambda: load_ifeval(path)),
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": lambda doc: doc["prompt"],
        "doc_to_target": 0,
        "generation_kwargs": {
            "until": [],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": options.max_gen_toks,
        },
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


def _humaneval_config(path: str, options: BenchmarkOptions, state: dict[str, Any]) -> dict[str, Any]:
    outcomes: dict[str, int] = {"passed": 0, "failed": 0, "timeout": 0}
    state["humaneval"] = outcomes

    def process(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
        result = run_python_sandboxed(
            humaneval_program(doc, results[0]), options.code_timeout_s, options.code_memory_mb
        )
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
        "generation_kwargs": {
            "until": list(HUMANEVAL_STOP),
            "do_sample": False,
            "max_gen_toks": options.max_gen_toks,
        },
        "process_results": process,
        "metric_list": [{"metric": "pass_at_1", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "repeats": 1,
        "metadata": {"version": 1.0},
    }


def task_scores(
    task: str, raw: Mapping[str, Any], state: Mapping[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """(tidpo's metric names -> scores, details) of one task from lm-eval's results and its config's `state`."""

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
