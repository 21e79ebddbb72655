"""The lm-eval benchmark adapters on a handful of local examples, the code sandbox, and the reasons
given for tasks that cannot run."""

import gzip
import json
import math
from pathlib import Path

import pytest

from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.evaluation.benchmark_files import data_file, load_humaneval, load_ifeval, load_truthfulqa
from tidpo_core.evaluation.benchmark_runner import run_benchmarks
from tidpo_core.evaluation.benchmark_tasks import humaneval_program
from tidpo_core.evaluation.benchmarks import BenchmarkOptions, benchmark_metrics, expand_benchmarks
from tidpo_core.evaluation.ifeval import IFEvalScorer, ifeval_dependencies
from tidpo_core.evaluation.sandbox import run_python_sandboxed
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    train_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SENTENCE_CHECK = "length_constraints:number_sentences"


@pytest.fixture(scope="module")
def data() -> Path:
    if not (SHARED_DATA / "TruthfulQA.csv").exists():
        pytest.skip(f"benchmark test data not found in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    pairs = generate_synthetic_pairs(20)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=400)
    config = TinyModelConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return save_model_and_tokenizer(
        build_tiny_model(tokenizer, config), tokenizer, tmp_path_factory.mktemp("tiny")
    )


def test_loaders_read_the_local_files(data):
    truthfulqa = load_truthfulqa(data / "TruthfulQA.csv")
    assert len(truthfulqa) > 800
    first = truthfulqa[0]
    assert first["mc1_targets"]["labels"][0] == 1 and sum(first["mc1_targets"]["labels"]) == 1
    assert first["mc1_targets"]["choices"][0] in first["mc2_targets"]["choices"]
    assert len(first["mc2_targets"]["choices"]) == len(first["mc2_targets"]["labels"])
    ifeval = load_ifeval(data / "ifeval_input_data.jsonl")
    assert len(ifeval) == 540 and all(
        len(json.loads(r["kwargs_json"])) == len(r["instruction_id_list"]) for r in ifeval
    )
    humaneval = load_humaneval(data / "HumanEval.jsonl.gz")
    assert len(humaneval) == 164 and humaneval[0]["entry_point"]


def test_sandbox_passes_canonical_solutions_and_contains_bad_code(data):
    problems = load_humaneval(data / "HumanEval.jsonl.gz")[:3]
    for problem in problems:
        result = run_python_sandboxed(humaneval_program(problem, problem["canonical_solution"]), timeout_s=20)
        assert result.passed, (problem["task_id"], result)
    wrong = run_python_sandboxed(humaneval_program(problems[0], "    return None\n"))
    assert not wrong.passed and wrong.status == "failed"
    loop = run_python_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    assert loop.status == "timeout"
    hog = run_python_sandboxed("x = bytearray(4 * 1024 ** 3)\n", memory_mb=256)
    assert hog.status == "failed" and "MemoryError" in hog.detail


def test_ifeval_checks_that_need_missing_nltk_data_are_reported(data):
    assert ifeval_dependencies() is None  # the eval extra (lm_eval[ifeval]) is part of make test's install
    rows = [
        r for r in load_ifeval(data / "ifeval_input_data.jsonl") if SENTENCE_CHECK in r["instruction_id_list"]
    ][:2]
    scorer = IFEvalScorer()
    response = "First sentence here. Second one here. And a third."
    outputs = [scorer.score(r, response) for r in rows]
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
        punkt_present = True
    except LookupError:
        punkt_present = False
    if punkt_present:
        assert SENTENCE_CHECK not in scorer.unavailable
    else:
        assert (
            "punkt" in scorer.unavailable[SENTENCE_CHECK] and "offline" in scorer.unavailable[SENTENCE_CHECK]
        )
        assert all(o["prompt_level_strict_acc"] is None for o in outputs)
        assert scorer.prompts_excluded == len(rows)


def test_benchmarks_run_on_a_tiny_model_and_score_in_range(data, tiny_model_dir, tmp_path):
    # A small TruthfulQA file in the hub's multiple_choice JSON layout exercises the second reader too.
    mc = tmp_path / "truthfulqa_mc.jsonl.gz"
    with gzip.open(mc, "wt") as handle:
        for row in load_truthfulqa(data / "TruthfulQA.csv")[:2]:
            handle.write(json.dumps(row) + "\n")
    options = BenchmarkOptions(
        data_files={
            "truthfulqa": str(mc),
            "ifeval": str(data / "ifeval_input_data.jsonl"),
            "humaneval": str(data / "HumanEval.jsonl.gz"),
        },
        limit=2,
        max_gen_toks=8,
        allow_code_execution=True,
        code_timeout_s=5,
    )
    results = {
        r.task: r for r in run_benchmarks(tiny_model_dir, ["truthfulqa", "ifeval", "humaneval"], options)
    }
    assert list(results) == ["truthfulqa_mc1", "truthfulqa_mc2", "ifeval", "humaneval"]
    for result in results.values():
        if result.task == "ifeval" and ifeval_dependencies():
            assert result.status == "unavailable" and result.reason
            continue
        assert result.status == "ok", (result.task, result.reason)
        assert result.documents == 2
        for name, value in result.metrics.items():
            if name.endswith("unchecked_instructions"):
                continue
            assert math.isnan(value) or 0.0 <= value <= 1.0, (name, value)
    assert set(results["humaneval"].details["outcomes"]) == {"passed", "failed", "timeout"}
    flat = benchmark_metrics(list(results.values()))
    assert {"truthfulqa_mc1", "truthfulqa_mc2", "humaneval_pass_at_1"} <= set(flat)


def test_tasks_that_cannot_run_are_reported_with_the_reason(data, tiny_model_dir, tmp_path):
    assert expand_benchmarks(["TruthfulQA", "ifeval", "truthfulqa_mc1"]) == [
        "truthfulqa_mc1",
        "truthfulqa_mc2",
        "ifeval",
    ]
    options = BenchmarkOptions(
        data_files={
            "truthfulqa": str(tmp_path / "missing.csv"),
            "humaneval": str(data / "HumanEval.jsonl.gz"),
        },
        allow_code_execution=False,
    )
    results = {
        r.task: r
        for r in run_benchmarks(tiny_model_dir, ["truthfulqa_mc1", "ifeval", "humaneval", "mmlu"], options)
    }
    assert all(r.status == "unavailable" for r in results.values())
    assert "not found" in results["truthfulqa_mc1"].reason
    assert "no data file configured" in results["ifeval"].reason
    assert "allow_code_execution" in results["humaneval"].reason
    assert "no offline adapter" in results["mmlu"].reason
    assert benchmark_metrics(list(results.values())) == {}


def test_builtin_samples_run_offline_with_every_ifeval_check_available(tiny_model_dir, data):
    # The embedded default's benchmarks: files inside the package, nothing from ../shared or the hub.
    for key in ("truthfulqa", "ifeval"):
        path = Path(data_file(key, "builtin"))
        assert path.is_file() and "tidpo_core" in path.parts
    assert len(load_truthfulqa(data_file("truthfulqa", "builtin"))) == 16
    sample = load_ifeval(data_file("ifeval", "builtin"))
    full = {row["key"]: row for row in load_ifeval(data / "ifeval_input_data.jsonl")}
    assert len(sample) == 16 and all(full[row["key"]] == row for row in sample)  # verbatim copies
    options = BenchmarkOptions(
        data_files={"truthfulqa": "builtin", "ifeval": "builtin", "humaneval": "builtin"},
        limit=3,
        max_gen_toks=8,
    )
    results = {
        r.task: r for r in run_benchmarks(tiny_model_dir, ["truthfulqa", "ifeval", "humaneval"], options)
    }
    for task in ("truthfulqa_mc1", "truthfulqa_mc2", "ifeval"):
        assert results[task].status == "ok" and results[task].documents == 3, (task, results[task].reason)
    assert results["ifeval"].metrics["ifeval_unchecked_instructions"] == 0
    assert (
        results["humaneval"].status == "unavailable" and "no built-in sample" in results["humaneval"].reason
    )
