"""GRPO: advantages, the clipped objective and the rule reward against hand computations, a loop and TRL's
own loss; a short seeded run raises the rule reward; the reward-model path with a stub; the comparison
with grpo among its methods."""

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import types
from collections import defaultdict
from pathlib import Path

import dagster as dg
import pytest
import torch
from pipeline_config import small_run_config
from train_fixtures import load_weights, reset_accelerate

from tidpo_core import store
from tidpo_core.batching.features import EncodingSettings
from tidpo_core.data.pairs import LoadResult, PreferencePair
from tidpo_core.data.synthetic import generate_synthetic_pairs
from tidpo_core.method.grpo import (
    PhraseReward,
    group_advantages,
    grpo_loss,
    k3_kl,
    mean_reward,
    phrase_reward,
    phrase_score,
    reward_function,
)
from tidpo_core.models.generation import SamplingSettings, sample_responses
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
    torch_threads,
    train_tokenizer,
)
from tidpo_core.models.sft import sft_texts, supervised_finetune
from tidpo_core.runtime.layout import RunDir
from tidpo_core.training import TrainConfig, TrainingInterrupted, train

# --- advantages ---------------------------------------------------------------------------------------


def test_group_advantages_match_a_hand_computation():
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.0, 3.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, 4, eps=1e-4)
    # Group 1: mean 0, unbiased std sqrt((1 + 0 + 1 + 0) / 3).
    std1 = math.sqrt(2 / 3)
    # Group 2: mean 1.5, deviations (1.5, -0.5, -0.5, -0.5), unbiased std sqrt(3 / 3) = 1.
    expected = [
        1 / (std1 + 1e-4),
        0.0,
        -1 / (std1 + 1e-4),
        0.0,
        1.5 / 1.0001,
        -0.5 / 1.0001,
        -0.5 / 1.0001,
        -0.5 / 1.0001,
    ]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)


def test_equal_rewards_give_exactly_zero_advantage():
    # 0.1 three times: the float mean is 0.10000000000000002, so r - mean alone would not be 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, -2.0, -2.0, -2.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    advantages = group_advantages(rewards, 3)
    assert torch.equal(advantages[:6], torch.zeros(6, dtype=torch.float64))
    assert advantages[6:].abs().min() == 0.0 and advantages[6] > 0 > advantages[7]


def test_group_advantages_match_trl_s_formula():
    from trl.trainer.utils import nanstd  # what GRPOTrainer computes the group std with

    rewards = torch.randn(24, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 6)
    mean = grouped.mean(dim=1).repeat_interleave(6)
    std = nanstd(grouped, dim=1).repeat_interleave(6)
    trl_advantages = (rewards - mean) / (std + 1e-4)  # GRPOTrainer, scale_rewards "group"
    assert torch.allclose(group_advantages(rewards, 6), trl_advantages, atol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError):
        group_advantages(rewards, 1)


# --- the clipped objective ------------------------------------------------------------------------------


def _tiny_example():
    """Two completions: three real tokens (the last padding), ratios 1.5, 0.9 / 0.5, advantages +1 / -1."""
    old = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
    logps = old + torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0]]))
    # q = log pi_ref - log pi: 0, ln 2 and -ln 2 on the real tokens.
    ref = logps + torch.log(torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    return logps, old, ref, mask, torch.tensor([1.0, -1.0])


def test_clipped_objective_matches_a_hand_computation():
    logps, old, ref, mask, adv = _tiny_example()
    logps.requires_grad_(True)
    out = grpo_loss(logps, old, adv, mask, epsilon=0.2, beta=0.1, ref_logps=ref)
    # Tokens: A=+1, ratio 1.5 -> min(1.5, 1.2) = 1.2; A=+1, ratio 0.9 -> 0.9; A=-1, ratio 0.5 -> min(-0.5, -0.8) = -0.8.
    # k3 KL: e^q - q - 1 = 0, 2 - ln 2 - 1, 1/2 + ln 2 - 1.
    kl = [0.0, 1 - math.log(2), math.log(2) - 0.5]
    completion_1 = (-1.2 + (-0.9 + 0.1 * kl[1])) / 2
    completion_2 = 0.8 + 0.1 * kl[2]
    assert out.loss.item() == pytest.approx((completion_1 + completion_2) / 2, abs=1e-6)
    assert float(out.kl) == pytest.approx(sum(kl) / 3, abs=1e-6)  # = 0.5 / 3
    assert float(out.clip_ratio_high) == pytest.approx(1 / 3) and float(out.clip_ratio_low) == pytest.approx(
        1 / 3
    )
    assert float(out.clip_ratio_region) == pytest.approx(2 / 3)
    out.loss.backward()
    # The clipped tokens pass no ratio gradient; only the KL's, (1 - e^q) beta / length / completions.
    assert logps.grad[0, 0].item() == pytest.approx(0.0, abs=1e-7)  # q = 0
    assert logps.grad[1, 0].item() == pytest.approx(0.1 * (1 - 0.5) / 1 / 2, abs=1e-7)
    # The unclipped token: d(-ratio A)/dlogp = -ratio = -0.9, plus the KL's 0.1 (1 - 2); over length 2, 2 completions.
    assert logps.grad[0, 1].item() == pytest.approx((-0.9 + 0.1 * (1 - 2)) / 2 / 2, abs=1e-6)
    assert logps.grad[1, 1].item() == 0.0  # padding


def _loop_loss(logps, old, adv, mask, epsilon, beta, ref):
    """The objective written out token by token in plain floats."""
    total = 0.0
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            a = float(adv[i])
            objective = min(ratio * a, max(1 - epsilon, min(1 + epsilon, ratio)) * a)
            q = float(ref[i, t] - logps[i, t])
            terms.append(-objective + beta * (math.exp(q) - q - 1))
        total += sum(terms) / max(len(terms), 1)
    return total / logps.shape[0]


def test_clipped_objective_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    logps = torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.4 - 2
    old = logps + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    ref = logps + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(5, 7, generator=g) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    for epsilon, beta in ((0.2, 0.0), (0.1, 0.04), (0.3, 1.0)):
        out = grpo_loss(logps, old, adv, mask, epsilon, beta=beta, ref_logps=ref)
        assert float(out.loss) == pytest.approx(
            _loop_loss(logps, old, adv, mask, epsilon, beta, ref), abs=1e-12
        )
    assert float(k3_kl(logps, logps).abs().max()) == 0.0


def _trl_compute_loss(logps, old, ref, mask, adv, beta, epsilon):
    """TRL 1.16's GRPOTrainer._compute_loss on these tensors (the model's log-probs stubbed in), and its metrics."""
    from trl import GRPOTrainer

    B, T = logps.shape
    accelerator = types.SimpleNamespace(
        reduce=lambda t, reduction="sum": t, gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type="grpo",
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=accelerator,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[0] for k, v in fake._metrics["train"].items()}


def test_clipped_objective_is_trl_s_loss():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, generator=g) * 0.5 - 1
    old = base + torch.randn(4, 6, generator=g) * 0.3
    ref = base + torch.randn(4, 6, generator=g) * 0.3
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5, [1] * 5 + [0]])
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5])
    for beta, epsilon in ((0.0, 0.2), (0.04, 0.1)):
        ours_logps, trl_logps = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
        trl_loss, trl_metrics = _trl_compute_loss(trl_logps, old, ref, mask, adv, beta, epsilon)
        ours = grpo_loss(ours_logps, old, adv, mask, epsilon, beta=beta, ref_logps=ref)
        assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-7)
        trl_loss.backward()
        ours.loss.backward()
        assert torch.allclose(ours_logps.grad, trl_logps.grad, atol=1e-7)
        for name, value in ours.metrics().items():
            assert value == pytest.approx(trl_metrics[name], abs=1e-7), name
        assert ("kl" in trl_metrics) == ("kl" in ours.metrics()) == (beta != 0.0)


# --- rewards -----------------------------------------------------------------------------------------


def _pair(prompt: str, safe: str, risky: str, n: int) -> PreferencePair:
    return PreferencePair(
        f"p{n}",
        prompt,
        f"Do {safe}.",
        f"Do {risky}.",
        "synthetic",
        {"chosen_phrase": safe, "rejected_phrase": risky},
    )


def test_rule_reward_on_a_few_strings():
    reward = phrase_reward(
        [
            _pair("Q1", "call a doctor", "wait and see", 1),
            _pair("Q1", "go to the hospital", "sleep on it", 2),  # the same prompt with other answers
            _pair("Q2", "unplug it", "touch the wire", 3),
        ]
    )
    prompts = ["Q1", "Q1", "Q1", "Q1", "Q1", "Q2", "Q2"]
    completions = [
        "You should Call a   Doctor now.",  # safe; case and whitespace ignored
        "Just wait and see.",  # risky
        "Best to go to the hospital.",  # the prompt's other safe phrase
        "call a doctor or wait and see",  # both: they cancel
        "Drink water.",  # neither
        "unplug it",  # Q2's safe phrase
        "call a doctor",  # Q1's phrase is nothing to Q2
    ]
    assert reward(prompts, completions) == [1.0, -1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert mean_reward(reward, prompts, completions) == pytest.approx(2 / 7)
    assert phrase_score("x", ["a b"], ["c"]) == 0.0
    with pytest.raises(ValueError, match="knows no phrases"):
        reward(["Q3"], ["call a doctor"])
    with pytest.raises(ValueError, match="grpo_reward: model"):
        phrase_reward([PreferencePair("p", "Q", "a", "b", "file", {})])
    assert reward_function("phrases", None, [_pair("Q1", "a", "b", 1)])(["Q1"], ["a"]) == [1.0]


def test_the_model_reward_comes_from_tidpo_core_reward(monkeypatch):
    def stub(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(len(c)) for c in completions]

    module = types.ModuleType("tidpo_core.models.reward")
    module.load_reward_function = lambda model_dir: stub if model_dir == "rm-dir" else None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tidpo_core.models.reward", module)
    assert reward_function("model", "rm-dir", []) is stub
    assert mean_reward(reward_function("model", "rm-dir", []), ["a", "b"], ["xy", "wxyz"]) == 3.0
    with pytest.raises(ValueError, match="grpo_reward_model"):
        reward_function("model", None, [])


def test_grpo_settings_are_checked():
    base = {"duckdb_path": "db", "reference_model_path": "ref", "output_dir": "out", "loss_type": "grpo"}
    assert TrainConfig(**base).grpo_num_generations == 8 and TrainConfig(**base).grpo_beta == 0.0
    for bad in (
        {"grpo_num_generations": 1},
        {"grpo_temperature": 0.0},
        {"grpo_epsilon": -0.1},
        {"grpo_reward": "model"},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**base, **bad)
    with pytest.raises(ValueError, match="no preference loss"):
        TrainConfig(**base).loss_config()
    TrainConfig(
        **{**base, "loss_type": "dpo"}, grpo_num_generations=1
    )  # grpo settings are not checked for dpo


# --- training -------------------------------------------------------------------------------------------

# The built-in pairs whose safe/risky phrase comes in the answer's first sentence (span_position uniform with
# no sentence before it), so that short completions can reach it, and a reference SFT-ed on both answers: it
# names the safe and the risky phrase about equally often, and GRPO has something to choose between.
GRPO_PROMPT_PAIRS = 64
REFERENCE_SHAPE = TinyModelConfig(
    vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
)
SAMPLING = {"max_new_tokens": 24, "temperature": 0.7}


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory) -> tuple[Path, Path, list[PreferencePair]]:
    root = tmp_path_factory.mktemp("grpo")
    pairs = [
        p
        for p in generate_synthetic_pairs(400, seed=0, span_position="uniform")
        if p.meta["chosen_span"][0] < 45
    ]
    pairs = pairs[:GRPO_PROMPT_PAIRS]
    database = root / store.DATABASE_FILE
    con = store.connect(database)
    try:
        store.replace_pairs(con, LoadResult(pairs, [], len(pairs)), eval_fraction=0.0)
    finally:
        con.close()
    with torch_threads(1):
        tokenizer = train_tokenizer(
            [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)],
            vocab_size=REFERENCE_SHAPE.vocab_size,
        )
        model = build_tiny_model(tokenizer, REFERENCE_SHAPE, seed=0)
        supervised_finetune(
            model,
            tokenizer,
            sft_texts(pairs, "both"),
            steps=300,
            batch_size=16,
            settings=EncodingSettings(64, 32),
        )
    reference = save_model_and_tokenizer(model, tokenizer, root / "reference")
    return database, reference, pairs


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def _grpo_config(database: Path, reference: Path, output_dir: Path, **overrides) -> TrainConfig:
    values = {
        "duckdb_path": str(database),
        "reference_model_path": str(reference),
        "output_dir": str(output_dir),
        "loss_type": "grpo",
        "per_device_batch_size": 4,
        "grpo_num_generations": 8,
        "grpo_max_completion_length": SAMPLING["max_new_tokens"],
        "grpo_temperature": SAMPLING["temperature"],
        "learning_rate": 3e-4,
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": 0,
        "max_steps": 30,
        "max_prompt_tokens": 64,
        "checkpoint_every": 0,
        "resume": False,
        "progress": False,
        "mixed_precision": "no",
        "seed": 0,
        **overrides,
    }
    return TrainConfig(**values)


def _rule_reward_of_samples(model_path: Path | str, reward: PhraseReward) -> float:
    """Mean rule reward of 8 samples per prompt, drawn as the run samples (no top-k/top-p, T 0.7, 24 tokens)."""
    model, tokenizer = load_model_and_tokenizer(model_path)
    prompts = reward.prompts * 8
    settings = SamplingSettings(
        top_k=0, top_p=1.0, seed=123, batch_size=512, max_prompt_tokens=64, **SAMPLING
    )
    with torch_threads(1):
        return mean_reward(reward, prompts, sample_responses(model, tokenizer, prompts, settings))


def test_a_short_grpo_run_raises_the_rule_reward(grpo_data, tmp_path, fresh_accelerate):
    database, reference, pairs = grpo_data
    reward = phrase_reward(pairs)
    before = _rule_reward_of_samples(reference, reward)
    with torch_threads(1):
        summary = train(_grpo_config(database, reference, tmp_path / "run"))
    after = _rule_reward_of_samples(summary.final_model_path, reward)
    # Measured: 0.06 before, 0.32 after (30 steps of 4 prompts x 8 completions).
    assert after > before + 0.1, (before, after)

    run = RunDir(tmp_path / "run")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in run.final_model.iterdir()
    }
    on_disk = json.loads(run.summary.read_text())
    assert on_disk["steps"] == summary.steps == 30 and len(summary.history) == 30
    assert on_disk["final_model_path"] == str(run.final_model)
    step = summary.history[0]
    for name in (
        "loss",
        "reward",
        "reward_std",
        "rewards/phrases/mean",
        "completions/mean_length",
        "clip_ratio/region_mean",
        "grad_norm",
        "learning_rate",
    ):
        assert name in step, name
    assert [h["step"] for h in summary.history] == list(range(1, 31))


def test_grpo_with_a_reward_model_and_the_kl_term(grpo_data, tmp_path, monkeypatch, fresh_accelerate):
    database, reference, pairs = grpo_data
    seen: list[tuple[list[str], list[str]]] = []

    def stub(prompts: list[str], completions: list[str]) -> list[float]:
        seen.append((prompts, completions))
        return [float(len(c) % 3) for c in completions]

    module = types.ModuleType("tidpo_core.models.reward")
    module.load_reward_function = lambda model_dir: stub  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tidpo_core.models.reward", module)
    config = _grpo_config(
        database,
        reference,
        tmp_path / "run",
        grpo_reward="model",
        grpo_reward_model="rm",
        grpo_beta=0.04,
        per_device_batch_size=2,
        grpo_num_generations=2,
        grpo_max_completion_length=8,
        max_steps=2,
    )
    with torch_threads(1):
        summary = train(config)
    stored = {p.prompt for p in pairs}
    assert len(seen) == 2 and all(len(p) == len(c) == 4 for p, c in seen)
    assert all(
        p in stored for prompts, _ in seen for p in prompts
    )  # the stored prompts, not the tokenized text
    assert all(math.isfinite(h["kl"]) and "rewards/model/mean" in h for h in summary.history)


def test_a_grpo_run_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(
    grpo_data, tmp_path, fresh_accelerate
):
    database, reference, _ = grpo_data
    config = _grpo_config(
        database,
        reference,
        tmp_path / "run",
        per_device_batch_size=4,
        grpo_num_generations=4,
        max_steps=4,
        resume=True,
    )

    def preempt(step: int, metrics: dict[str, float]) -> None:
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with torch_threads(1):
        with pytest.raises(TrainingInterrupted, match="SIGTERM after optimizer step 2 of 4"):
            train(config, on_step=preempt)
        run = RunDir(tmp_path / "run")
        assert (
            run.checkpoints / "checkpoint-2"
        ).is_dir() and "TrainingInterrupted" in run.failure.read_text()
        reset_accelerate()
        resumed = train(config)
        reset_accelerate()
        whole = train(dataclasses.replace(config, output_dir=str(tmp_path / "whole"), resume=False))
    assert resumed.resumed_from == str(run.checkpoints / "checkpoint-2") and (
        resumed.steps,
        resumed.steps_this_run,
    ) == (4, 2)
    assert not run.failure.exists()
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in whole.history]
    assert any(h["reward"] != 0 for h in whole.history)  # the policy did move
    ours, theirs = load_weights(resumed.final_model_path), load_weights(whole.final_model_path)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- the comparison ---------------------------------------------------------------------------------------


def test_the_comparison_with_grpo_among_its_methods(tmp_path):
    from tidpo_pipeline.assets.anchors import anchor_responses
    from tidpo_pipeline.assets.compare import method_comparison
    from tidpo_pipeline.assets.pairs import preference_pairs
    from tidpo_pipeline.assets.reference import reference_model
    from tidpo_pipeline.assets.weights import token_weights
    from tidpo_pipeline.resources import build_resources

    run_config = small_run_config(pairs=24)
    del run_config["ops"]["tidpo_policy"], run_config["ops"]["evaluation"]
    run_config["ops"]["reference_model"]["config"]["sft_steps"] = 4
    run_config["ops"]["compare_methods"] = {
        "config": {
            "methods": ["dpo", "grpo"],
            "seeds": [0],
            "max_steps": 2,
            "per_device_batch_size": 2,
            "warmup_steps": 1,
            "learning_rate": 2e-3,
            "grpo_num_generations": 2,
            "grpo_max_completion_length": 8,
            "batch_size": 16,
            "sample_prompts": 3,
            "max_new_tokens": 8,
        }
    }
    result = dg.materialize(
        [preference_pairs, reference_model, anchor_responses, token_weights, method_comparison],
        resources=build_resources(str(tmp_path / "data")),
        run_config=run_config,
        raise_on_error=False,
    )
    assert result.success
    meta = result.asset_materializations_for_node("compare_methods")[0].metadata
    table = meta["table"].value
    assert "grpo (n=1)" in table and "dpo (n=1)" in table
    for metric in ("reward_accuracy", "kl_to_reference", "reward_model_score", "train_seconds"):
        assert f"| {metric} |" in table
    assert "rule reward" in meta["reward_model_score_reward"].value
    with open(f"{meta['report_dir'].value}/method_comparison.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["reference", "dpo", "grpo"]
    assert 0.0 <= float(rows["grpo"]["reward_accuracy_mean"]) <= 1.0
    assert -1.0 <= float(rows["grpo"]["reward_model_score_mean"]) <= 1.0
    assert float(rows["grpo"]["train_seconds_mean"]) > 0 and rows["reference"]["train_seconds_mean"] == ""
    assert Path(meta["report_dir"].value, "method_comparison.png").stat().st_size > 0
    con = store.connect(tmp_path / "data" / store.DATABASE_FILE, read_only=True)
    try:
        grpo_metrics = {
            r[0]
            for r in con.execute("SELECT metric FROM method_comparison_runs WHERE method = 'grpo'").fetchall()
        }
    finally:
        con.close()
    assert {
        "reward_accuracy",
        "reward_model_score",
        "train_seconds",
        "critical_phrase_chosen_rate",
    } <= grpo_metrics


def test_training_health_of_a_grpo_run_reads_its_mean_reward():
    from tidpo_core.evaluation.training_health import training_health

    # TRL's GRPOTrainer history: no margin; a step that re-uses its completions logs a NaN reward.
    rising = [{"loss": 0.0, "reward": r} for r in (0.0, float("nan"), 0.1, 0.2, 0.4, float("nan"), 0.5, 0.6)]
    health = training_health(rising)
    assert health.passed and health.signal == "reward" and health.all_finite
    assert health.mean_margin_first_window == pytest.approx(
        0.05
    ) and health.mean_margin_last_window == pytest.approx(0.55)
    assert not training_health([{"loss": 0.0, "reward": r} for r in (0.5, 0.4, 0.2, 0.1)]).passed
    assert not training_health([{"loss": float("nan"), "reward": r} for r in (0.1, 0.2, 0.3, 0.4)]).passed
    assert (
        training_health([{"loss": 0.7, "rewards/margins": m} for m in (0.0, 0.1, 0.2, 0.3)]).signal
        == "rewards/margins"
    )
