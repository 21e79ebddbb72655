"""The GRPO baseline's reward model: the Bradley-Terry loss by hand, a tiny reward model trained with TRL's
RewardTrainer on the built-in data that beats chance by far on held-out pairs, the scorer other code uses,
DuckDB's record, MLflow's run and the `tidpo-reward` registry round trip, reuse of a model already built."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tidpo_core import store
from tidpo_core.data.pairs import LoadResult
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.models.reward import (
    RewardTraining,
    bradley_terry_loss,
    load_reward_function,
    pair_accuracy,
    train_reward_model,
    training_subset,
)
from tidpo_core.runtime import tracking
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.fingerprint import model_fingerprint
from tidpo_core.runtime.layout import DataDir
from tidpo_core.steps import RunTracking, database_at
from tidpo_core.steps.reference import ReferenceHandle
from tidpo_core.steps.reward import (
    RewardModelSettings,
    beats_chance,
    reward_fingerprint,
    train_reward,
    with_stored_reward_model,
)

# A backbone small enough for seconds on one CPU thread, big enough to generalise to held-out pairs
# (hidden 32 overfits 230 pairs: about 0.85 held out); no SFT: the head and backbone learn from scratch.
BACKBONE = TinyModelConfig(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)
SETTINGS = RewardModelSettings(
    epochs=3, learning_rate=3e-3, batch_size=8, max_train_pairs=None, logging_steps=10
)
PAIRS = 300  # 230 train / 70 eval at eval_fraction 0.25


# --- the pure helpers ------------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computed_values():
    chosen = torch.tensor([1.0, 0.0, -2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -3:
    by_hand = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(3))) / 3
    assert by_hand == pytest.approx((0.3132617 + 0.6931472 + 3.0485874) / 3, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(by_hand, abs=1e-6)
    # Only the difference counts, and a pair ranked right by a wide margin costs almost nothing.
    assert bradley_terry_loss(chosen + 5, rejected + 5).item() == pytest.approx(by_hand, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([20.0]), torch.tensor([0.0])).item() == pytest.approx(
        0.0, abs=1e-8
    )
    # Its gradient pushes the chosen reward up by (1 - sigmoid(d)) / n.
    chosen.requires_grad_(True)
    bradley_terry_loss(chosen, rejected).backward()
    expected = [-(1 - 1 / (1 + math.exp(-d))) / 3 for d in (1.0, 0.0, -3.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_pair_accuracy_counts_a_tie_as_half():
    assert pair_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 0.0]) == pytest.approx(2.5 / 4)
    assert pair_accuracy([0.3] * 5, [0.3] * 5) == 0.5  # a constant reward is chance
    assert math.isnan(pair_accuracy([], []))


def test_beats_chance_needs_more_than_the_margin():
    assert beats_chance(0.61, 0.1) and not beats_chance(0.6, 0.1) and not beats_chance(float("nan"), 0.1)


def test_the_training_sample_is_seeded_capped_and_in_order():
    pairs = generate_synthetic_pairs(20, seed=1)
    sample = training_subset(pairs, 8, seed=0)
    assert len(sample) == 8 and sample == training_subset(pairs, 8, seed=0) != training_subset(
        pairs, 8, seed=1
    )
    assert [pairs.index(p) for p in sample] == sorted(pairs.index(p) for p in sample)
    assert training_subset(pairs, None, seed=0) == pairs and training_subset(pairs, 50, seed=0) == pairs


def test_the_reward_settings_extend_the_training_recipe():
    assert SETTINGS.training() == RewardTraining(
        epochs=3, learning_rate=3e-3, batch_size=8, max_train_pairs=None, logging_steps=10
    )
    assert RewardModelSettings().min_accuracy_margin == 0.1


# --- a trained reward model --------------------------------------------------------------------------------


def _reference(root: Path, train_pairs: list) -> ReferenceHandle:
    tokenizer = train_tokenizer(
        [t for p in train_pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=BACKBONE.vocab_size
    )
    path = save_model_and_tokenizer(
        build_tiny_model(tokenizer, BACKBONE, seed=0), tokenizer, root / "reference"
    )
    return ReferenceHandle(path=str(path), fingerprint=model_fingerprint(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    layout = DataDir.at(root)
    open_db = database_at(layout.database)
    with open_db() as con:
        store.replace_pairs(
            con, LoadResult(generate_synthetic_pairs(PAIRS, seed=0), [], PAIRS), eval_fraction=0.25
        )
        train_pairs, digest = store.read_pairs(con, split="train"), store.pairs_digest(con)
    reference = _reference(root, train_pairs)
    uri = layout.tracking_uri
    run_tracking = RunTracking(
        uri, tracking.ensure_experiment(uri, layout.artifacts.as_uri()), {"dagster.asset_key": "reward_model"}
    )
    handle = train_reward(
        open_db, reference, SETTINGS, layout, digest, tracking_to=run_tracking, progress=False
    )
    return layout, open_db, reference, run_tracking, digest, handle


def test_a_trained_reward_model_beats_chance_on_held_out_pairs(trained):
    layout, open_db, _, _, _, handle = trained
    with open_db() as con:
        eval_pairs = store.pair_count(con, "eval")
        record = store.reward_model_record(con, handle.fingerprint)
    assert handle.eval_pairs == eval_pairs > 50 and handle.train_pairs == PAIRS - eval_pairs
    assert handle.held_out_accuracy > 0.9, handle.metrics
    assert handle.metrics["eval_loss"] < math.log(2) and handle.metrics["eval_margin"] > 0
    # The training metrics carry TRL's names.
    assert {"loss", "accuracy", "margin", "mean_reward", "grad_norm", "learning_rate", "train_loss"} <= set(
        handle.metrics
    )
    assert Path(handle.path) == layout.reward_model(handle.fingerprint) and not handle.reused
    assert (
        record is not None and record.accuracy == handle.held_out_accuracy and record.eval_pairs == eval_pairs
    )
    assert (
        (record.mlflow_run_id, record.registered_version)
        == (handle.mlflow_run_id, handle.registered_version)
        == (handle.mlflow_run_id, "1")
    )
    assert record.settings["min_accuracy_margin"] == 0.1


def test_grpo_without_a_folder_gets_the_stored_reward_model_of_its_reference(trained, tmp_path):
    """tidpo_policy and method_comparison with grpo_reward: model and no grpo_reward_model train on the reward_model
    asset's newest model for their reference; another reference has none, which is a user error."""
    _, open_db, reference, _, _, handle = trained
    assert with_stored_reward_model(open_db, reference, {"grpo_reward": "model", "beta": 0.1}) == {
        "grpo_reward": "model",
        "beta": 0.1,
        "grpo_reward_model": handle.path,
    }
    assert (
        with_stored_reward_model(open_db, reference, {"grpo_reward": "model", "grpo_reward_model": "/mine"})[
            "grpo_reward_model"
        ]
        == "/mine"
    )
    assert with_stored_reward_model(open_db, reference, {"grpo_reward": "phrases"}) == {
        "grpo_reward": "phrases"
    }
    other = ReferenceHandle(path=str(tmp_path), fingerprint="another-reference")
    with pytest.raises(UserInputError, match="materialize the reward_model asset first"):
        with_stored_reward_model(open_db, other, {"grpo_reward": "model"})


def test_the_reward_function_scores_chosen_above_rejected(trained):
    _, open_db, _, _, _, handle = trained
    with open_db() as con:
        pairs = store.read_pairs(con, split="eval")
    reward = load_reward_function(handle.path)
    prompts = [p.prompt for p in pairs]
    chosen, rejected = (
        reward(prompts, [p.chosen for p in pairs]),
        reward(prompts, [p.rejected for p in pairs]),
    )
    assert len(chosen) == len(pairs) and all(isinstance(r, float) for r in chosen)
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) > 0.9
    # Batching and padding change nothing: one at a time scores the same.
    one_by_one = load_reward_function(handle.path, batch_size=1)
    assert one_by_one(prompts[:5], [p.chosen for p in pairs[:5]]) == pytest.approx(chosen[:5], abs=1e-5)
    assert reward([], []) == []
    assert len(reward(prompts[:1], [""])) == 1  # an empty completion is scored too (eos only)
    with pytest.raises(ValueError, match="prompts"):
        reward(prompts[:2], [pairs[0].chosen])


def test_mlflow_run_and_the_registry_round_trip(trained, tmp_path):
    layout, _, _, _, _, handle = trained
    uri = layout.tracking_uri
    run = tracking.client(uri).get_run(handle.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dagster.asset_key"] == "reward_model"
    assert {"loss", "accuracy", "margin", "eval_accuracy", "eval_margin", "eval_loss"} <= set(
        run.data.metrics
    )
    assert run.data.metrics["eval_accuracy"] == pytest.approx(handle.held_out_accuracy)
    assert run.data.params["learning_rate"] == "0.003" and [
        d.dataset.name for d in run.inputs.dataset_inputs
    ] == ["preference_pairs/train"]
    assert len(tracking.metric_history(uri, handle.mlflow_run_id, "loss")) >= 2  # the curve, not one point
    # Look the latest version up, fetch it, load it: it scores as the folder it was made from.
    assert tracking.latest_version(uri, tracking.REWARD_MODEL) == handle.registered_version == "1"
    version = tracking.client(uri).get_model_version(tracking.REWARD_MODEL, "1")
    assert version.run_id == handle.mlflow_run_id and float(
        version.tags["held_out_accuracy"]
    ) == pytest.approx(handle.held_out_accuracy, abs=1e-4)
    fetched = tracking.download_model_version(uri, tmp_path / "fetched")
    prompts, completions = (
        ["\n\nHuman: My father has chest pain.\n\nAssistant:"] * 2,
        [" Call an ambulance now.", " Wait and see."],
    )
    assert load_reward_function(fetched)(prompts, completions) == pytest.approx(
        load_reward_function(handle.path)(prompts, completions), abs=1e-6
    )
    with pytest.raises(LookupError):
        tracking.download_model_version(uri, tmp_path / "none", name="no-such-model")


def test_the_same_inputs_reuse_the_model_its_run_and_its_version(trained):
    layout, open_db, reference, run_tracking, digest, handle = trained
    again = train_reward(
        open_db, reference, SETTINGS, layout, digest, tracking_to=run_tracking, progress=False
    )
    assert again.reused and (again.fingerprint, again.path) == (handle.fingerprint, handle.path)
    assert (again.mlflow_run_id, again.registered_version, again.held_out_accuracy) == (
        handle.mlflow_run_id,
        "1",
        handle.held_out_accuracy,
    )
    assert [str(v.version) for v in tracking.model_versions(layout.tracking_uri, tracking.REWARD_MODEL)] == [
        "1"
    ]
    with open_db() as con:
        assert con.execute("SELECT count(*) FROM reward_models").fetchone()[0] == 1
    # The check's margin is not part of the model; anything that shapes it is.
    assert (
        reward_fingerprint(digest, reference, dataclasses.replace(SETTINGS, min_accuracy_margin=0.3))
        == handle.fingerprint
    )
    assert reward_fingerprint(digest, reference, dataclasses.replace(SETTINGS, seed=1)) != handle.fingerprint
    assert reward_fingerprint("other-pairs", reference, SETTINGS) != handle.fingerprint


def test_training_is_deterministic_for_a_seed(trained, tmp_path):
    from safetensors.torch import load_file

    _, open_db, reference, *_ = trained
    with open_db() as con:
        pairs = store.read_pairs(con, split="train")
    from accelerate.state import PartialState

    recipe = RewardTraining(epochs=1, batch_size=8, max_train_pairs=16, logging_steps=1)
    had_accelerate_state = bool(PartialState._shared_state)
    first = train_reward_model(reference.path, pairs, tmp_path / "a", recipe)
    # TRL's Trainer leaves accelerate's process-wide state as it found it (the in-process engine sets its own).
    assert bool(PartialState._shared_state) == had_accelerate_state
    second = train_reward_model(reference.path, pairs, tmp_path / "b", recipe)
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert first.steps == second.steps == 2
    assert [{k: v for k, v in e.items() if k not in timing} for e in first.history] == [
        {k: v for k, v in e.items() if k not in timing} for e in second.history
    ]
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "score.weight" in a and a["score.weight"].shape[0] == 1  # one output: the reward
    assert not (tmp_path / "a.staging").exists() and not (tmp_path / "a" / "trainer").exists()


def test_a_run_interrupted_before_it_finished_is_resumed_and_registers_once(trained, monkeypatch):
    layout, open_db, reference, run_tracking, digest, handle = trained
    uri = layout.tracking_uri
    curve = tracking.metric_history(uri, handle.mlflow_run_id, "loss")
    # As if killed after registering, before the run was marked finished and the version recorded:
    tracking.client(uri).update_run(handle.mlflow_run_id, status="RUNNING")
    with open_db() as con:
        record = store.reward_model_record(con, handle.fingerprint)
        store.record_reward_model(con, dataclasses.replace(record, registered_version=None))

    def registry_down(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(tracking, "register_model_folder", registry_down)
    with pytest.raises(RuntimeError, match="registry down"):
        train_reward(open_db, reference, SETTINGS, layout, digest, tracking_to=run_tracking, progress=False)
    assert tracking.run_status(uri, handle.mlflow_run_id) == "FAILED"
    monkeypatch.undo()
    again = train_reward(
        open_db, reference, SETTINGS, layout, digest, tracking_to=run_tracking, progress=False
    )
    assert (again.mlflow_run_id, again.registered_version) == (handle.mlflow_run_id, "1")
    assert tracking.run_status(uri, handle.mlflow_run_id) == "FINISHED"
    assert [str(v.version) for v in tracking.model_versions(uri, tracking.REWARD_MODEL)] == ["1"]
    assert (
        tracking.metric_history(uri, handle.mlflow_run_id, "loss") == curve
    )  # the curve is not logged twice
    with open_db() as con:
        assert store.reward_model_record(con, handle.fingerprint).registered_version == "1"
