"""Each engine option is declared once, in tidpo_core, and reachable from the Launchpad."""

import dataclasses
from dataclasses import dataclass

import dagster as dg
import pytest

from tidpo_core.evaluation.benchmarks import BenchmarkSelection
from tidpo_core.models.generation import SamplingSettings
from tidpo_core.models.modeling import TinyModelConfig
from tidpo_core.runtime.precompute import PrecomputeSettings
from tidpo_core.steps.anchors import AnchorBackend
from tidpo_core.steps.policy import SET_BY_THE_RUN
from tidpo_core.steps.weights import WeighingSettings
from tidpo_core.training import TrainConfig
from tidpo_pipeline.assets.anchors import AnchorConfig
from tidpo_pipeline.assets.compare import MethodComparisonConfig
from tidpo_pipeline.assets.evaluate import EvaluationConfig
from tidpo_pipeline.assets.policy import PolicyConfig
from tidpo_pipeline.assets.reference import ReferenceModelConfig
from tidpo_pipeline.assets.reward import RewardModelConfig
from tidpo_pipeline.assets.weights import TokenWeightsConfig
from tidpo_pipeline.config_from_core import DocumentedConfig, attribute_docs, config_class, core_fields


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _launchpad_fields(config_class_: type) -> dict:
    """The fields of the config schema Dagster builds for an asset taking this config (what the Launchpad shows)."""

    @dg.asset(name="probe")
    def probe(config: config_class_):  # type: ignore[valid-type]
        return None

    return probe.op.config_schema.config_type.fields


def test_every_engine_option_is_a_policy_setting_with_the_engine_s_default():
    for f in dataclasses.fields(TrainConfig):
        if f.name in SET_BY_THE_RUN:
            continue
        assert f.name in PolicyConfig.model_fields, f"TrainConfig.{f.name} cannot be set from Dagster"
        assert PolicyConfig.model_fields[f.name].get_default(call_default_factory=True) == _default(f), f.name


def test_options_once_missing_from_dagster_are_settable_now():
    config = PolicyConfig(simpo_beta=3.0, simpo_gamma=0.2, weight_decay=0.01, model_dtype="bfloat16")
    assert (config.simpo_beta, config.simpo_gamma, config.weight_decay, config.model_dtype) == (
        3.0,
        0.2,
        0.01,
        "bfloat16",
    )


def test_the_fields_the_asset_sets_are_engine_fields():
    # A rename in TrainConfig must not leave a stale name here (the field would silently become settable).
    assert set(SET_BY_THE_RUN) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_fault_hooks_are_not_training_options():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not {n for n in names if n.startswith("inject_")}
    assert not {n for n in PolicyConfig.model_fields if "inject" in n}


def test_the_engine_s_docstrings_are_the_launchpad_s_descriptions():
    fields = _launchpad_fields(PolicyConfig)
    assert "SeqKL" in fields["reference_kl"].description
    assert "champion" in fields["init_from"].description  # the asset's own setting, documented on its class
    assert fields["beta"].default_value == 0.1


def test_comparison_shares_every_engine_option_but_keeps_its_short_run_defaults():
    for f in dataclasses.fields(TrainConfig):
        if f.name in (*SET_BY_THE_RUN, "loss_type", "seed", "checkpoint_every", "keep_checkpoints"):
            continue
        assert f.name in MethodComparisonConfig.model_fields, f.name
    config = MethodComparisonConfig()
    # The learning rate is left empty: the optimizer recipe fills it (5e-4 on the embedded model, the paper's
    # 5e-6 on a pretrained one; tests/test_chat.py checks both).
    assert (config.max_steps, config.warmup_steps, config.learning_rate, config.optimizer_recipe) == (
        100,
        4,
        None,
        "auto",
    )


def test_sampling_and_model_shape_come_from_their_dataclasses():
    sharding = {f.name for f in dataclasses.fields(PrecomputeSettings)}
    backend = {f.name for f in dataclasses.fields(AnchorBackend)}
    assert (
        set(AnchorConfig.model_fields)
        == {f.name for f in dataclasses.fields(SamplingSettings)} | backend | sharding
    )
    assert AnchorConfig().generation_backend == "transformers"
    assert AnchorConfig().batch_size == 32 and AnchorConfig().top_p == SamplingSettings().top_p
    assert (
        set(TokenWeightsConfig.model_fields)
        == {f.name for f in dataclasses.fields(WeighingSettings)} | sharding
    )
    assert (
        AnchorConfig().launcher == TokenWeightsConfig().launcher == "in_process"
    )  # make run stays in one process
    assert {f.name for f in dataclasses.fields(TinyModelConfig)} <= set(ReferenceModelConfig.model_fields)


def test_benchmark_settings_come_from_one_dataclass_and_build_the_core_options():
    names = {f.name for f in dataclasses.fields(BenchmarkSelection)}
    assert names <= set(EvaluationConfig.model_fields) and names <= set(MethodComparisonConfig.model_fields)
    config = EvaluationConfig(
        benchmark_limit=3, ifeval_path="/data/ifeval.jsonl", benchmark_max_gen_tokens=64
    )
    options = config.benchmark_options()
    assert (
        options
        == BenchmarkSelection(
            benchmark_limit=3, ifeval_path="/data/ifeval.jsonl", benchmark_max_gen_tokens=64
        ).options()
    )
    assert (options.limit, options.data_files["ifeval"], options.max_gen_toks) == (
        3,
        "/data/ifeval.jsonl",
        64,
    )
    # The comparison runs many models: no benchmark unless asked.
    assert (
        EvaluationConfig().benchmarks == ["truthfulqa", "ifeval"]
        and MethodComparisonConfig().benchmarks == []
    )


def test_the_reward_model_config_is_its_settings_dataclass_with_the_recipe_s_docs():
    from tidpo_core.models.reward import RewardTraining
    from tidpo_core.steps.reward import RewardModelSettings

    for f in dataclasses.fields(RewardModelSettings):
        assert RewardModelConfig.model_fields[f.name].get_default() == _default(f), f.name
    assert set(RewardModelConfig.model_fields) == {f.name for f in dataclasses.fields(RewardModelSettings)}
    assert {f.name for f in dataclasses.fields(RewardTraining)} < set(RewardModelConfig.model_fields)
    fields = _launchpad_fields(RewardModelConfig)
    # Documented where they are declared: the training fields in RewardTraining, the check's in the settings.
    assert "num_train_epochs" in fields["epochs"].description
    assert "reward_model_beats_chance" in fields["min_accuracy_margin"].description
    assert fields["min_accuracy_margin"].default_value == 0.1


@dataclass
class _Example:
    size: int = 3
    """How big."""
    # a comment is not a docstring
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])
    plain: float = 1.0


def test_attribute_docs_reads_the_string_under_each_field_only():
    assert attribute_docs(_Example) == {"size": "How big."}


@dataclass
class _Extended(_Example):
    plain: float = 2.0
    """Now documented."""
    extra: int = 0


def test_attribute_docs_of_a_subclass_include_its_bases_docs():
    assert attribute_docs(_Extended) == {"size": "How big.", "plain": "Now documented."}


def test_core_fields_keeps_defaults_and_factories_and_refuses_unknown_names():
    fields = core_fields(_Example, defaults={"plain": 2.0})
    made = config_class("Made", "doc", DocumentedConfig, fields)
    assert made().size == 3 and made().names == ["a"] and made().plain == 2.0
    assert made(names=["b"]).names == ["b"] and made().names == ["a"]  # no shared mutable default
    with pytest.raises(ValueError, match="no field"):
        core_fields(_Example, exclude=("sizes",))


def test_a_name_declared_twice_is_refused():
    class Own(DocumentedConfig):
        size: int = 1

    with pytest.raises(ValueError, match="declared by both"):
        config_class("Twice", "doc", Own, core_fields(_Example))


def test_the_quality_rules_resource_declares_the_gate_once():
    from tidpo_core.steps.evaluate import GateRule
    from tidpo_pipeline.resources import QualityRules

    for f in dataclasses.fields(GateRule):
        assert QualityRules.model_fields[f.name].get_default() == f.default, f.name
    assert QualityRules(gate_margin=0.5).gate_margin == 0.5 and QualityRules().max_quarantine_share == 0.2
