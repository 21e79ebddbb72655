"""Scenario: crashes. The run's step process is killed with SIGKILL inside the anchors' and the token
weights' load transactions, during training, and during and right after model registration; the re-run
must end exactly where an uninterrupted run ends, and the same again through `dagster job execute`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stress.config import MARK, POLICY_TOLERANCE, stress_config
from stress.datadir import (
    Baseline,
    compare_to_baseline,
    db_contents,
    final_model,
    integrity_problems,
    registry,
    table_counts,
)
from stress.processes import Worker, dagster_cli, parent_pid, run_worker, spawn, trainer_pids, wait_for
from stress.verdict import Verdict


@dataclass
class CrashOutcome:
    point: str
    killed: bool
    detail: dict[str, Any] = field(default_factory=dict)


def _kill_at_mark(
    data_dir: Path,
    logs: Path,
    name: str,
    needle: str,
    config: dict,
    delay: float = 0.0,
    occurrence: int = 1,
    **opts: Any,
) -> CrashOutcome:
    worker = spawn(data_dir, config, logs, name, marks=True, **opts)
    line = worker.wait_line(needle, timeout=600, occurrence=occurrence)
    if line is None:
        result = worker.finish()
        return CrashOutcome(name, False, {"error": f"no '{needle}' mark", "result": result})
    if delay:
        time.sleep(delay)
    worker.kill()
    return CrashOutcome(
        name, True, {"mark": line.removeprefix(MARK).strip(), "at_s": round(worker.elapsed, 1)}
    )


def _kill_when(
    data_dir: Path, logs: Path, name: str, predicate: Callable[[], bool], config: dict, **opts: Any
) -> CrashOutcome:
    worker = spawn(data_dir, config, logs, name, marks=True, **opts)
    if (
        not wait_for(lambda: predicate() or worker.popen.poll() is not None, timeout=600, every=0.05)
        or worker.popen.poll() is not None
    ):
        return CrashOutcome(name, False, {"error": "condition never met", "result": worker.finish()})
    worker.kill()
    return CrashOutcome(name, True, {"at_s": round(worker.elapsed, 1)})


def _checkpoints(data_dir: Path) -> list[Path]:
    return list((data_dir / "models" / "policy").glob("*/checkpoints/step_*/COMPLETE.json"))


def run_baseline(work: Path) -> Baseline:
    """The uninterrupted run every crash and concurrent run is compared with; stops the stress run if it fails."""
    print("\n== crashes: uninterrupted baseline run")
    baseline_dir = work / "baseline"
    started = time.monotonic()
    base = run_worker(baseline_dir, stress_config(), work / "logs", "baseline")
    if not base["success"]:
        raise SystemExit(f"baseline run failed: {base['errors'][-1:]}")
    seconds = time.monotonic() - started
    baseline = Baseline(
        baseline_dir,
        db_contents(baseline_dir),
        final_model(baseline_dir),
        seconds,
        table_counts(baseline_dir),
    )
    print(f"   baseline: {baseline.counts} in {baseline.seconds:.0f} s")
    return baseline


def _after_kill(
    data_dir: Path, outcome: CrashOutcome, expect: Callable[[dict[str, int]], bool]
) -> CrashOutcome:
    """Record what the kill left: row counts, integrity problems, trainers still alive, expected or not."""
    wait_for(lambda: not trainer_pids(data_dir), timeout=5)  # a trainer must die with its step at once
    outcome.detail["counts_after"] = table_counts(data_dir)
    outcome.detail["integrity_problems"] = {k: v for k, v in integrity_problems(data_dir).items() if v}
    outcome.detail["trainers_left"] = len(trainer_pids(data_dir))
    outcome.detail["state_as_expected"] = bool(expect(outcome.detail["counts_after"]))
    print(f"   {outcome.point}: killed={outcome.killed} {outcome.detail}")
    return outcome


def _kill_points(
    data_dir: Path, logs: Path, config: dict[str, Any], baseline: Baseline
) -> list[CrashOutcome]:
    """The five kills, each on the data dir the previous one left, each followed by a check of its state."""
    print("== crashes: SIGKILL of the run's step process at chosen points, then re-runs")
    counts = baseline.counts
    train_pairs = counts["anchors"]

    def weights_done(c: dict[str, int]) -> bool:
        return c["weight_responses"] == counts["weight_responses"]

    def training() -> bool:
        return bool(_checkpoints(data_dir)) and bool(trainer_pids(data_dir))

    outcomes = []
    # 1. inside the anchors' load transaction (all shards at once): no anchor row; the shard files stay
    killed = _kill_at_mark(
        data_dir,
        logs,
        "kill_in_anchor_load",
        "in-transaction anchors",
        config,
        pause_in="anchors",
        pause_in_s=1.0,
    )
    outcomes.append(
        _after_kill(
            data_dir, killed, lambda c: c["anchors"] == 0 and c["pairs"] == len(baseline.contents["pairs"])
        )
    )
    # 2. inside the token weights' load transaction, likewise
    killed = _kill_at_mark(
        data_dir,
        logs,
        "kill_in_weight_load",
        "in-transaction weights",
        config,
        pause_in="weights",
        pause_in_s=1.0,
    )
    outcomes.append(
        _after_kill(data_dir, killed, lambda c: c["anchors"] == train_pairs and c["weight_responses"] == 0)
    )
    # 3. during training, once a checkpoint is complete: the trainer must die with its step
    outcomes.append(
        _after_kill(
            data_dir, _kill_when(data_dir, logs, "kill_during_training", training, config), weights_done
        )
    )
    outcomes[-1].detail["registered_versions_after"] = len(registry(data_dir)["versions"])
    # 4. during model registration (after training finished): the re-run must not register twice
    killed = _kill_at_mark(data_dir, logs, "kill_during_registration", "registering", config, delay=1.5)
    outcomes.append(_after_kill(data_dir, killed, weights_done))
    # 5. right after registration, before the MLflow run is marked finished: the re-run resumes the
    #    same MLflow run and must reuse its version, not register a second one
    killed = _kill_at_mark(
        data_dir, logs, "kill_after_registration", "registered", config, pause_after_register=30
    )
    outcomes.append(_after_kill(data_dir, killed, weights_done))
    outcomes[-1].detail["registered_versions_after"] = len(registry(data_dir)["versions"])
    return outcomes


def scenario_crashes(work: Path, baseline: Baseline, cli: bool = True) -> Verdict:
    logs = work / "logs"
    config = stress_config()
    data_dir = work / "crash"
    outcomes = _kill_points(data_dir, logs, config, baseline)
    print("== crashes: final re-run")
    final = run_worker(data_dir, config, logs, "crash_recovered")
    comparison = compare_to_baseline(data_dir, baseline)
    reg = registry(data_dir)
    recovered = final["success"] and comparison["rows_lost"] == 0 and comparison["rows_extra"] == 0
    print(
        f"   recovered: success={final['success']} {comparison} registry={len(reg['versions'])} versions, champion {reg['champion']}"
    )

    cli_result: dict[str, Any] = {"skipped": True}
    if cli:
        cli_result = _cli_crash(work, config, baseline)

    detail = {
        "baseline_seconds": round(baseline.seconds, 1),
        "baseline_counts": baseline.counts,
        "injected": sum(o.killed for o in outcomes) + cli_result.get("killed", 0),
        "kill_points": [{"point": o.point, "killed": o.killed, **o.detail} for o in outcomes],
        "recovered_run_success": final["success"],
        "recovered_equals_uninterrupted": recovered
        and comparison["pairs_equal"]
        and comparison["anchors_equal"]
        and comparison["weights_max_abs_diff"] == 0.0
        and comparison["policy_max_abs_diff"] <= POLICY_TOLERANCE,
        "comparison": comparison,
        "registry_after_recovery": {"versions": len(reg["versions"]), "champion": reg["champion"]},
        # Each kill point starts a new materialization once the previous one finished, so several versions
        # are expected; what must not happen is one MLflow run registering twice (a resumed run re-registering).
        "no_mlflow_run_registered_twice": len(reg["versions"]) == len({v["run_id"] for v in reg["versions"]}),
        "versions_sharing_an_mlflow_run": len(reg["versions"]) - len({v["run_id"] for v in reg["versions"]}),
        "cli": cli_result,
    }
    return _verdict(detail)


def _kill_training_step(first: Worker, data_dir: Path) -> int | None:
    """SIGKILL the CLI run's training step process once a checkpoint exists; its pid, or None if not found."""
    if wait_for(
        lambda: bool(_checkpoints(data_dir)) or first.popen.poll() is not None, timeout=600, every=0.05
    ):
        trainers = trainer_pids(data_dir)
        with contextlib.suppress(OSError, IndexError):
            # The training step's process (a child of the CLI's run process) is the trainer's parent.
            step = parent_pid(trainers[0])
            if step != first.popen.pid:
                os.kill(step, signal.SIGKILL)
                return step
    return None


def _cli_crash(work: Path, config: dict[str, Any], baseline: Baseline) -> dict[str, Any]:
    """The same crash through `dagster job execute` (multiprocess executor: each step its own process):
    SIGKILL the training step's process, then execute the job again."""
    print("== crashes: `dagster job execute` (multiprocess executor), SIGKILL of the training step process")
    data_dir = work / "cli_data"
    dagster, env = dagster_cli(work / "cli_home", data_dir)
    config_path = work / "cli_config.json"
    config_path.write_text(json.dumps(config))
    command = [
        dagster,
        "job",
        "execute",
        "-m",
        "tidpo_pipeline.definitions",
        "-j",
        "tidpo_training",
        "-c",
        str(config_path),
    ]
    first = Worker(command, work / "logs" / "cli_killed.log", env=env)
    killed_pid = _kill_training_step(first, data_dir)
    with contextlib.suppress(subprocess.TimeoutExpired):
        first.popen.wait(timeout=120)
    if first.popen.poll() is None:
        first.kill_group()
    first.close_log()
    trainers_left = wait_for(lambda: not trainer_pids(data_dir), timeout=10)
    # The re-run materializes the interrupted asset and what follows it; the upstream assets' outputs
    # come from the first run through the instance's IO manager, as in a re-execution from the UI.
    rerun_config = work / "cli_rerun_config.json"
    rerun_config.write_text(
        json.dumps({"ops": {k: config["ops"][k] for k in ("tidpo_policy", "evaluation")}})
    )
    rerun = [
        dagster,
        "asset",
        "materialize",
        "-m",
        "tidpo_pipeline.definitions",
        "--select",
        "tidpo_policy*",
        "-c",
        str(rerun_config),
    ]
    second = Worker(rerun, work / "logs" / "cli_recovered.log", env=env)
    second.popen.wait(timeout=900)
    second.close_log()
    comparison = compare_to_baseline(data_dir, baseline)
    outcome = {
        "killed": int(killed_pid is not None),
        "first_exit_code": first.popen.returncode,
        "trainer_died_with_step": trainers_left,
        "rerun_exit_code": second.popen.returncode,
        "comparison": comparison,
        "recovered_equals_uninterrupted": second.popen.returncode == 0
        and comparison["rows_lost"] == 0
        and comparison["rows_extra"] == 0
        and comparison["policy_max_abs_diff"] <= POLICY_TOLERANCE,
    }
    print(f"   {outcome}")
    return outcome


def _verdict(crash: dict[str, Any]) -> Verdict:
    """Passed: the recovered run equals the uninterrupted one, no MLflow run registered twice, and every
    kill was made and left whole chunks, no integrity problem and no trainer behind."""
    points = crash["kill_points"]
    passed = crash["recovered_equals_uninterrupted"] and crash["no_mlflow_run_registered_twice"]
    passed = passed and all(
        k["killed"] and k["state_as_expected"] and not k["integrity_problems"] and not k["trainers_left"]
        for k in points
    )
    clean = sum(1 for k in points if k["killed"] and k["state_as_expected"] and not k["integrity_problems"])
    rows = [
        ("crashes injected (SIGKILL)", crash["injected"]),
        ("crash states clean (whole chunks, no partial rows)", f"{clean} / {len(points)}"),
        ("recovered run equals uninterrupted run", crash["recovered_equals_uninterrupted"]),
        (
            "recovered via dagster CLI (multiprocess)",
            crash["cli"].get("recovered_equals_uninterrupted", "skipped"),
        ),
        ("MLflow runs that registered a model twice", crash["versions_sharing_an_mlflow_run"]),
        ("trainer processes left after a kill", sum(k.get("trainers_left", 0) for k in points)),
    ]
    lost = crash["comparison"]["rows_lost"] + crash["cli"].get("comparison", {}).get("rows_lost", 0)
    return Verdict("crashes", bool(passed), crash, rows, rows_lost=lost)
