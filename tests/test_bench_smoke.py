"""Every benchmark runs end to end at a tiny size (quick=True), so that none of them can rot.

The figures at these sizes mean nothing; what is checked is that each benchmark finishes, writes its
result file with the machine description and the commit, and that the README table renders from it.
Results go to a temporary folder (TIDPO_BENCH_RESULTS), never over bench/results. bench_training has
its own smoke test (test_bench_smoke_training.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `bench` is a folder of the repository, not an installed package
    path = tmp_path / "results"
    monkeypatch.setenv("TIDPO_BENCH_RESULTS", str(path))
    return path


def _written(results_dir, name: str) -> dict:
    path = results_dir / f"{name}-quick.json"
    assert path.exists(), f"{path} not written"
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert doc["machine"]["torch"] and doc["machine"]["cpu_model"] and doc["machine"]["usable_cores"] >= 1
    assert isinstance(doc["commit"], str) and doc["commit"]
    return doc


def test_trl_throughput_and_loss_agreement(results_dir):
    from bench import bench_trl

    doc = bench_trl.run(quick=True)
    assert doc == _written(results_dir, "trl")
    for method in ("trl_dpo", "tidpo_dpo", "tidpo_tidpo"):
        assert doc["methods"][method]["epoch_s_best"] > 0
    assert doc["methods"]["trl_dpo"]["token_ids"]["mismatched_pairs"] == 0
    # Shared-prompt rows read each prompt once; TRL twice, and the padded tidpo layout three times.
    tokens = doc["setup"]["policy_tokens_per_epoch"]
    prompts = tokens["trl_dpo"] - tokens["tidpo_dpo"]
    assert prompts > 0 and tokens["tidpo_tidpo_padded"] - tokens["tidpo_tidpo"] == 2 * prompts
    # The loss agreement is exact arithmetic, not a timing: it must hold at any size.
    assert doc["first_batch_loss_check"]["passed"], doc["first_batch_loss_check"]
    # The standing guards (2026-12) reach the README table: tidpo's DPO <= 0.75x TRL, cached KL <= 1.0x TRL.
    assert isinstance(doc["target"]["dpo_met"], bool) and isinstance(doc["target"]["cached_kl_met"], bool)
    from bench.readme_rows import rows_trl

    targets = [row[3] for row in rows_trl(doc)]
    assert targets[0].startswith("`dpo` <= 0.75x TRL: ") and any(
        t.startswith("<= 1.0x TRL: ") for t in targets
    )


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_weight_precompute_cost(results_dir):
    from bench import bench_weights

    doc = bench_weights.run(quick=True)
    assert doc == _written(results_dir, "weights")
    assert doc["tokens_per_s"]["importance"] > 0 and doc["tokens_per_s"]["forward_backward"] > 0
    parallel = doc["data_parallel"]
    # Every pair weighed (chosen and rejected) and sampled, with 1 and with 2 processes.
    assert (
        parallel["items"]["weights_1_process"]
        == parallel["items"]["weights_2_processes"]
        == 2 * doc["sizes"]["sharded_pairs"]
    )
    assert (
        parallel["items"]["anchors_1_process"]
        == parallel["items"]["anchors_2_processes"]
        == doc["sizes"]["anchor_pairs"]
    )
    assert parallel["two_process_speedup"] > 0 and parallel["anchors_two_process_speedup"] > 0
    from bench.readme_rows import rows_weights

    assert any("data-parallel precompute" in row[1] for row in rows_weights(doc))


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_scaling(results_dir):
    from bench import bench_scaling

    doc = bench_scaling.run(quick=True)
    assert doc == _written(results_dir, "scaling")
    assert [m["pairs"] for m in doc["measurements"]] == [8, 16]
    assert all(m["success"] for m in doc["measurements"])
    assert all(m["peak_rss_mb"] > 0 for m in doc["measurements"])
    assert math.isfinite(doc["exponents"]["pipeline_seconds"])
    assert len(doc["exponents"]["marginal_cpu_seconds_per_pair"]) == 1
    assert isinstance(doc["targets"]["time_linear"], bool)


def test_scaling_linearity_rule_by_hand():
    """Fixed cost + per-pair cost is linear even where its log-log exponent is far below 1; n^1.3 is not."""
    from bench.bench_scaling import grows_linearly, marginal_costs
    from bench.common import loglog_slope

    pairs = [500, 2000, 8000]
    affine = [60 + 0.02 * n for n in pairs]  # 70, 100, 220 s
    assert marginal_costs(pairs, affine) == pytest.approx([0.02, 0.02])
    exponent, two_largest = loglog_slope(pairs, affine), loglog_slope(pairs[1:], affine[1:])
    assert two_largest < 0.85  # what the former rule (two-largest exponent >= 0.85) failed
    assert grows_linearly(exponent, two_largest, marginal_costs(pairs, affine))
    power = [0.001 * n**1.3 for n in pairs]
    assert not grows_linearly(
        loglog_slope(pairs, power), loglog_slope(pairs[1:], power[1:]), marginal_costs(pairs, power)
    )
    # A growing per-pair cost fails even when the exponents stay under 1.15.
    assert not grows_linearly(1.0, 1.1, [0.02, 0.03])


def test_quality_reuses_only_runs_made_with_the_same_sizes():
    from bench.bench_quality import REUSE_KEYS, reusable_runs

    sizes = {k: 1 for k in REUSE_KEYS} | {"seeds": [0, 1, 2], "plan": {"middle": {}}}
    run = {"method": "dpo", "seed": 1, "reward_accuracy": 0.9}
    previous = {
        "commit": "abc",
        "sizes": sizes | {"plan": {"other": {}}},
        "span_position": {
            "middle": {"runs": [run], "ablations": {"tidpo_no_kl (alpha=0)": {"reward_accuracy": 0.5}}}
        },
    }
    found = reusable_runs(previous, sizes, "middle")
    assert found[("dpo", 1)] == run | {"reused_from": "abc"}
    assert found[("tidpo_no_kl (alpha=0)", 0)]["reused_from"] == "abc"
    assert reusable_runs(previous, sizes, "uniform") == {}
    assert reusable_runs(previous | {"sizes": sizes | {"pairs": 2}}, sizes, "middle") == {}
    assert reusable_runs(None, sizes, "middle") == {}


def test_quality(results_dir):
    from bench import bench_quality

    doc = bench_quality.run(quick=True)
    assert doc == _written(results_dir, "quality")
    assert set(doc["methods"]) == {*bench_quality.METHODS, "tidpo_authors_per_step"}
    assert 0.0 <= doc["methods"]["tidpo"]["reward_accuracy"]["mean"] <= 1.0
    assert doc["authors_per_step"]["default_over_authors"] > 0
    assert set(doc["targets"]) == {"middle/tidpo", "middle/tidpo_surprisal", "middle/tidpo_contrastive"}
    assert isinstance(doc["notes"], list) and doc["notes"]


def test_importance(results_dir):
    from bench import bench_importance

    bench_importance.run(quick=True)
    doc = _written(results_dir, "importance")
    for position in ("middle", "uniform"):
        rows = doc["span_position"][position]
        for name in (*bench_importance.ESTIMATORS, "prior", "uniform_weights"):
            assert 0.0 <= rows[name]["precision_at_k"] <= 1.0, (position, name)
        assert rows["responses"]["all"] == sum(rows["responses"][t] for t in ("start", "middle", "end"))
    assert doc["best_estimator_uniform"] in bench_importance.ESTIMATORS


def test_importance_with_a_pretrained_reference(results_dir):
    from bench import bench_importance

    doc = bench_importance.run_pretrained("smollm2-135m-instruct", quick=True)
    assert doc == _written(results_dir, "importance-smollm2-135m-instruct")
    for position in ("middle", "uniform"):
        rows = doc["span_position"][position]
        assert rows["responses"]["all"] > 0
        for name in (*bench_importance.ESTIMATORS, "prior", "uniform_weights"):
            assert 0.0 <= rows[name]["precision_at_k"] <= 1.0, (position, name)
        # The contrastive pair was fine-tuned from the model at the pretrained rate.
        assert doc["contrastive"][position]["recipe"]["sft_learning_rate"] == 2e-5
    assert isinstance(doc["target"]["contrastive hybrid precision@k at uniform >= 0.8"], bool)


def test_hh(results_dir, shared_data):
    from bench import bench_hh

    doc = bench_hh.run(quick=True)
    assert doc == _written(results_dir, "hh")
    assert doc["setup"]["data_info"]["train"] == 24
    assert set(doc["methods"]) == set(bench_hh.HH_METHODS)


def test_grpo(results_dir, shared_data):
    """The GRPO baseline's comparison on both data sets, tiny: every method on every data set, a reward model on
    HH-RLHF, a verdict per metric, and the README rows render."""
    from bench import bench_grpo, readme_rows

    doc = bench_grpo.run(quick=True)
    assert doc == _written(results_dir, "grpo")
    for name in ("builtin", "hh"):
        data = doc["datasets"][name]
        assert set(bench_grpo.METHODS) <= set(data["methods"]), name
        assert data["methods"]["grpo"]["train_seconds"]["mean"] > 0
        assert data["verdicts"]["train_seconds"]["best"] in bench_grpo.METHODS
    assert doc["datasets"]["builtin"]["reward"].startswith("rule reward")
    assert doc["datasets"]["hh"]["reward"].startswith("reward model")
    assert 0.0 <= doc["datasets"]["hh"]["reward_model"]["held_out_accuracy"] <= 1.0
    rows = readme_rows.rows_grpo(doc)
    assert any("reward model" in row[1] for row in rows)
    assert any(row[1].startswith("wall-clock training time") for row in rows)


def test_grpo_verdicts_by_hand():
    from bench import bench_grpo

    table = {
        "reference": {"reward_accuracy": {"mean": 0.9, "std": 0.0}},
        "dpo": {"reward_accuracy": {"mean": 0.70, "std": 0.02}, "train_seconds": {"mean": 40.0, "std": 2.0}},
        "grpo": {
            "reward_accuracy": {"mean": 0.60, "std": 0.05},
            "train_seconds": {"mean": 350.0, "std": 10.0},
        },
        "tidpo": {
            "reward_accuracy": {"mean": 0.72, "std": 0.03},
            "train_seconds": {"mean": 60.0, "std": 3.0},
        },
    }
    out = bench_grpo.verdicts(table)
    # The reference is not a method; 0.72 - 0.70 = 0.02 < 0.03 + 0.02: within the spread.
    assert (out["reward_accuracy"]["best"], out["reward_accuracy"]["runner_up"]) == ("tidpo", "dpo")
    assert out["reward_accuracy"]["separated"] is False
    # Lower is better for time: 60 - 40 = 20 > 2 + 3.
    assert (out["train_seconds"]["best"], out["train_seconds"]["runner_up"]) == ("dpo", "tidpo")
    assert out["train_seconds"]["separated"] is True
    assert set(out) == {"reward_accuracy", "train_seconds"}
    table["dpo"]["reward_accuracy"]["mean"] = 0.72
    assert bench_grpo.verdicts(table)["reward_accuracy"]["tied"] == ["dpo", "tidpo"]


def test_readme_table_between_markers(tmp_path, capsys):
    from bench import update_readme

    results = tmp_path / "r"
    results.mkdir()
    (results / "weights.json").write_text(
        json.dumps(
            {
                "benchmark": "weights",
                "commit": "abc",
                "machine": {"cpu_model": "cpu", "usable_cores": 2, "torch": "2"},
                "tokens_per_s": {"importance": 900.0, "forward_backward": 1000.0},
                "ratios": {"importance_over_forward_backward": 1.11},
                "target": {"met": True},
            }
        )
    )
    (results / "weights-quick.json").write_text("{not json")  # smoke files are never read
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nafter\n")
    assert update_readme.update(readme, results)
    text = readme.read_text()
    assert "old table" not in text and "token-weight precompute" in text and "1.11x" in text
    assert text.startswith("# x\n") and text.endswith("<!-- bench:end -->\n\nafter\n")
    # Idempotent: a second refresh gives the same file.
    update_readme.update(readme, results)
    assert readme.read_text() == text

    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    assert not update_readme.update(bare, results)
    assert bare.read_text() == "# no markers\n"
    assert "warning" in capsys.readouterr().out


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_gpu_check_harness_runs_its_kill_and_resume_rows_on_cpu(tmp_path, monkeypatch):
    """The GPU check needs a GPU (without one it exits 2); its harness (launch, SIGKILL, re-run, compare)
    and the LoRA row run on CPU here, so it cannot rot between GPU sessions."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # gpu_check adds tests/ itself
    from train_fixtures import build_tiny_data, single_thread

    from bench import gpu_check

    if not gpu_check.torch.cuda.is_available():
        assert gpu_check.main(["--work", str(tmp_path / "none")]) == 2
    with single_thread():
        data = build_tiny_data(tmp_path / "data", pairs=40)  # 10 steps: the kill after step 5 lands
    row = gpu_check._kill_and_resume(data, tmp_path, "cpu", lambda: None, cpu=True, mixed_precision="no")
    assert row["resumed_from"] == "step_4" and row["steps"] == 10 and row["steps_after_resume"] == 6
    assert row["resume_max_abs_diff"] == 0.0
    lora = gpu_check.check_lora(data, tmp_path, {})
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"]


def test_contention_workers_time_a_stage_under_each_policy_and_the_table_renders():
    from bench import bench_contention, readme_rows

    sizes = bench_contention._sizes(quick=True)
    default = bench_contention._run_together(1, "sample", "default", sizes)[0]
    policy = bench_contention._run_together(2, "sample", "tidpo", sizes)
    assert default["seconds"] > 0 and all(r["seconds"] > 0 for r in policy)
    # torch's default on this machine (one thread per core), against the policy's count for this model.
    from tidpo_core.runtime.threads import available_cpus, decide_threads

    assert default["threads"] == (__import__("os").cpu_count() or 1)
    assert policy[0]["threads"] == decide_threads(available_cpus(), policy[0]["parameters"]).intra_op
    doc = {
        "stages": {
            "weights": {
                "default": {"slowdown": 13.5},
                "tidpo": {"slowdown": 1.5},
                "tidpo_idle_cost": 1.02,
                "slowdown_target_met": True,
                "idle_cost_target_met": True,
            },
            "train": {
                "default": {"slowdown": 3.6},
                "tidpo": {"slowdown": 2.6},
                "fair_share_slowdown": 2.55,
                "tidpo_idle_cost": 1.0,
                "slowdown_target_met": False,
                "idle_cost_target_met": True,
            },
        },
        "targets": {"slowdown_with_two_processes": 2.5, "idle_cost": 1.05},
    }
    weights, train = readme_rows.rows_contention(doc)
    assert weights[2] == "13.50x vs 1.50x; idle 1.02x" and weights[3] == "<= 2.5x: met; idle <= 1.05x: met"
    assert (
        train[2] == "3.60x vs 2.60x (one thread each: 2.55x); idle 1.00x"
        and train[3] == "<= 2.5x: not met; idle <= 1.05x: met"
    )


def test_the_fair_share_setting_runs_each_worker_on_one_fixed_thread(monkeypatch):
    from bench import bench_contention

    calls = []
    monkeypatch.setattr(
        bench_contention, "_run_together", lambda *args, **kwargs: calls.append((args, kwargs)) or []
    )
    bench_contention._run_setting(2, "train", bench_contention.ONE_THREAD_EACH, {})
    bench_contention._run_setting(1, "train", "tidpo", {})
    assert calls == [((2, "train", "default", {}), {"threads": 1}), ((1, "train", "tidpo", {}), {})]
    assert bench_contention._environment("default", threads=1)["TIDPO_NUM_THREADS"] == "1"
