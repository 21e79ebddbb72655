"""Training speed of the engine: TI-DPO against DPO on the same tiny model and data, side by side.

    python -m bench.bench_training [--pairs N] [--quick] [--threads T] [--out bench/results/training.json]

Each configuration trains one epoch over the same pairs in its own process (`python -m tidpo_core.training`),
so its peak RSS is the training process's own. The runs are interleaved over `rounds`, every configuration
once per round, the order alternating between rounds (ABC, CBA, ...), so that drift in the machine's load
hits every configuration alike. Figures per configuration (per round, and their median):

- step time: median seconds per optimizer step, warm-up steps left out (from the engine's per-step
  `step_seconds`), and training tokens/s over the same steps;
- DuckDB share: seconds spent reading pairs, anchors and token weights from DuckDB (one bulk read at
  start-up) over the training loop's seconds, i.e. the read amortised over the steps it serves;
- peak RSS (MiB) of the training process.

A ratio between two configurations is paired: each round's step time over the other configuration's in
the same round (`ratio_rounds`), and the figure (`ratios`) is the median of those, so a single disturbed
round cannot flip a guard (bench.rounds).

Configurations: `dpo`; `tidpo_weights_only` (precomputed token weights, no triplet, alpha = 0: what the
weights alone cost over DPO); `tidpo_alpha0` (token weights + triplet: the triplet needs the policy's
log-probs of the anchor, a third sequence per pair in the same forward); `tidpo` (the paper's
alpha = 0.5, which adds a no-grad reference forward over chosen and rejected for the
full-vocabulary SeqKL); `tidpo_cached_kl` (alpha = 0.5 with SeqKL from the reference's stored top-64: no
reference forward); `tidpo_online` (weights recomputed with the current policy every step, as the
paper does). Standing guards: the weights-only step (token weights, no KL, no triplet) within 1.05x of
DPO's, since the weighting itself must stay free; the cached-KL step within 1.20x of DPO's. The live-KL
loss's ratios are reported without a target: its anchor tokens and reference pass are the method's own work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, preparation, rounds, training_runs
from tidpo_core.runtime.offline import offline_child_environment

NAME = "training"
TARGET_WEIGHTS_ONLY_RATIO = 1.05
TARGET_CACHED_KL_RATIO = 1.20
TARGET_DUCKDB_SHARE = 0.02
CONFIGS: dict[str, dict[str, Any]] = {
    "dpo": {"loss_type": "dpo"},
    "tidpo_weights_only": {"loss_type": "tidpo", "alpha": 0.0, "gamma": 0.0},
    "tidpo_alpha0": {"loss_type": "tidpo", "alpha": 0.0},
    "tidpo": {"loss_type": "tidpo", "alpha": 0.5},
    "tidpo_cached_kl": {"loss_type": "tidpo", "alpha": 0.5, "reference_kl": "cached"},
    "tidpo_online": {"loss_type": "tidpo", "alpha": 0.5, "weights_mode": "online"},
}
# The ratios reported: name -> (configuration, the configuration it is paired with in each round).
RATIOS: dict[str, tuple[str, str]] = {
    "tidpo_weights_only_vs_dpo": ("tidpo_weights_only", "dpo"),
    "tidpo_alpha0_vs_dpo": ("tidpo_alpha0", "dpo"),
    "tidpo_vs_dpo": ("tidpo", "dpo"),
    "tidpo_cached_kl_vs_dpo": ("tidpo_cached_kl", "dpo"),
    "tidpo_online_vs_tidpo": ("tidpo_online", "tidpo"),
}
NOTES = (
    "Precomputed weights make the weighting itself nearly free (tidpo_weights_only). The triplet term "
    "adds the anchor response as a third sequence per pair (policy log-probs of the anchor, with "
    "gradient), about +50% tokens per step; alpha > 0 adds a no-grad reference forward for the "
    "full-vocabulary SeqKL (tidpo_cached_kl reads the reference's stored top-64 instead: no reference forward, "
    "no second model); online weights add an attribution forward+backward. The DuckDB read "
    "happens once per run; its share is that read over the training loop's time."
)


def _sizes(quick: bool, pairs: int | None) -> dict[str, Any]:
    from tidpo_core.models.modeling import TinyModelConfig

    if quick:
        return {
            "pairs": pairs or 24,
            "rounds": 2,
            "batch": 4,
            "warmup_steps_skipped": 1,
            "sft_steps": 5,
            "anchor_new_tokens": 8,
            "max_response_tokens": 64,
            "model": TinyModelConfig(
                vocab_size=400,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
            ),
            "vocab_size": 400,
        }
    return {
        "pairs": pairs
        or 1024,  # 128 steps: a one-off start-up read (~0.15 s) is not taken for a per-step cost
        "rounds": 3,  # the median of three paired ratios: one disturbed round cannot move it past the others
        "batch": 8,
        "warmup_steps_skipped": 2,
        "sft_steps": 30,
        "anchor_new_tokens": 64,
        "max_response_tokens": 128,
        "model": TinyModelConfig(),  # the embedded default: ~1.1 M parameters, vocab 2048
        "vocab_size": 2048,
    }


def _env(threads: int) -> dict[str, str]:
    env = offline_child_environment(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(common.ROOT), env.get("PYTHONPATH", "")]),
        }
    )
    for key in ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"):
        env.pop(key, None)
    return env


def _train_once(config_path: Path, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "tidpo_core.training", "--config", str(config_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=common.ROOT, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"training failed ({config_path}):\n{result.stderr[-3000:]}")
    summary = json.loads((Path(yaml_output_dir(config_path)) / "summary.json").read_text())
    return summary


def yaml_output_dir(config_path: Path) -> str:
    import yaml

    return yaml.safe_load(config_path.read_text())["output_dir"]


def _figures(summary: dict[str, Any], skip: int) -> dict[str, float]:
    history = summary["history"]
    measured = history[skip:] if len(history) > skip + 1 else history
    step_times = [h["step_seconds"] for h in measured]
    # num_tokens is cumulative: the measured steps' tokens are the difference to the step before them.
    before = history[len(history) - len(measured) - 1]["num_tokens"] if len(measured) < len(history) else 0.0
    tokens = history[-1]["num_tokens"] - before
    timings = summary["timings"]
    loop = timings["loop_s"]
    return {
        "steps": len(history),
        "median_step_s": statistics.median(step_times),
        "mean_step_s": statistics.fmean(step_times),
        "tokens_per_s": tokens / sum(step_times) if sum(step_times) > 0 else float("nan"),
        "tokens_per_step": tokens / len(measured),
        "peak_rss_mb": summary["peak_rss_mb"],
        "duckdb_read_s": timings["duckdb_read_s"],
        "features_s": timings["features_s"],
        "model_load_s": timings["model_load_s"],
        "loop_s": loop,
        "duckdb_share": timings["duckdb_read_s"] / (loop + timings["duckdb_read_s"]),
        "duckdb_ms_per_step": 1000 * timings["duckdb_read_s"] / len(history),
        "last_loss": summary["last_loss"],
    }


def _combine(per_round: list[dict[str, float]]) -> dict[str, Any]:
    """The per-round figures and their median (medians are robust to one disturbed round)."""
    out: dict[str, Any] = {k: statistics.median([r[k] for r in per_round]) for k in per_round[0]}
    out["rounds"] = per_round
    return out


def run(
    pairs: int | None = None,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    threads: int = common.THREADS,
    configs: tuple[str, ...] = tuple(CONFIGS),
) -> dict[str, Any]:
    """Measure every configuration in `configs` on the same data; write and return the result document."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the data preparation too; restored for whoever runs next
    try:
        return _run(pairs, quick, out, threads, configs)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    pairs: int | None, quick: bool, out: str | os.PathLike | None, threads: int, configs: tuple[str, ...]
) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick, pairs)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        prepared = _prepare(Path(tmp) / "data", sizes)
        paths = _write_configs(prepared, sizes, configs, Path(tmp))
        per_round = _time_rounds(paths, _env(threads), sizes)
    runs = {name: _combine(results) for name, results in per_round.items()}
    ratios, ratio_rounds = _paired_step_ratios(per_round)
    figures = {
        "setup": _setup(prepared, sizes, runs[configs[0]]["steps"], threads),
        "runs": runs,
        "ratios": ratios,
        "ratio_rounds": ratio_rounds,
        "targets": _targets(ratios, runs),
        "notes": NOTES,
    }
    for name, value in ratios.items():
        if value is not None:
            common.log(
                NAME, f"{name}: {value:.3f}x (rounds: {', '.join(f'{r:.3f}' for r in ratio_rounds[name])})"
            )
    return common.write_results(NAME, figures, quick, started, path=None if out is None else Path(out))


def _prepare(data_dir: Path, sizes: dict[str, Any]) -> preparation.Prepared:
    from tidpo_core.data.synthetic import generate_synthetic_pairs

    common.log(NAME, f"preparing {sizes['pairs']} pairs (reference model, anchors, token weights)")
    return preparation.prepare(
        data_dir,
        generate_synthetic_pairs(sizes["pairs"], seed=0),
        eval_fraction=0.0,
        model_config=sizes["model"],
        vocab_size=sizes["vocab_size"],
        sft_steps=sizes["sft_steps"],
        anchor_new_tokens=sizes["anchor_new_tokens"],
        max_response_tokens=sizes["max_response_tokens"],
        reference_kl_top_k=preparation.REFERENCE_KL_TOP_K,
    )


def _write_configs(
    prepared: preparation.Prepared, sizes: dict[str, Any], configs: tuple[str, ...], work: Path
) -> dict[str, Path]:
    """One training config file per configuration, all on `prepared`'s data."""
    paths = {}
    for name in configs:
        config = training_runs.train_config(
            prepared,
            CONFIGS[name]["loss_type"],
            work / "runs" / name,
            per_device_batch_size=sizes["batch"],
            warmup_steps=1,
            num_epochs=1,
            **{k: v for k, v in CONFIGS[name].items() if k != "loss_type"},
        )
        paths[name] = config.to_yaml(work / f"{name}.yaml")
    return paths


def _time_rounds(
    paths: dict[str, Path], env: dict[str, str], sizes: dict[str, Any]
) -> dict[str, list[dict[str, float]]]:
    """Every configuration once per round, the order alternating between rounds; each round's figures."""

    def report(round_index: int, name: str, figures: dict[str, float]) -> None:
        common.log(
            NAME,
            f"round {round_index + 1} {name:<13} {figures['median_step_s'] * 1000:7.1f} ms/step "
            f"{figures['tokens_per_s']:8.0f} tok/s  rss {figures['peak_rss_mb']:.0f} MiB  "
            f"duckdb {100 * figures['duckdb_share']:.2f}%",
        )

    tasks = {
        name: (lambda path=path: _figures(_train_once(path, env), sizes["warmup_steps_skipped"]))
        for name, path in paths.items()
    }
    return rounds.interleaved_rounds(tasks, sizes["rounds"], report)


def _paired_step_ratios(
    per_round: dict[str, list[dict[str, float]]],
) -> tuple[dict[str, float | None], dict[str, list[float] | None]]:
    """Each RATIOS entry: the median over rounds of the per-round step-time ratio, and the per-round ratios
    (None where a configuration was not measured)."""
    medians: dict[str, float | None] = {}
    per_round_ratios: dict[str, list[float] | None] = {}
    for key, (name, baseline) in RATIOS.items():
        if name in per_round and baseline in per_round:
            steps = [r["median_step_s"] for r in per_round[name]]
            baseline_steps = [r["median_step_s"] for r in per_round[baseline]]
            per_round_ratios[key] = rounds.per_round_ratios(steps, baseline_steps)
            medians[key] = rounds.median_paired_ratio(steps, baseline_steps)
        else:
            per_round_ratios[key] = medians[key] = None
    return medians, per_round_ratios


def _within(ratio: float | None, target: float) -> bool:
    return ratio is not None and ratio <= target


def _targets(ratios: dict[str, float | None], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The standing guards, judged on the median paired ratios."""
    worst_share = max((r["duckdb_share"] for r in runs.values()), default=float("nan"))
    return {
        "judged_on": "median over rounds of the per-round step-time ratio",
        "tidpo_weights_only_vs_dpo_max": TARGET_WEIGHTS_ONLY_RATIO,
        "tidpo_weights_only_met": _within(ratios["tidpo_weights_only_vs_dpo"], TARGET_WEIGHTS_ONLY_RATIO),
        "tidpo_cached_kl_vs_dpo_max": TARGET_CACHED_KL_RATIO,
        "tidpo_cached_kl_met": _within(ratios["tidpo_cached_kl_vs_dpo"], TARGET_CACHED_KL_RATIO),
        "duckdb_share_max": TARGET_DUCKDB_SHARE,
        "duckdb_share_worst": worst_share,
        "duckdb_share_met": worst_share < TARGET_DUCKDB_SHARE,
    }


def _setup(prepared: preparation.Prepared, sizes: dict[str, Any], steps: int, threads: int) -> dict[str, Any]:
    return {
        "pairs": prepared.n_train,
        "per_device_batch_size": sizes["batch"],
        "steps_per_run": steps,
        "rounds": sizes["rounds"],
        "warmup_steps_skipped": sizes["warmup_steps_skipped"],
        "threads": threads,
        "processes": 1,
        "parameters": prepared.parameters,
        "max_response_tokens": sizes["max_response_tokens"],
        "prepare_seconds": prepared.timings,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (default 1024; quick 24)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the smoke test runs)")
    parser.add_argument(
        "--threads", type=int, default=common.THREADS, help="intra-op threads per training process"
    )
    parser.add_argument("--out", default=None, help="result file (default bench/results/training.json)")
    args = parser.parse_args(argv)
    run(pairs=args.pairs, quick=args.quick, out=args.out, threads=args.threads)


if __name__ == "__main__":
    main()
