"""Configuration of the lm-eval benchmarks, shared by the evaluation asset and the method comparison."""

from pydantic import Field

from tidpo_core.benchmarks import BUILTIN, BenchmarkOptions
from tidpo_pipeline.config_from_core import DocumentedConfig


class BenchmarkConfig(DocumentedConfig):
    benchmarks: list[str] = Field(default_factory=lambda: ["truthfulqa", "ifeval"])
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
    code_memory_mb: int = 1024
    benchmark_max_gen_tokens: int = 256
    benchmark_batch_size: int = 8

    def benchmark_options(self) -> BenchmarkOptions:
        return BenchmarkOptions(
            data_files={"truthfulqa": self.truthfulqa_path, "ifeval": self.ifeval_path, "humaneval": self.humaneval_path},
            limit=self.benchmark_limit,
            allow_code_execution=self.allow_code_execution,
            code_timeout_s=self.code_timeout_s,
            code_memory_mb=self.code_memory_mb,
            max_gen_toks=self.benchmark_max_gen_tokens,
            batch_size=self.benchmark_batch_size,
        )
