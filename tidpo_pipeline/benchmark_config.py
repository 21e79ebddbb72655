"""Configuration of the lm-eval benchmarks, shared by the evaluation asset and the method comparison:
derived from tidpo_core.evaluation.benchmarks.BenchmarkSelection, which declares each setting once."""

from tidpo_core.evaluation.benchmarks import BenchmarkOptions, BenchmarkSelection
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields


class _BenchmarkOptionsFromConfig(DocumentedConfig):
    def benchmark_options(self) -> BenchmarkOptions:
        values = {name: getattr(self, name) for name in BenchmarkSelection.__dataclass_fields__}
        return BenchmarkSelection(**values).options()


BenchmarkConfig = config_class(
    "BenchmarkConfig",
    "The lm-eval benchmarks a run scores.",
    _BenchmarkOptionsFromConfig,
    core_fields(BenchmarkSelection),
)
