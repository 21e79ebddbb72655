"""bench/bench_training.py at its tiny size: every configuration trains and the document has the figures."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # behind `make stress`, to keep `make test` inside CI's budget
def test_training_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("TIDPO_BENCH_RESULTS", str(tmp_path))
    from bench import bench_training

    out = tmp_path / "training.json"
    document = bench_training.run(quick=True, out=out, threads=1, configs=("dpo", "tidpo_online"))
    assert json.loads(out.read_text())["benchmark"] == "training"
    assert set(document["runs"]) == {"dpo", "tidpo_online"}
    for figures in document["runs"].values():
        assert figures["median_step_s"] > 0 and figures["tokens_per_s"] > 0
        assert figures["peak_rss_mb"] > 50
        assert 0 <= figures["duckdb_share"] < 1
    assert document["ratios"]["tidpo_alpha0_vs_dpo"] is None  # not measured here
    assert document["machine"]["torch"] and document["commit"]
    # The standing guard (2026-12): the weights-only step within 1.05x of DPO's.
    assert sys.modules["bench.bench_training"].TARGET_WEIGHTS_ONLY_RATIO == 1.05
    assert document["targets"]["tidpo_weights_only_vs_dpo_max"] == 1.05
