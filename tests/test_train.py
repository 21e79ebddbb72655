"""The training engine (tidpo_core.training): resume after SIGKILL gives the uninterrupted run's weights,
the NaN guard stops with the step named and a checkpoint saved (also through Dagster Pipes), LoRA
trains only the adapter and uses the adapter-disabled base as the reference, TRL-named metrics reach
MLflow, and `weights_mode: online` reproduces the stored weights at step 0."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from train_fixtures import (
    build_tiny_data,
    load_weights,
    reset_accelerate,
    run_engine,
    single_thread,
    subprocess_env,
)

from tidpo_core import store
from tidpo_core.batching.features import TrainingCollator, stack_sides
from tidpo_core.models.modeling import load_model_and_tokenizer
from tidpo_core.runtime.faults import Faults, planted
from tidpo_core.training import (
    COMPLETE_MARKER,
    INTERRUPTED_EXIT_CODE,
    NonFiniteLossError,
    StopSignals,
    TrainConfig,
    adapter_disabled_reference,
    complete_checkpoints,
    load_training_features,
    online_weights,
    train,
)

TRL_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "triplet",
    "grad_norm",
    "learning_rate",
    "tokens_per_second",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 16 pairs, batch 4: 4 batches an epoch.
    with single_thread():
        return build_tiny_data(tmp_path_factory.mktemp("tiny_train"), pairs=16)


@pytest.fixture(autouse=True)
def isolated_run():
    with single_thread():
        yield
    reset_accelerate()


def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(tiny, tmp_path):
    # 2 epochs x 2 steps (accumulation 2 over 4 batches); checkpoints every step, keep 2; killed after step 3
    # (epoch 1, mid-epoch), so the re-run must restore model, optimizer, scheduler and the data position.
    common = {"num_epochs": 2, "gradient_accumulation_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2}
    uninterrupted = train(tiny.config(tmp_path / "a", **common))
    assert uninterrupted.steps == 4

    killed = tiny.config(tmp_path / "b", **common)
    with planted(kill_at_step=3):
        result = run_engine(killed.to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == -9, result.stderr[-2000:]
    steps = [s for s, _ in complete_checkpoints(tmp_path / "b" / "checkpoints")]
    assert steps == [2, 3]  # keep-last-2
    assert not (tmp_path / "b" / "final").exists()
    # A save interrupted by the crash (no marker) is never resumed from.
    (tmp_path / "b" / "checkpoints" / "step_9").mkdir()

    rerun = tiny.config(tmp_path / "b", **common)  # the same run, minus the crash
    result = run_engine(rerun.to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr and "step_3" in result.stderr
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 1
    assert summary["resumed_from"].endswith("step_3")
    assert not (tmp_path / "b" / "checkpoints" / "step_9").exists()

    expected, got = load_weights(tmp_path / "a" / "final"), load_weights(tmp_path / "b" / "final")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in uninterrupted.history]
    assert [h["learning_rate"] for h in summary["history"]] == [
        h["learning_rate"] for h in uninterrupted.history
    ]


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_resumes_exactly(tiny, tmp_path):
    # Preemption (SLURM, Kubernetes) and Dagster's Terminate send a signal with a grace period: the engine
    # finishes the optimizer step, checkpoints it, exits 143, and the re-run equals an uninterrupted run.
    common = {"num_epochs": 2, "gradient_accumulation_steps": 2, "checkpoint_every": 0}
    uninterrupted = train(tiny.config(tmp_path / "a", **common))
    stopped = tiny.config(tmp_path / "b", **common)
    with planted(sigterm_at_step=1):
        result = run_engine(stopped.to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == INTERRUPTED_EXIT_CODE == 143, result.stderr[-2000:]
    assert "stopped by SIGTERM after optimizer step 1 of 4" in result.stderr
    # checkpoint_every 0 takes no periodic checkpoints: this one is the signal's.
    assert [s for s, _ in complete_checkpoints(tmp_path / "b" / "checkpoints")] == [1]
    assert not (tmp_path / "b" / "final").exists()

    result = run_engine(tiny.config(tmp_path / "b", **common).to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 3
    expected, got = load_weights(tmp_path / "a" / "final"), load_weights(tmp_path / "b" / "final")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in uninterrupted.history]


def test_stop_signals_turn_a_signal_into_a_request_and_restore_the_handlers():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        signal.raise_signal(signal.SIGTERM)  # handled: the process lives on
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_planted_nan_stops_with_the_step_named_and_the_last_good_state_saved(tiny, tmp_path):
    config = tiny.config(tmp_path / "run", max_steps=4, checkpoint_every=0)
    with pytest.raises(NonFiniteLossError) as raised, planted(nan_at_step=3):
        train(config)
    message = str(raised.value)
    assert "optimizer step 3" in message and "pairs [" in message
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in checkpoints] == [2]
    assert str(checkpoints[0][1]) in message
    marker = json.loads((checkpoints[0][1] / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2 and len(marker["history"]) == 2
    assert not (tmp_path / "run" / "final").exists()
    # Without the fault, a re-run resumes from the saved state and finishes.
    resumed = train(tiny.config(tmp_path / "run", max_steps=4, checkpoint_every=0))
    assert resumed.steps == 4 and resumed.steps_this_run == 2 and resumed.resumed_from.endswith("step_2")


def test_nan_through_pipes_fails_the_asset_and_closes_the_session(tiny, tmp_path):
    import dagster as dg

    config_path = tiny.config(tmp_path / "run", max_steps=3).to_yaml(tmp_path / "run.yaml")

    @dg.asset
    def policy(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient):
        command = [sys.executable, "-m", "tidpo_core.training", "--config", str(config_path)]
        env = {**subprocess_env(), **Faults(nan_at_step=2).as_env()}
        return pipes.run(context=context, command=command, env=env).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [policy], resources={"pipes": dg.PipesSubprocessClient()}, instance=instance, raise_on_error=False
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    assert "failed with code 1" in (failure.cause.message if failure.cause else failure.message)
    logs = instance.all_logs(result.run_id)
    messages = [r.user_message or "" for r in logs]
    assert any("opened dagster pipes" in m for m in messages)
    closed = [r for r in logs if "pipes closed with exception" in (r.user_message or "")]
    assert len(closed) == 1, messages
    error = closed[0].dagster_event.engine_event_data.error
    assert "NonFiniteLossError" in error.cls_name or "non-finite loss" in error.message
    assert "optimizer step 2" in error.message
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")


def _lora_config(tiny, output_dir, **overrides):
    return tiny.config(
        output_dir, lora=True, lora_r=4, lora_alpha=8, max_steps=3, learning_rate=1e-2, **overrides
    )


def test_lora_trains_only_the_adapter_and_its_reference_is_the_base(tiny, tmp_path):
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(tiny.reference_path)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    summary = train(_lora_config(tiny, tmp_path / "adapter", merge_lora=False, checkpoint_every=2))
    assert 0 < summary.trainable_parameters < summary.total_parameters / 4
    # The checkpoint holds the full wrapped model: every base weight is untouched, the adapter has moved.
    ((_, ckpt),) = complete_checkpoints(tmp_path / "adapter" / "checkpoints")
    state = load_weights(ckpt)
    base_keys = [k for k in state if "lora_" not in k]
    assert base_keys and any("lora_B" in k for k in state)
    for key in base_keys:
        plain = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(state[key], base_state[plain]), key
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)

    # The final folder is the adapter; with it disabled the model is exactly the base (the KL reference).
    model = PeftModel.from_pretrained(
        load_model_and_tokenizer(tiny.reference_path)[0], tmp_path / "adapter" / "final"
    )
    features = load_training_features(_lora_config(tiny, tmp_path), tokenizer)[:4]
    batch = TrainingCollator(tokenizer.pad_token_id, ("chosen", "rejected"))(features)
    stacked = stack_sides(batch, ("chosen", "rejected"), tokenizer.pad_token_id)
    ids, mask = stacked["input_ids"], stacked["attention_mask"]
    reference_logits = adapter_disabled_reference(model, model)(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        adapted_logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(reference_logits, base_logits, atol=1e-6)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)


def test_lora_merged_final_model_loads_as_a_plain_model(tiny, tmp_path):
    summary = train(_lora_config(tiny, tmp_path / "merged", merge_lora=True))
    final = tmp_path / "merged" / "final"
    assert not (final / "adapter_config.json").exists()
    merged, _ = load_model_and_tokenizer(final)
    base, _ = load_model_and_tokenizer(tiny.reference_path)
    assert type(merged) is type(base)
    assert merged.state_dict().keys() == base.state_dict().keys()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    assert summary.steps == 3


def test_trl_metric_names_reach_mlflow(tiny, tmp_path):
    from mlflow import MlflowClient

    from tidpo_core.runtime.tracking import STORE_FILE

    uri = f"sqlite:///{tmp_path / STORE_FILE}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    train(tiny.config(tmp_path / "run", max_steps=3, mlflow_tracking_uri=uri, mlflow_run_id=run_id))
    metrics = client.get_run(run_id).data.metrics
    assert TRL_METRICS <= set(metrics), sorted(TRL_METRICS - set(metrics))
    assert len(client.get_metric_history(run_id, "loss")) == 3
    assert all(v == v for v in metrics.values())  # no NaN logged


def test_online_weights_equal_the_stored_weights_while_the_policy_is_the_reference(tiny, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny.reference_path)
    config = tiny.config(tmp_path)
    sides = ("chosen", "rejected", "anchor")
    features = load_training_features(config, tokenizer)[:6]
    stacked = stack_sides(
        TrainingCollator(tokenizer.pad_token_id, sides)(features), sides, tokenizer.pad_token_id
    )
    online = online_weights(model, config.weight_lambda, config.weight_normalization)(stacked)
    assert online.shape == stacked["weights"].shape
    assert torch.allclose(online, stacked["weights"], atol=1e-4)
    assert not any(p.grad is not None for p in model.parameters())


def test_online_weights_mode_trains(tiny, tmp_path):
    summary = train(tiny.config(tmp_path / "online", max_steps=2, weights_mode="online"))
    assert summary.steps == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in summary.history)


def test_config_yaml_round_trip_and_unknown_keys(tiny, tmp_path):
    config = tiny.config(tmp_path, lora=True, lora_target_modules=["q_proj", "k_proj"])
    path = config.to_yaml(tmp_path / "run.yaml")
    assert TrainConfig.from_yaml(path) == config
    raw = yaml.safe_load(path.read_text())
    raw["no_such_option"] = 1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="no_such_option"):
        TrainConfig.from_yaml(path)


def test_fixture_pairs_differ_within_the_encoded_length(tiny, tmp_path):
    """The synthetic pairs differ mid-response; truncated too short, chosen == rejected and nothing trains."""
    _, tokenizer = load_model_and_tokenizer(tiny.reference_path)
    features = load_training_features(tiny.config(tmp_path), tokenizer)
    assert len(features) == tiny.train_pairs
    differ = sum(not np.array_equal(f["chosen_input_ids"], f["rejected_input_ids"]) for f in features)
    assert differ >= 0.9 * len(features)


def test_the_engine_loads_the_reference_at_the_revision_the_weights_were_made_with(monkeypatch, tmp_path):
    import tidpo_core.training.setup as engine

    calls = []
    monkeypatch.setattr(
        engine,
        "load_model_and_tokenizer",
        lambda path, **kwargs: calls.append((path, kwargs)) or (None, None),
    )
    config = TrainConfig(
        duckdb_path=str(tmp_path / "x.duckdb"),
        reference_model_path="org/model",
        output_dir=str(tmp_path),
        reference_revision="0123abc",
        trust_remote_code=True,
    )
    engine._load_reference(config)
    assert calls == [
        (
            "org/model",
            {"dtype": engine._model_dtype(config), "revision": "0123abc", "trust_remote_code": True},
        )
    ]
    # The YAML handed to the training process carries both.
    assert TrainConfig.from_yaml(config.to_yaml(tmp_path / "run.yaml")) == config


def test_anchor_refresh_resamples_from_the_policy_and_a_resumed_run_keeps_those_anchors(tiny, tmp_path):
    # Every train pair's anchor re-sampled from the current policy after step 2; a crash after step 2 and a
    # re-run must end with the weights of the uninterrupted run: the checkpoint carries the re-sampled anchors.
    common = {"max_steps": 3, "anchor_refresh_every": 2, "checkpoint_every": 1, "keep_checkpoints": 3}
    uninterrupted = train(tiny.config(tmp_path / "a", **common))
    assert uninterrupted.steps == 3 and all(np.isfinite(h["loss"]) for h in uninterrupted.history)
    marker = json.loads(
        (complete_checkpoints(tmp_path / "a" / "checkpoints")[-1][1] / COMPLETE_MARKER).read_text()
    )
    resampled = marker["anchors"]
    con = store.connect(tiny.duckdb_path, read_only=True)
    try:
        stored = store.read_anchors(con, tiny.anchors_fingerprint)
    finally:
        con.close()
    assert len(resampled) >= 0.8 * tiny.train_pairs
    assert sum(resampled[p] != stored[p] for p in resampled) >= 0.5 * len(
        resampled
    )  # new samples, not the stored ones

    with planted(kill_at_step=2):
        result = run_engine(tiny.config(tmp_path / "b", **common).to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == -9, result.stderr[-2000:]
    result = run_engine(tiny.config(tmp_path / "b", **common).to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "restored" in result.stderr and "anchors re-sampled before step 2" in result.stderr
    expected, got = load_weights(tmp_path / "a" / "final"), load_weights(tmp_path / "b" / "final")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_anchor_refresh_every_step_samples_each_batch_from_the_current_policy(tiny, tmp_path):
    """anchor_refresh_every 1, the authors' algorithm: each micro-batch's anchors are sampled from the policy
    right before its step (its own prompts only), and a resumed run samples what the uninterrupted one did."""
    common = {"max_steps": 3, "anchor_refresh_every": 1, "checkpoint_every": 1, "keep_checkpoints": 3}
    uninterrupted = train(tiny.config(tmp_path / "a", **common))
    assert uninterrupted.steps == 3 and all(np.isfinite(h["loss"]) for h in uninterrupted.history)
    marker = json.loads(
        (complete_checkpoints(tmp_path / "a" / "checkpoints")[-1][1] / COMPLETE_MARKER).read_text()
    )
    con = store.connect(tiny.duckdb_path, read_only=True)
    try:
        stored = store.read_anchors(con, tiny.anchors_fingerprint)
    finally:
        con.close()
    sampled = marker["anchors"]
    # Three steps of 4 pairs: the batches' own prompts, not the whole train split.
    assert 0.5 * 12 <= len(sampled) <= 12 < tiny.train_pairs
    assert sum(sampled[p] != stored[p] for p in sampled) >= 0.5 * len(sampled)

    with planted(kill_at_step=2):
        result = run_engine(tiny.config(tmp_path / "b", **common).to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == -9, result.stderr[-2000:]
    result = run_engine(tiny.config(tmp_path / "b", **common).to_yaml(tmp_path / "b.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = load_weights(tmp_path / "a" / "final"), load_weights(tmp_path / "b" / "final")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_anchor_refresh_needs_a_triplet_term(tiny, tmp_path):
    with pytest.raises(ValueError, match="anchor_refresh_every needs a loss with a triplet term"):
        train(tiny.config(tmp_path / "a", max_steps=1, anchor_refresh_every=1, loss_type="dpo"))


def _sharded_accelerator(kind: str, zero_stage: int | None = None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage}})
    return SimpleNamespace(
        distributed_type=DistributedType[kind], state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    ("kind", "stage", "refused"),
    [("FSDP", None, True), ("DEEPSPEED", 3, True), ("DEEPSPEED", 2, False), ("MULTI_GPU", None, False)],
)
def test_online_weights_and_anchor_refresh_are_refused_on_a_sharded_policy(
    tiny, tmp_path, kind, stage, refused
):
    from tidpo_core.training.setup import _check_sharding_support

    accelerator = _sharded_accelerator(kind, stage)
    for overrides in ({"weights_mode": "online"}, {"anchor_refresh_every": 5}):
        config = tiny.config(tmp_path, **overrides)
        if refused:
            with pytest.raises(ValueError, match="unsharded policy"):
                _check_sharding_support(config, accelerator)
        else:
            _check_sharding_support(config, accelerator)
    _check_sharding_support(tiny.config(tmp_path), accelerator)  # precomputed weights, stored anchors: fine


def test_a_gathered_state_dict_saves_the_base_models_layout(tiny, tmp_path):
    """FSDP/ZeRO-3 gather tied weights as separate tensors; saved as such, lm_head would be written too
    (seen on an H100 under FSDP, bench/gpu_check.py)."""
    from tidpo_core.training.checkpoints import without_tied_copies

    model, _ = load_model_and_tokenizer(tiny.reference_path)
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in gathered
    model.save_pretrained(tmp_path / "naive", state_dict=gathered, safe_serialization=True)
    model.save_pretrained(
        tmp_path / "fixed", state_dict=without_tied_copies(model, gathered), safe_serialization=True
    )
    stored = load_weights(tiny.reference_path)
    assert set(load_weights(tmp_path / "naive")) - set(stored) == {"lm_head.weight"}
    fixed = load_weights(tmp_path / "fixed")
    assert fixed.keys() == stored.keys()
    assert all(torch.equal(fixed[name], stored[name]) for name in stored)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_materialized_optimizer_state_is_zero_and_moves_no_weight(weight_decay):
    from tidpo_core.training.checkpoints import materialize_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    materialize_optimizer_state(optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(optimizer.state) == len(trainable) == 3
    for param in trainable:
        state = optimizer.state[param]
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
        assert param.grad is None
    assert optimizer.param_groups[0]["lr"] == 3e-3
    # What resuming relies on: the loaded state replaces the placeholder wholesale.
    trained = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    model(torch.ones(1, 4)).sum().backward()
    trained.step()
    optimizer.load_state_dict(trained.state_dict())
    assert all(torch.equal(optimizer.state[p]["exp_avg"], trained.state[p]["exp_avg"]) for p in trainable)
    materialize_optimizer_state(optimizer)  # already has state: untouched
    assert all(torch.equal(optimizer.state[p]["exp_avg"], trained.state[p]["exp_avg"]) for p in trainable)


@pytest.fixture(scope="module")
def tiny_cached(tmp_path_factory):
    """The tiny data with the reference's whole next-token distribution cached (k = vocabulary)."""
    from train_fixtures import TINY

    with single_thread():
        return build_tiny_data(
            tmp_path_factory.mktemp("tiny_cached"), pairs=16, reference_topk=TINY.vocab_size
        )


def test_cached_reference_kl_over_the_whole_vocabulary_trains_like_the_reference_forward(
    tiny_cached, tmp_path, monkeypatch
):
    """reference_kl: cached runs the policy only (one model loaded) and, with k = vocabulary, computes
    the same SeqKL as the reference forward: same losses and weights up to float rounding."""
    import tidpo_core.training.setup as engine

    loads = []
    real_load = engine._load_reference
    monkeypatch.setattr(engine, "_load_reference", lambda config: loads.append(1) or real_load(config))
    forward = train(tiny_cached.config(tmp_path / "forward", max_steps=3))
    assert len(loads) == 2  # policy + frozen reference
    reset_accelerate()
    loads.clear()
    cached = train(tiny_cached.config(tmp_path / "cached", max_steps=3, reference_kl="cached"))
    assert len(loads) == 1  # the policy only
    for a, b in zip(forward.history, cached.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        # The stored reference log-probs come from another forward (the weights pass) than the live reference's:
        # float32 rounding of about 1e-7 per token, summed over a batch's ~100 response tokens (seen: 1.1e-5 at
        # step 1, where the exact KL is 0; the same at the commit before the equations changed).
        assert b["seq_kl/rejected"] == pytest.approx(a["seq_kl/rejected"], abs=5e-5)
    assert forward.history[-1]["seq_kl/rejected"] > 0  # the KL term is live by the last step
    wf, wc = load_weights(tmp_path / "forward" / "final"), load_weights(tmp_path / "cached" / "final")
    assert all(torch.allclose(wf[k], wc[k], atol=1e-5) for k in wf)


def test_cached_reference_kl_without_a_cache_names_the_fix(tiny, tmp_path):
    with pytest.raises(ValueError, match="reference_kl_top_k > 0"):
        train(tiny.config(tmp_path / "none", max_steps=1, reference_kl="cached"))
    with pytest.raises(ValueError, match="reference_kl must be"):
        tiny.config(tmp_path, reference_kl="topk")


def test_peak_rss_is_the_training_process_s_own_not_its_parent_s(tmp_path):
    """ru_maxrss survives exec: a child of a 700 MiB parent reported >= 700 MiB whatever it used."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("VmHWM is Linux's")
    parent = tmp_path / "parent.py"
    parent.write_text(
        "import json, subprocess, sys\n"
        "big = bytearray(700 * 2**20)\n"
        "for i in range(0, len(big), 4096): big[i] = 1\n"
        "child = ('import json, resource; from tidpo_core.training.reporting import _peak_rss_mb; '\n"
        "         'print(json.dumps([_peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))')\n"
        "out = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True)\n"
        "print(out.stdout)\n"
    )
    done = subprocess.run(
        [sys.executable, str(parent)], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    own, inherited = json.loads(done.stdout.strip().splitlines()[-1])
    assert inherited >= 700  # the trap: the parent's size
    assert own < 650  # importing torch and the engine costs ~400 MiB


def test_init_model_path_starts_the_policy_elsewhere_and_keeps_the_reference(tiny, tmp_path):
    """init_from: champion. At learning rate 0 the policy stays what it started from; the rewards are
    log-ratios against the reference, so they are 0 from the reference and not from another model."""
    other, tokenizer = load_model_and_tokenizer(tiny.reference_path)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn_like(param))
    other.save_pretrained(tmp_path / "champion")
    tokenizer.save_pretrained(tmp_path / "champion")
    frozen = {"learning_rate": 0.0, "max_steps": 1, "gamma": 0.0, "alpha": 0.0}
    from_reference = train(tiny.config(tmp_path / "a", **frozen))
    from_champion = train(tiny.config(tmp_path / "b", init_model_path=str(tmp_path / "champion"), **frozen))
    # (the stored reference log-probs and the training forward agree to float32 rounding)
    assert abs(from_reference.history[0]["rewards/chosen"]) < 1e-6
    assert abs(from_champion.history[0]["rewards/chosen"]) > 1e-3
    final, _ = load_model_and_tokenizer(from_champion.final_model_path)
    for (name, a), b in zip(final.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="lora"):
        tiny.config(tmp_path / "c", init_model_path=str(tmp_path / "champion"), lora=True)


@pytest.mark.parametrize("requested", [None, 2])
def test_a_launched_training_process_runs_under_the_thread_plan(tiny, tmp_path, monkeypatch, requested):
    """The child trains the tiny model on one thread (a small model), or on TIDPO_NUM_THREADS when set."""
    from tidpo_core.runtime.launch import LaunchSettings, run_training

    if requested is None:
        monkeypatch.delenv("TIDPO_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("TIDPO_NUM_THREADS", str(requested))
    summary = run_training(
        tiny.config(tmp_path / "run", loss_type="dpo", max_steps=1), LaunchSettings("python")
    )
    assert summary["torch_threads"] == (1 if requested is None else requested)
