"""Scenario: registry safety. A gate failure never moves `champion`; a NaN run registers nothing; a weaker
challenger that beats its reference but not the champion never takes the alias, a stronger one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stress.config import stress_config
from stress.datadir import registry
from stress.processes import run_worker, trainer_pids
from stress.verdict import Verdict


def _new_versions(after: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in after["versions"] if v["version"] not in {x["version"] for x in before["versions"]}]


def scenario_registry(data_dir: Path) -> Verdict:
    """On a data dir that already holds a trained champion."""
    logs = data_dir.parent / "logs"
    before = registry(data_dir)
    print(f"\n== registry: start with {len(before['versions'])} version(s), champion {before['champion']}")
    gate = run_worker(data_dir, stress_config(seed=1), logs, "gate_failure", gate_margin=10.0)
    after_gate = registry(data_dir)
    new_versions = _new_versions(after_gate, before)
    gate_out = {
        "run_success": gate["success"],
        "gate_check_passed": gate["checks"].get("evaluation_gate"),
        "new_versions": len(new_versions),
        "new_version_tags": [v["tags"] for v in new_versions],
        "champion_before": before["champion"],
        "champion_after": after_gate["champion"],
        "champion_unchanged": after_gate["champion"] == before["champion"],
    }
    print(f"   gate failure: {gate_out}")
    nan = run_worker(data_dir, stress_config(seed=2), logs, "nan_run", nan_at_step=3)
    after_nan = registry(data_dir)
    nan_out = {
        "run_success": nan["success"],
        "error_mentions_non_finite": any(
            "non-finite" in e.lower() or "nan" in e.lower() for e in nan["errors"]
        ),
        "new_versions": len(after_nan["versions"]) - len(after_gate["versions"]),
        "champion_unchanged": after_nan["champion"] == after_gate["champion"],
        "failed_mlflow_runs": sum(1 for r in after_nan["runs"] if r[2] == "FAILED"),
        "trainers_left": len(trainer_pids(data_dir)),
    }
    print(f"   NaN run: {nan_out}")
    return _verdict({"gate_failure": gate_out, "nan_run": nan_out, **_challengers(data_dir, logs, after_nan)})


def _challengers(data_dir: Path, logs: Path, before: dict[str, Any]) -> dict[str, Any]:
    """Scheduled retraining against a good champion: a weaker challenger (a twelfth of the steps) that
    still beats its reference never takes the alias; a stronger one (four times the steps) does."""
    outcomes: dict[str, Any] = {}
    current = before
    for name, steps, seed in (("weaker_challenger", 2, 4), ("stronger_challenger", 96, 5)):
        result = run_worker(data_dir, stress_config(steps=steps, seed=seed), logs, name)
        after = registry(data_dir)
        new = _new_versions(after, current)
        verdict = new[-1]["tags"].get("gate_verdict", "") if new else ""
        outcomes[name] = {
            "steps": steps,
            "run_success": result["success"],
            "new_versions": len(new),
            "beats_reference": verdict.startswith("reference: passed"),
            "compared_with": new[-1]["tags"].get("compared_with") if new else None,
            "verdict": verdict,
            "champion_before": current["champion"],
            "champion_after": after["champion"],
            "took_the_alias": bool(new) and after["champion"] == str(new[-1]["version"]),
        }
        print(f"   {name}: {outcomes[name]}")
        current = after
    return outcomes


def _verdict(reg: dict[str, Any]) -> Verdict:
    """Passed: the gate failure left the champion, the NaN run registered nothing and said why, the weaker
    challenger beat its reference (else nothing was tested) and was still refused, the stronger one took it."""
    passed = reg["gate_failure"]["champion_unchanged"] and reg["nan_run"]["new_versions"] == 0
    passed = passed and reg["nan_run"]["error_mentions_non_finite"]
    rows = [
        ("gate failure: champion unchanged", reg["gate_failure"]["champion_unchanged"]),
        ("NaN run: versions registered", reg["nan_run"]["new_versions"]),
        ("NaN run: failure names the non-finite loss", reg["nan_run"]["error_mentions_non_finite"]),
    ]
    if "weaker_challenger" in reg:
        weak, strong = reg["weaker_challenger"], reg["stronger_challenger"]
        passed = (
            passed
            and weak["beats_reference"]
            and not weak["took_the_alias"]
            and weak["champion_after"] == weak["champion_before"]
        )
        passed = passed and strong["took_the_alias"]
        rows += [
            (
                "weaker challenger (beats its reference): took the alias",
                f"{weak['took_the_alias']} (beats reference: {weak['beats_reference']})",
            ),
            ("stronger challenger: took the alias", strong["took_the_alias"]),
        ]
    return Verdict("registry", bool(passed), reg, rows)
