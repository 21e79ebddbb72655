"""How evaluation metrics are shown: the few a person reads first, those drawn as training curves, and a
group for every other one.

Pure and light (no torch): `tidpo champion` and the Dagster metadata both use it.
"""

from __future__ import annotations

import math

# The metrics a person reads first, policy next to reference.
KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("reward_accuracy", "held-out reward accuracy"),
    ("likelihood_win_rate", "likelihood win rate"),
    ("kl_to_reference", "KL to the reference (nats)"),
    ("critical_phrase_chosen_rate", "safe phrase rate (sampled)"),
    ("precision_at_k_hybrid", "importance precision@k"),
    ("truthfulqa_mc1", "TruthfulQA MC1 (built-in)"),
)
# Training curves: the pair losses' (TRL's DPOTrainer names) and GRPO's mean reward (TRL's GRPOTrainer's).
CURVE_METRICS: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins", "reward")
# First matching prefix wins; anything else is "other".
METRIC_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "preference",
        ("reward_", "likelihood_win_rate", "normalized_likelihood_win_rate", "logps_", "eval_pairs"),
    ),
    ("importance", ("precision_at_k_", "critical_responses", "mean_span_tokens")),
    ("generation", ("kl_", "distinct_", "eos_rate", "mean_length", "critical_phrase_")),
    ("benchmarks", ("truthfulqa_", "ifeval_", "humaneval_")),
)


def metric_group(name: str) -> str:
    for group, prefixes in METRIC_GROUPS:
        if name.startswith(prefixes):
            return group
    return "other"


# A metric `m` estimated by sampling (the KL to the reference) carries its standard error as `m_stderr`.
STDERR_SUFFIX = "_stderr"


def _rounded(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "n/a"


def with_stderr(value: float | None, stderr: float | None = None) -> str:
    """The value rounded to 3 decimals, followed by "± <stderr>" when a finite standard error is given
    (e.g. "0.012 ± 0.031": a sampled KL of -0.064 reads as noise only next to its error)."""
    text = _rounded(value)
    if text != "n/a" and stderr is not None and math.isfinite(stderr):
        text += f" ± {stderr:.3f}"
    return text


def _shown(values: dict[str, float], name: str) -> str:
    return with_stderr(values.get(name, math.nan), values.get(name + STDERR_SUFFIX))


def comparison_rows(
    policy: dict[str, float],
    reference: dict[str, float],
    names: list[str] | None = None,
    baseline: str = "reference",
) -> list[dict[str, str]]:
    """Rows of (metric, policy, <baseline>, policy - <baseline>), rounded to 3 decimals, for `names` (all
    by default); `baseline` names what `reference` holds (e.g. "champion"). A value whose model also has
    `<metric>_stderr` is shown as "value ± stderr"."""
    rows = []
    for name in names if names is not None else list(dict.fromkeys([*policy, *reference])):
        pol, ref = policy.get(name, math.nan), reference.get(name, math.nan)
        delta = pol - ref if math.isfinite(pol) and math.isfinite(ref) else math.nan
        rows.append(
            {
                "metric": name,
                "policy": _shown(policy, name),
                baseline: _shown(reference, name),
                f"policy - {baseline}": _rounded(delta),
            }
        )
    return rows


def grouped_comparison_rows(
    policy: dict[str, float], reference: dict[str, float]
) -> dict[str, list[dict[str, str]]]:
    """comparison_rows per metric group, groups in METRIC_GROUPS order, "other" last; empty groups left out."""
    names = list(dict.fromkeys([*policy, *reference]))
    order = [group for group, _ in METRIC_GROUPS] + ["other"]
    grouped = {group: [n for n in names if metric_group(n) == group] for group in order}
    return {
        group: comparison_rows(policy, reference, members) for group, members in grouped.items() if members
    }


def key_metric_lines(metrics: dict[str, float], indent: str = "  ") -> list[str]:
    """An aligned table of KEY_METRICS from `eval/policy/...` and `eval/reference/...` entries; a metric the
    run did not measure is left out. A metric logged with its standard error (`..._stderr`, the sampled KL)
    shows as "value ± stderr"; runs logged before it was recorded print as before."""
    rows = [("metric", "policy", "reference")]
    for key, label in KEY_METRICS:
        policy, reference = metrics.get(f"eval/policy/{key}"), metrics.get(f"eval/reference/{key}")
        if policy is None:
            continue
        policy_se, reference_se = (
            metrics.get(f"eval/policy/{key}{STDERR_SUFFIX}"),
            metrics.get(f"eval/reference/{key}{STDERR_SUFFIX}"),
        )
        rows.append(
            (
                label,
                with_stderr(policy, policy_se),
                "" if reference is None else with_stderr(reference, reference_se),
            )
        )
    if len(rows) == 1:
        return []
    width = max(len(r[0]) for r in rows)
    policy_width = max(8, *(len(r[1]) for r in rows))
    reference_width = max(9, *(len(r[2]) for r in rows))
    return [
        f"{indent}{label:<{width}}  {policy:>{policy_width}}  {reference:>{reference_width}}"
        for label, policy, reference in rows
    ]


def evaluation_by_model(run_metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The evaluation's `eval/<model>/<metric>` run metrics as {model: {metric: value}}: the challenger
    (`policy`), its `reference` and, when there was one, the `champion` it was judged against."""
    by_model: dict[str, dict[str, float]] = {}
    for key, value in run_metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "eval":
            by_model.setdefault(parts[1], {})[parts[2]] = value
    return by_model
