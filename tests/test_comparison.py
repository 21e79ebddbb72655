"""The method comparison: aggregation by hand, and the asset end to end on a tiny config."""

import csv
import math

import dagster as dg
import pytest
from mlflow import MlflowClient
from pipeline_config import small_run_config

from tidpo_core import store
from tidpo_core.evaluation.comparison import (
    DEFAULT_METHODS,
    ESTIMATOR_METHODS,
    METHODS,
    ComparisonInputs,
    ComparisonResult,
    ComparisonRun,
    aggregate,
    method_train_config,
    run_method_comparison,
)
from tidpo_core.evaluation.comparison_judge import length_controlled_win_rate, win_rate
from tidpo_core.evaluation.comparison_report import comparison_markdown, tradeoff_points
from tidpo_core.runtime import tracking
from tidpo_pipeline.assets.anchors import anchor_responses
from tidpo_pipeline.assets.compare import method_comparison
from tidpo_pipeline.assets.pairs import preference_pairs
from tidpo_pipeline.assets.reference import reference_model
from tidpo_pipeline.assets.weights import token_weights
from tidpo_pipeline.definitions import defs
from tidpo_pipeline.resources import build_resources


def test_aggregate_mean_and_sample_std_by_hand():
    runs = [
        ComparisonRun("dpo", 0, {"reward_accuracy": 0.5, "kl_to_reference": 1.0}),
        ComparisonRun("dpo", 1, {"reward_accuracy": 0.7, "kl_to_reference": float("nan")}),
        ComparisonRun("tidpo", 0, {"reward_accuracy": 0.9}),
    ]
    table = aggregate(runs)
    assert [r["method"] for r in table] == ["dpo", "tidpo"]
    dpo, tidpo = table
    assert dpo["seeds"] == 2 and dpo["reward_accuracy_mean"] == pytest.approx(0.6)
    assert dpo["reward_accuracy_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert dpo["kl_to_reference_mean"] == 1.0 and math.isnan(dpo["kl_to_reference_std"])
    assert math.isnan(tidpo["reward_accuracy_std"])
    markdown = comparison_markdown(table, ["reward_accuracy", "kl_to_reference"])
    assert "| reward_accuracy | 0.600 ± 0.141 | 0.900 |" in markdown
    assert "| kl_to_reference | 1.000 | n/a |" in markdown
    assert ComparisonResult(runs, table, 0.0).methods() == ["dpo", "tidpo"]


def test_each_method_is_one_switch():
    inputs = ComparisonInputs("db", "ref", "w", "a", weight_lambda=0.7)
    configs = {m: method_train_config(m, 3, inputs, "out", {"max_steps": 5, "gamma": 0.2}) for m in METHODS}
    assert configs["dpo"].loss_type == "dpo" and configs["simpo"].loss_type == "simpo"
    assert configs["tidpo"].weight_lambda == 0.7 and configs["tidpo"].gamma == 0.2
    assert configs["tidpo_no_attribution"].weight_lambda == 0.0
    assert configs["tidpo_no_prior"].weight_lambda == 1.0
    assert configs["tidpo_no_triplet"].gamma == 0.0 and configs["tidpo_no_triplet"].weight_lambda == 0.7
    assert configs["grpo"].loss_type == "grpo" and configs["grpo"].is_grpo
    assert all(c.seed == 3 and c.max_steps == 5 and c.checkpoint_every == 0 for c in configs.values())
    assert "grpo" not in DEFAULT_METHODS and set(DEFAULT_METHODS) | {"grpo"} | set(ESTIMATOR_METHODS) == set(
        METHODS
    )
    assert all(configs[m].weights_fingerprint == "w" for m in METHODS)
    with pytest.raises(ValueError):
        method_train_config("ppo", 0, inputs, "out", {})


def test_an_estimator_method_trains_on_its_own_weight_table():
    inputs = ComparisonInputs("db", "ref", "w", "a", weights_by_method={"tidpo_contrastive": "w-contrastive"})
    contrastive = method_train_config("tidpo_contrastive", 0, inputs, "out", {})
    assert contrastive.loss_type == "tidpo" and contrastive.weights_fingerprint == "w-contrastive"
    assert method_train_config("tidpo", 0, inputs, "out", {}).weights_fingerprint == "w"
    with pytest.raises(ValueError, match="weights_by_method"):  # before anything is read or trained
        run_method_comparison(ComparisonInputs("db", "ref", "w", "a"), "out", methods=["tidpo_surprisal"])


def test_win_rate_counts_a_tie_as_half_by_hand():
    rate, stderr = win_rate([1.0, 0.2, 0.5, 3.0], [0.0, 0.4, 0.5, 1.0])  # win, loss, tie, win
    assert rate == pytest.approx(2.5 / 4)
    outcomes = [1.0, 0.0, 0.5, 1.0]
    mean = sum(outcomes) / 4
    assert stderr == pytest.approx(math.sqrt(sum((o - mean) ** 2 for o in outcomes) / 3) / 2)
    assert win_rate([1.0], [1.0])[0] == 0.5 and math.isnan(win_rate([1.0], [1.0])[1])
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _outcomes(wins: int, losses: int) -> tuple[list[float], list[float]]:
    """(rewards, baseline rewards) for `wins` won and `losses` lost prompts."""
    return [1.0] * wins + [0.0] * losses, [0.5] * (wins + losses)


def test_length_control_with_equal_lengths_is_the_plain_win_rate():
    rewards, baseline = [1.0, 0.2, 0.5, 3.0], [0.0, 0.4, 0.5, 1.0]  # win, loss, tie, win
    assert length_controlled_win_rate(rewards, baseline, [7, 7, 7, 7], [3, 3, 3, 3]) == 2.5 / 4


def test_length_control_of_two_length_groups_by_hand():
    # Longer answers (d = +10) win 8 of 10, shorter ones (d = -10) win 4 of 10. tanh(d / std d) takes two
    # values, +-c, so the model is saturated: theta + phi c = logit 0.8 and theta - phi c = logit 0.4, and
    # the win rate at equal length is sigmoid((1.3863 - 0.4055) / 2) = sigmoid(0.4904) = 0.6202.
    longer, shorter = _outcomes(8, 2), _outcomes(4, 6)
    rewards, baseline = longer[0] + shorter[0], longer[1] + shorter[1]
    lengths = [30] * 10 + [10] * 10
    rate = length_controlled_win_rate(rewards, baseline, lengths, [20] * 20)
    assert rate == pytest.approx(_sigmoid((_logit(0.8) + _logit(0.4)) / 2), abs=1e-9)
    assert rate == pytest.approx(0.62020, abs=1e-5)
    assert win_rate(rewards, baseline)[0] == pytest.approx(0.6)


def test_a_win_that_comes_only_from_length_is_controlled_to_one_half():
    # 30 longer answers win 90 %, 10 shorter ones win 10 %: the plain win rate is 0.7, but at equal length the
    # judge is indifferent (logit 0.9 = -logit 0.1).
    longer, shorter = _outcomes(27, 3), _outcomes(1, 9)
    rewards, baseline = longer[0] + shorter[0], longer[1] + shorter[1]
    lengths = [50] * 30 + [20] * 10
    assert win_rate(rewards, baseline)[0] == pytest.approx(0.7)
    assert length_controlled_win_rate(rewards, baseline, lengths, [35] * 40) == pytest.approx(0.5, abs=1e-9)


def test_length_control_agrees_with_an_independent_logistic_fit():
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    lengths, baseline_lengths = rng.integers(20, 90, 200), rng.integers(5, 60, 200)  # mostly longer
    d = (lengths - baseline_lengths).astype(float)
    x = np.tanh(d / d.std())
    won = rng.random(200) < 1 / (1 + np.exp(-(0.4 + 1.5 * x)))
    rewards = np.where(won, 1.0, 0.0)
    rewards[:5] = 0.5  # ties count half
    y = np.where(rewards > 0.5, 1.0, np.where(rewards == 0.5, 0.5, 0.0))

    def negative_log_likelihood(beta):
        z = beta[0] + beta[1] * x
        return float(np.sum(np.logaddexp(0.0, z) - y * z))

    fitted = optimize.minimize(
        negative_log_likelihood,
        np.zeros(2),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 10000},
    )
    expected = 1 / (1 + np.exp(-fitted.x[0]))
    rate = length_controlled_win_rate(list(rewards), [0.5] * 200, list(lengths), list(baseline_lengths))
    assert rate == pytest.approx(expected, abs=1e-6)
    assert abs(rate - win_rate(list(rewards), [0.5] * 200)[0]) > 0.01  # the control moved it


def test_length_control_needs_one_length_per_answer():
    with pytest.raises(ValueError, match="one length per answer"):
        length_controlled_win_rate([1.0, 0.0], [0.5, 0.5], [3], [3, 4])


def test_the_tradeoff_takes_one_point_per_run_that_measured_both():
    runs = [
        ComparisonRun("reference", 0, {"kl_to_reference": 0.0}),  # no win rate over itself
        ComparisonRun("dpo", 0, {"kl_to_reference": 1.5, "judged_win_rate": 0.6}),
        ComparisonRun("dpo", 1, {"kl_to_reference": float("nan"), "judged_win_rate": 0.7}),
        ComparisonRun("tidpo", 0, {"kl_to_reference": 0.4, "judged_win_rate": 0.5}),
    ]
    assert tradeoff_points(runs, "kl_to_reference", "judged_win_rate") == {
        "dpo": [(1.5, 0.6)],
        "tidpo": [(0.4, 0.5)],
    }


def test_method_comparison_job_is_separate_from_training():
    training = defs.resolve_job_def("tidpo_training")
    comparison = defs.resolve_job_def("method_comparison")
    assert "method_comparison" not in training.graph.node_dict
    assert list(comparison.graph.node_dict) == ["compare_methods"]


def test_method_comparison_runs_on_a_tiny_config_and_writes_its_table(tmp_path):
    run_config = small_run_config(pairs=24)
    del run_config["ops"]["tidpo_policy"], run_config["ops"]["evaluation"]  # not in this selection
    run_config["ops"]["reference_model"]["config"]["sft_steps"] = (
        4  # the reference's quality does not matter here
    )
    methods = [*DEFAULT_METHODS, "tidpo_surprisal"]  # the estimator method's weights are weighed by the step
    run_config["ops"]["compare_methods"] = {  # the op of asset method_comparison
        "config": {
            "methods": methods,
            "seeds": [0],
            "max_steps": 2,
            "per_device_batch_size": 4,
            "warmup_steps": 1,
            "learning_rate": 2e-3,
            "batch_size": 16,
            "sample_prompts": 3,
            "max_new_tokens": 8,
            "docs_dir": str(tmp_path / "docs"),
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
    for method in ("reference", *methods):
        assert f"{method} (n=1)" in table
    for metric in (
        "reward_accuracy",
        "kl_to_reference",
        "distinct_2",
        "precision_at_k_hybrid",
        "critical_phrase_chosen_rate",
        "judged_win_rate",  # the rule reward of the built-in data judges the sampled answers
        "judged_win_rate_length_controlled",
    ):
        assert f"| {metric} |" in table
    # the frontier, inline in the UI
    assert meta["tradeoff"].value.startswith("![tradeoff](data:image/png;base64,")
    assert meta["tradeoff_png"].value.endswith("method_comparison_tradeoff.png")
    report = meta["report_dir"].value
    with open(f"{report}/method_comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["reference", *methods]
    assert all(0.0 <= float(r["reward_accuracy_mean"]) <= 1.0 for r in rows)
    assert (tmp_path / "docs" / "img" / "method_comparison.png").stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "method_comparison_tradeoff.png").stat().st_size > 0

    con = store.connect(tmp_path / "data" / store.DATABASE_FILE, read_only=True)
    try:
        stored_methods = {
            r[0] for r in con.execute("SELECT DISTINCT method FROM method_comparison").fetchall()
        }
        weight_tables = con.execute("SELECT count(DISTINCT fingerprint) FROM token_weights").fetchone()[0]
        per_seed = con.execute(
            "SELECT count(*) FROM method_comparison_runs WHERE metric = 'reward_accuracy'"
        ).fetchone()[0]
    finally:
        con.close()
    assert stored_methods == {"reference", *methods} and per_seed == len(methods) + 1
    assert weight_tables == 2  # the paper's attribution and, for tidpo_surprisal, surprisal

    client = MlflowClient(tracking.sqlite_tracking_uri(tmp_path / "data"))
    run = client.get_run(meta["mlflow_run_id"].value)
    assert "comparison/tidpo/reward_accuracy_mean" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "method_comparison")}
    assert {"method_comparison/method_comparison.csv", "method_comparison/method_comparison.png"} <= artifacts
