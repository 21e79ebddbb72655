"""bench_real end to end at the smoke test's sizes, on a tiny chat model (SmolLM2's own stages are covered by
test_smollm2): every method gets every reported metric, the runs record one commit, and a second call resumes
from the data dir without training or evaluating anything again."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tidpo_core.data.files import load_preferences
from tidpo_core.models.modeling import (
    TinyModelConfig,
    build_tiny_model,
    save_model_and_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def tiny_chat_model(tmp_path, shared_data) -> Path:
    """A tiny Llama with a ChatML tokenizer trained on HH-RLHF text: a stand-in for a pretrained chat model."""
    pairs = load_preferences(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz").pairs[:200]
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    model = build_tiny_model(
        tokenizer,
        TinyModelConfig(
            vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        seed=0,
    )
    return Path(save_model_and_tokenizer(model, tokenizer, tmp_path / "tiny-chat"))


def test_the_grid_runs_through_the_comparison_step_and_resumes(tmp_path, monkeypatch, tiny_chat_model):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("TIDPO_BENCH_RESULTS", str(tmp_path / "results"))
    from bench import bench_real

    first = bench_real.run(quick=True, work=tmp_path / "work", model=str(tiny_chat_model))
    assert set(first["methods"]) == {"reference", *bench_real.METHODS}
    for method in bench_real.METHODS:
        row = first["methods"][method]
        for metric in (
            "reward_accuracy",
            "judged_win_rate",
            "judged_win_rate_length_controlled",
            "kl_to_reference",
            "distinct_2",
            "truthfulqa_mc1",
            "truthfulqa_mc2",
            "train_seconds",
        ):
            cell = row[metric]
            assert len(cell["seeds"]) == 1 and math.isfinite(cell["mean"]), (method, metric)
        assert 0.0 <= row["judged_win_rate"]["mean"] <= 1.0 and 0.0 <= row["truthfulqa_mc1"]["mean"] <= 1.0
    assert first["one_commit"] and len(first["commits"]) == 1
    assert (
        0.0 <= first["judge"]["held_out"]["eval_accuracy"] <= 1.0
        and first["judge"]["train_pairs"] == bench_real.QUICK.judge
    )
    assert first["judge"]["training"]["learning_rate"] == 1e-5  # a pretrained backbone's rate
    assert not any(r["reused"] for r in first["runs"])

    second = bench_real.run(quick=True, work=tmp_path / "work", model=str(tiny_chat_model))
    assert all(r["reused"] for r in second["runs"])
    assert second["methods"] == first["methods"]
    assert (tmp_path / "results" / "real-quick.json").exists()

    # rejudge: the kept models answer the same prompts again and the judge scores them; on a grid that this
    # commit evaluated, every judged figure must come back as the comparison computed it.
    third = bench_real.run(quick=True, work=tmp_path / "work", model=str(tiny_chat_model), part="rejudge")
    rejudged = third["rejudged"]
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in rejudged["reproduces_grid"].values())
    for method in bench_real.METHODS:
        for metric in ("judged_win_rate", "judged_win_rate_length_controlled", "mean_length"):
            assert rejudged["methods"][method][metric]["mean"] == pytest.approx(
                first["methods"][method][metric]["mean"], abs=1e-6
            ), (method, metric)
    assert third["methods"] == first["methods"]  # the grid's section is kept
    assert "tidpo judged_win_rate_length_controlled beats dpo by more than both stds" in third["targets"]


def test_the_trl_and_importance_parts_fill_their_sections(tmp_path, monkeypatch, tiny_chat_model):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("TIDPO_BENCH_RESULTS", str(tmp_path / "results"))
    from bench import bench_real

    trl = bench_real.run(quick=True, work=tmp_path / "work", model=str(tiny_chat_model), part="trl")["trl"]
    # The chat-templated rows reach TRL as the very ids tidpo trains on, so the losses agree to float precision.
    assert trl["token_ids"]["mismatched_pairs"] == 0
    assert trl["first_batch_loss_abs_diff"] <= 1e-5
    for method in ("tidpo_dpo", "tidpo_tidpo", "tidpo_tidpo_cached_kl"):
        assert trl[method]["epoch_ratio_vs_trl"] > 0 and len(trl[method]["epoch_ratio_vs_trl_rounds"]) == 1

    doc = bench_real.run(quick=True, work=tmp_path / "work", model=str(tiny_chat_model), part="importance")
    for position in ("uniform", "middle"):
        rows = doc["importance"][position]
        for name in ("attribution", "contrastive", "contrastive_no_eos", "surprisal"):
            assert (
                0.0 <= rows[name]["precision_at_k"] <= 1.0 and 0.0 <= rows[name]["raw_precision_at_k"] <= 1.0
            )
    assert "trl" in doc  # the other part's section is kept
    assert doc["importance"]["commit"] == doc["trl"]["commit"] == doc["commit"]  # each part says where it ran


def _cell(*seeds: float) -> dict:
    mean = sum(seeds) / len(seeds)
    std = (sum((s - mean) ** 2 for s in seeds) / max(len(seeds) - 1, 1)) ** 0.5
    return {"seeds": list(seeds), "mean": mean, "std": std, "n": len(seeds)}


def test_the_win_rate_frontier_by_hand():
    from bench.real_frontier import win_rate_frontier

    # Pooled points (0, 0), (1, 1), (2, 0), (3, 1): mean x 1.5, mean y 0.5, Sxy 1.0, Sxx 5.0, so the line is
    # y = 0.2 + 0.2 x; residuals -0.2, +0.6 (method a) and -0.6, +0.2 (method b).
    table = {
        "a": {"kl_to_reference": _cell(0.0, 1.0), "judged_win_rate": _cell(0.0, 1.0)},
        "b": {"kl_to_reference": _cell(2.0, 3.0), "judged_win_rate": _cell(0.0, 1.0)},
        "reference": {"kl_to_reference": _cell(0.0)},  # no win rate: not on the frontier
    }
    frontier = win_rate_frontier(table)
    assert frontier["slope_per_nat"] == pytest.approx(0.2) and frontier["intercept"] == pytest.approx(0.2)
    assert frontier["above_the_line"]["a"]["mean"] == pytest.approx(0.2)
    assert frontier["above_the_line"]["b"]["mean"] == pytest.approx(-0.2)
    assert frontier["above_the_line"]["a"]["std"] == pytest.approx(math.sqrt(0.32))  # sample std of -0.2, 0.6
    assert set(frontier["above_the_line"]) == {"a", "b"}
    assert win_rate_frontier({"a": table["a"]}) == {}  # a line through two runs says nothing
    assert win_rate_frontier({"a": {"kl_to_reference": _cell(1.0), "judged_win_rate": _cell(0.5)}}) == {}


def test_the_table_judges_real_json_by_the_spread_of_the_seeds():
    """A hand-made real.json: the rendered rows name the leader only where its lead exceeds both seeds'
    spreads, lower is better for KL and time, and the targets of the three parts read met / not met."""
    from bench.bench_real import beats_dpo
    from bench.readme_rows_real import rows_real

    doc = {
        "setup": {"model": "smollm2", "split_info": {"train": 512, "eval": 256}},
        "judge": {"held_out": {"eval_accuracy": 0.555, "eval_pairs": 256.0}},
        "methods": {
            # win rate: tidpo leads dpo by 0.10 > 0.01 + 0.01; simpo trails.
            "dpo": {"judged_win_rate": _cell(0.40, 0.41, 0.42), "kl_to_reference": _cell(2.0, 2.0, 2.0)},
            "tidpo": {"judged_win_rate": _cell(0.50, 0.51, 0.52), "kl_to_reference": _cell(1.0, 3.0, 2.0)},
            "simpo": {"judged_win_rate": _cell(0.30, 0.31, 0.32), "kl_to_reference": _cell(5.0, 5.0, 5.0)},
        },
        "importance": {"uniform": {"contrastive": {"precision_at_k": 0.85, "raw_precision_at_k": 0.9}}},
        "importance_targets": {"contrastive hybrid precision@k at uniform >= 0.8": True},
        "trl": {"tidpo_dpo": {"epoch_ratio_vs_trl": 0.7}, "first_batch_loss_abs_diff": 3e-9},
        "trl_targets": {"tidpo_dpo <= 0.8x TRL": True},
    }
    doc["rejudged"] = {
        "prompts": 128,
        "methods": {  # at equal lengths dpo leads tidpo by 0.10 > 0.02 + 0.02
            "dpo": {
                "judged_win_rate_length_controlled": _cell(0.58, 0.60, 0.62),
                "mean_length": _cell(50, 52),
            },
            "tidpo": {
                "judged_win_rate_length_controlled": _cell(0.48, 0.50, 0.52),
                "mean_length": _cell(55, 55),
            },
            "reference": {"mean_length": _cell(55, 55)},
        },
        "reproduces_grid": {"judged_win_rate_max_abs_diff": 0.0, "mean_length_max_abs_diff": 0.02},
    }
    doc["frontier"] = {
        "slope_per_nat": 0.05,
        "intercept": 0.5,
        "above_the_line": {"dpo": _cell(-0.01, 0.01), "tidpo": _cell(0.02, 0.04)},
    }
    doc["targets"] = {
        **beats_dpo(doc["methods"]),
        **beats_dpo(doc["rejudged"]["methods"], "judged_win_rate_length_controlled"),
    }
    rows = {figure.split(":")[0]: (result, verdict) for _, figure, result, verdict in rows_real(doc)}
    assert rows["judged win rate over the reference's answers"] == (
        "0.410 ± 0.010 / 0.510 ± 0.010 / 0.310 ± 0.010",
        "best: tidpo",
    )
    # KL: dpo's 2.0 is the lowest mean tied with tidpo's 2.0 (spread 1.0): a tie, not a winner.
    assert rows["KL to the reference, nats per answer"][1] == "tie: dpo = tidpo"
    assert rows["tidpo judged_win_rate beats dpo by more than both stds"] == (
        "gap +0.100, spreads 0.020",
        "met",
    )
    assert rows["judge (reward model on pairs no policy saw)"][0] == "0.555 on 256 pairs"
    assert rows["win rate at matched KL, above one line through all runs (+0.050 per nat)"] == (
        "+0.000 ± 0.014 / +0.030 ± 0.014",
        "",
    )
    assert rows["judged win rate at equal answer lengths"] == ("0.600 ± 0.020 / 0.500 ± 0.020", "best: dpo")
    assert rows["mean answer length, tokens"][0] == "51.0 ± 1.4 / 55.0 ± 0.0 / 55.0 ± 0.0"
    assert rows["largest difference from the grid's own judged figures"] == ("0.02", "")
    assert rows["tidpo judged_win_rate_length_controlled beats dpo by more than both stds"] == (
        "gap -0.100, spreads 0.040",
        "not met",
    )
    assert rows["span_position uniform"] == (
        "contrastive 0.850 (raw 0.900)",
        "contrastive hybrid precision@k at uniform >= 0.8: met",
    )
    assert rows["epoch time over TRL's (median of paired rounds)"] == (
        "tidpo_dpo 0.70x",
        "tidpo_dpo <= 0.8x TRL: met",
    )
    # Within the spread: tidpo 0.45 ± 0.05 against dpo 0.41 ± 0.01 names the leader with its caveat.
    doc["methods"]["tidpo"]["judged_win_rate"] = _cell(0.40, 0.45, 0.50)
    rows = {figure.split(":")[0]: verdict for _, figure, _, verdict in rows_real(doc)}
    assert rows["judged win rate over the reference's answers"] == "best: tidpo, within the spread of dpo"
