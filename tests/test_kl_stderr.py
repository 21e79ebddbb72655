"""The sampled KL is reported with its standard error: computed by hand, against numpy/statistics, in the
metrics the run logs, and in the printed and Dagster tables as "value ± stderr"."""

import math
import statistics

import numpy as np
import pytest

from tidpo_core.evaluation.kl_estimate import kl_from_logps, mean_and_stderr
from tidpo_core.evaluation.metrics import comparison_rows, key_metric_lines, with_stderr


def test_mean_and_stderr_by_hand() -> None:
    # 1, 2, 6: mean 3; deviations -2, -1, 3 -> squares 4 + 1 + 9 = 14; var (ddof=1) 7; se sqrt(7/3)
    mean, se = mean_and_stderr([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(7 / 3))
    # -1, 1: mean 0; var (ddof=1) 2; se sqrt(2/2) = 1 -- a zero estimate with a wide error
    assert mean_and_stderr([-1.0, 1.0]) == pytest.approx((0.0, 1.0))
    # identical samples: no spread
    assert mean_and_stderr([0.5, 0.5, 0.5, 0.5]) == pytest.approx((0.5, 0.0))


def test_mean_and_stderr_matches_statistics_and_numpy() -> None:
    values = list(np.random.default_rng(7).normal(0.02, 0.3, size=37))
    mean, se = mean_and_stderr(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert se == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))


def test_mean_and_stderr_with_too_few_samples() -> None:
    mean, se = mean_and_stderr([])
    assert math.isnan(mean) and math.isnan(se)
    mean, se = mean_and_stderr([0.25])
    assert mean == 0.25 and math.isnan(se)


def test_kl_estimate_carries_the_stderr_of_the_per_sample_log_ratio_sums() -> None:
    # per-sample sums of log pi - log ref: 0.5 + 0.5 = 1.0; -0.2; 0.1 - 0.3 = -0.2 -> mean 0.2;
    # deviations 0.8, -0.4, -0.4 -> squares 0.64 + 0.16 + 0.16 = 0.96; var 0.48; se sqrt(0.16) = 0.4
    policy = [[-1.0, -2.0], [-3.2], [-0.9, -1.3]]
    reference = [[-1.5, -2.5], [-3.0], [-1.0, -1.0]]
    estimate = kl_from_logps(policy, reference)
    assert estimate.per_sample == pytest.approx([1.0, -0.2, -0.2])
    assert estimate.kl == pytest.approx(0.2)
    assert estimate.stderr == pytest.approx(0.4)
    assert estimate.kl_per_token == pytest.approx(0.6 / 5)
    metrics = estimate.as_metrics()
    assert metrics["kl_to_reference"] == pytest.approx(0.2)  # the gate's metric name is unchanged
    assert metrics["kl_to_reference_stderr"] == pytest.approx(0.4)
    assert metrics["kl_samples"] == 3.0
    empty = kl_from_logps([], [])
    assert empty.samples == 0 and math.isnan(empty.kl) and math.isnan(empty.stderr)


def test_with_stderr_formats_value_and_error() -> None:
    assert with_stderr(-0.0641, 0.0312) == "-0.064 ± 0.031"
    assert with_stderr(0.012) == "0.012"
    assert with_stderr(0.012, math.nan) == "0.012"
    assert with_stderr(math.nan, 0.1) == "n/a"


def test_printed_key_metrics_show_the_kl_with_its_stderr() -> None:
    lines = key_metric_lines(
        {
            "eval/policy/reward_accuracy": 1.0,
            "eval/reference/reward_accuracy": 0.5,
            "eval/policy/kl_to_reference": -0.0641,
            "eval/policy/kl_to_reference_stderr": 0.0312,
            "eval/reference/kl_to_reference": 0.0,
            "eval/reference/kl_to_reference_stderr": 0.0,
        },
        indent="",
    )
    # label column 26 wide; policy column as wide as "-0.064 ± 0.031" (14); reference as "0.000 ± 0.000" (13)
    assert lines == [
        "metric" + " " * 20 + "  " + " " * 8 + "policy" + "  " + " " * 4 + "reference",
        "held-out reward accuracy" + "  " + "  " + " " * 9 + "1.000" + "  " + " " * 8 + "0.500",
        "KL to the reference (nats)" + "  " + "-0.064 ± 0.031" + "  " + "0.000 ± 0.000",
    ]
    assert len({len(line) for line in lines}) == 1


def test_old_runs_without_a_stderr_print_as_before() -> None:
    lines = key_metric_lines(
        {"eval/policy/kl_to_reference": 12.345, "eval/reference/kl_to_reference": 0.0}, indent=""
    )
    assert lines[1] == "KL to the reference (nats)" + "  " + "  12.345" + "  " + "    0.000"
    assert "±" not in "".join(lines)


def test_dagster_comparison_rows_show_the_stderr_beside_the_value() -> None:
    policy = {"kl_to_reference": 0.0123, "kl_to_reference_stderr": 0.0311, "reward_accuracy": 0.75}
    reference = {"kl_to_reference": 0.0, "kl_to_reference_stderr": 0.0, "reward_accuracy": 0.5}
    rows = comparison_rows(policy, reference, ["kl_to_reference", "reward_accuracy"])
    assert rows[0] == {
        "metric": "kl_to_reference",
        "policy": "0.012 ± 0.031",
        "reference": "0.000 ± 0.000",
        "policy - reference": "0.012",
    }
    assert rows[1]["policy"] == "0.750"
