"""The benchmark table's rows for bench_real: the grid on a pretrained chat model, its answers judged again,
the estimators' precision@k on it, and TRL on it."""

from __future__ import annotations

from typing import Any

from bench.readme_rows import Row, _mark, _ms, _r
from bench.verdicts import verdicts, winner


def rows_real(doc: dict[str, Any]) -> list[Row]:
    """bench_real: the grid on a pretrained chat model, the estimators' precision@k on it, and TRL on it."""
    model = doc.get("setup", {}).get("model", "the pretrained model")
    return (
        _real_grid_rows(doc, model)
        + _real_rejudged_rows(doc)
        + _real_importance_rows(doc, model)
        + _real_trl_rows(doc, model)
    )


def _real_grid_rows(doc: dict[str, Any], model: str) -> list[Row]:
    from bench import bench_real

    table = doc.get("methods", {})
    if not table:
        return []
    rows: list[Row] = []
    split = doc["setup"]["split_info"]
    seeds = max((len(c["seeds"]) for row in table.values() for c in row.values()), default=0)
    title = f"{model}, HH-RLHF harmless-base ({split['train']} train / {split['eval']} eval, {seeds} seed{'s' if seeds != 1 else ''})"
    judge = doc.get("judge", {}).get("held_out", {})
    if judge:
        accuracy = f"{judge['eval_accuracy']:.3f} on {int(judge['eval_pairs'])} pairs"
        rows.append((title, "judge (reward model on pairs no policy saw): held-out accuracy", accuracy, ""))
        title = ""
    methods = [m for m in (*bench_real.METHODS, "reference") if m in table]
    judged = verdicts(table, bench_real.VERDICT_METRICS)
    shown = {**bench_real.VERDICT_METRICS, "mean_length": ("mean answer length, tokens", True)}
    for metric, (label, _) in shown.items():
        if not any(metric in table[m] for m in methods):
            continue
        digits = 1 if metric in ("train_seconds", "mean_length") else 3
        values = " / ".join(_ms(table[m].get(metric), digits) for m in methods)
        verdict = winner(judged[metric]) if metric in judged else ""
        rows.append((title, f"{label}: {' / '.join(methods)}", values, verdict))
        title = ""
    frontier = doc.get("frontier", {})
    if frontier:
        above = frontier["above_the_line"]
        shown = [m for m in methods if m in above]
        rows.append(
            (
                "",
                f"win rate at matched KL, above one line through all runs ({frontier['slope_per_nat']:+.3f} per nat): {' / '.join(shown)}",
                " / ".join(f"{above[m]['mean']:+.3f} ± {above[m]['std']:.3f}" for m in shown),
                "",
            )
        )
    rows += _target_rows(doc, rejudged=False)
    return rows


def _target_rows(doc: dict[str, Any], rejudged: bool) -> list[Row]:
    """The grid's targets, or (rejudged) those on the win rate at equal lengths."""
    return [
        ("", name, f"gap {target['gap']:+.3f}, spreads {target['spreads']:.3f}", _mark(target["met"]))
        for name, target in doc.get("targets", {}).items()
        if ("length_controlled" in name) == rejudged
    ]


def _real_rejudged_rows(doc: dict[str, Any]) -> list[Row]:
    """bench_real --part rejudge: the grid's answers judged again, and the win rate at equal lengths."""
    from bench import bench_real

    rejudged = doc.get("rejudged", {})
    table = rejudged.get("methods", {})
    if not table:
        return []
    methods = [m for m in (*bench_real.METHODS, "reference") if m in table]
    labels = {
        "judged_win_rate": "judged win rate, answers sampled again",
        "judged_win_rate_length_controlled": "judged win rate at equal answer lengths",
        "mean_length": "mean answer length, tokens",
    }
    judged = verdicts(table, {m: (label, True) for m, label in labels.items() if m != "mean_length"})
    rows: list[Row] = []
    title = f"the grid's answers judged again ({rejudged['prompts']} prompts per run)"
    for metric, label in labels.items():
        shown = [m for m in methods if metric in table[m]]
        values = " / ".join(_ms(table[m][metric], 1 if metric == "mean_length" else 3) for m in shown)
        rows.append(
            (
                title,
                f"{label}: {' / '.join(shown)}",
                values,
                winner(judged[metric]) if metric in judged else "",
            )
        )
        title = ""
    differences = rejudged.get("reproduces_grid", {})
    worst = max((v for v in differences.values() if v is not None), default=None)
    if worst is not None:
        rows.append(("", "largest difference from the grid's own judged figures", f"{worst:.2g}", ""))
    return rows + _target_rows(doc, rejudged=True)


def _real_importance_rows(doc: dict[str, Any], model: str) -> list[Row]:
    rows: list[Row] = []
    title = f"importance precision@k, {model} as the reference"
    for position in ("uniform", "middle"):
        rows_at = doc.get("importance", {}).get(position)
        if not rows_at:
            continue
        figures = "; ".join(
            f"{name} {row['precision_at_k']:.3f}"
            + (f" (raw {row['raw_precision_at_k']:.3f})" if "raw_precision_at_k" in row else "")
            for name, row in rows_at.items()
        )
        targets = doc.get("importance_targets", {}) if position == "uniform" else {}
        target = "; ".join(f"{k}: {_mark(v)}" for k, v in targets.items())
        rows.append((title, f"span_position {position}: hybrid (raw)", figures, target))
        title = ""
    return rows


def _real_trl_rows(doc: dict[str, Any], model: str) -> list[Row]:
    trl = doc.get("trl", {})
    if not trl:
        return []
    ratios = " / ".join(
        f"{name} {_r(row['epoch_ratio_vs_trl'])}"
        for name, row in trl.items()
        if isinstance(row, dict) and "epoch_ratio_vs_trl" in row
    )
    targets = "; ".join(f"{k}: {_mark(v)}" for k, v in doc.get("trl_targets", {}).items())
    return [
        (f"vs TRL DPOTrainer on {model}", "epoch time over TRL's (median of paired rounds)", ratios, targets),
        ("", "first-batch DPO loss, tidpo vs TRL", f"|diff| {trl['first_batch_loss_abs_diff']:.1e}", ""),
    ]
