"""Scenario: concurrency. Several materializations at once against one data dir either run, or fail fast
with a message naming the run that holds it; the stores stay readable and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from stress.config import BUSY, ROOT, stress_config
from stress.datadir import Baseline, compare_to_baseline, stores_readable
from stress.processes import Worker, dagster_cli, run_worker, spawn
from stress.verdict import Verdict
from tidpo_core.runtime.layout import DATABASE_FILE


def _is_busy(result: dict[str, Any]) -> bool:
    return any(BUSY in e for e in result["errors"])


def _whole_job_pair(work: Path, config: dict[str, Any], baseline: Baseline | None) -> dict[str, Any]:
    print("\n== concurrency: two whole-job runs at once on one fresh data dir (fail-fast lock)")
    data_dir = work / "concurrent"
    pair = [spawn(data_dir, config, work / "logs", f"concurrent_job_{i}") for i in range(2)]
    results = [w.finish() for w in pair]
    fail_seconds = [round(r.get("seconds", 0), 2) for r in results if not r["success"]]
    job_pair = {
        "succeeded": sum(r["success"] for r in results),
        "failed_fast_with_busy_message": sum(_is_busy(r) for r in results),
        "other_failures": [r["errors"][-1][-400:] for r in results if not r["success"] and not _is_busy(r)],
        "busy_failure_seconds": fail_seconds,
        "busy_message": next(
            (e.splitlines()[0][-400:] for r in results for e in r["errors"] if BUSY in e), ""
        ),
        **stores_readable(data_dir),
    }
    if baseline is not None:
        job_pair["comparison_to_uninterrupted"] = compare_to_baseline(data_dir, baseline)
    print(f"   {job_pair}")
    return job_pair


def _three_at_once(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    print("== concurrency: three preference_pairs runs at once, two rounds")
    rounds = []
    many_dir = work / "concurrent_many"
    for r in range(2):
        group = [
            spawn(many_dir, config, work / "logs", f"many_{r}_{i}", select="preference_pairs")
            for i in range(3)
        ]
        outs = [w.finish() for w in group]
        rounds.append(
            {
                "succeeded": sum(o["success"] for o in outs),
                "busy": sum(_is_busy(o) for o in outs),
                "other_failures": sum(1 for o in outs if not o["success"] and not _is_busy(o)),
            }
        )
    many = {"rounds": rounds, **stores_readable(many_dir)}
    print(f"   {many}")
    return many


def _serialized(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    print("== concurrency: two runs with lock_timeout_s set (they serialize)")
    serial_dir = work / "serialized"
    selection = "preference_pairs,reference_model"
    waiting = [
        spawn(serial_dir, config, work / "logs", f"serial_{i}", select=selection, lock_wait=600)
        for i in range(2)
    ]
    serial_results = [w.finish() for w in waiting]
    serialized = {"succeeded": sum(r["success"] for r in serial_results), **stores_readable(serial_dir)}
    print(f"   {serialized}")
    return serialized


def _reader_holding_file(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    print("== concurrency: a reader holds the DuckDB file open while a run starts")
    logs = work / "logs"
    reader_dir = work / "reader"
    run_worker(reader_dir, config, logs, "reader_setup", select="preference_pairs")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb; c = duckdb.connect(sys.argv[1], read_only=True); print('open', flush=True); time.sleep(12)",
            str(reader_dir / DATABASE_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    holder.stdout.readline()
    with_reader = run_worker(reader_dir, config, logs, "reader_run", select="preference_pairs")
    holder.wait()
    reader = {"run_succeeded_after_reader_let_go": with_reader["success"], **stores_readable(reader_dir)}
    print(f"   {reader}")
    return reader


def _cli_multiprocess_pair(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    print("== concurrency: two `dagster asset materialize` (multiprocess executor) at once")
    cli_dir = work / "cli_concurrent"
    dagster, env = dagster_cli(work / "cli_concurrent_home", cli_dir)
    cli_config = work / "cli_concurrent.json"
    cli_config.write_text(json.dumps({"ops": {"preference_pairs": config["ops"]["preference_pairs"]}}))
    command = [
        dagster,
        "asset",
        "materialize",
        "-m",
        "tidpo_pipeline.definitions",
        "--select",
        "preference_pairs",
        "-c",
        str(cli_config),
    ]
    # Dagster creates its sqlite tables on first use, and two first uses at once race on them (a
    # Dagster matter, not tidpo's): set the instance up once, as a first `make run` would.
    subprocess.run(
        [dagster, "instance", "migrate"], env={**os.environ, **env}, cwd=ROOT, capture_output=True, check=True
    )
    procs = [Worker(command, work / "logs" / f"cli_concurrent_{i}.log", env=env) for i in range(2)]
    codes = []
    for p in procs:
        p.popen.wait(timeout=600)
        p.close_log()
        codes.append(p.popen.returncode)
    busy = sum(BUSY in p.log_path.read_text() for p in procs)
    cli = {
        "exit_codes": codes,
        "succeeded": codes.count(0),
        "busy_messages": busy,
        **stores_readable(cli_dir),
    }
    print(f"   {cli}")
    return cli


def scenario_concurrency(work: Path, baseline: Baseline | None) -> Verdict:
    """Concurrent runs five ways; the whole-job pair is compared with the baseline when there is one."""
    config = stress_config()
    detail = {
        "runs_tried": 2 + 6 + 2 + 1 + 2,
        "whole_job_pair": _whole_job_pair(work, config, baseline),
        "three_at_once": _three_at_once(work, config),
        "serialized_with_lock_timeout": _serialized(work, config),
        "reader_holding_file": _reader_holding_file(work, config),
        "cli_multiprocess_pair": _cli_multiprocess_pair(work, config),
    }
    return _verdict(detail)


def _verdict(conc: dict[str, Any]) -> Verdict:
    """Passed: of each pair at once one runs and the other fails fast as busy (or both run), nothing fails
    otherwise, lock_timeout_s serializes, a reader holding the file only delays a run, and after every
    part DuckDB and MLflow open with no integrity problem and no version of an unfinished run."""
    pair, cli = conc["whole_job_pair"], conc["cli_multiprocess_pair"]
    parts = (
        pair,
        conc["three_at_once"],
        conc["serialized_with_lock_timeout"],
        conc["reader_holding_file"],
        cli,
    )
    passed = pair["succeeded"] >= 1 and not pair["other_failures"]
    passed &= pair["succeeded"] + pair["failed_fast_with_busy_message"] == 2
    passed &= all(r["other_failures"] == 0 for r in conc["three_at_once"]["rounds"])
    passed &= conc["serialized_with_lock_timeout"]["succeeded"] == 2
    passed &= conc["reader_holding_file"]["run_succeeded_after_reader_let_go"]
    passed &= cli["succeeded"] >= 1 and cli["succeeded"] + cli["busy_messages"] == 2
    for part in parts:
        passed &= part.get("duckdb_readable") is True and part.get("mlflow_readable") is True
        passed &= not part.get("integrity_problems") and not part.get("versions_with_unfinished_run")
    readable = all(v.get("duckdb_readable") is True and v.get("mlflow_readable") is True for v in parts)
    rows = [
        ("concurrent runs tried", conc["runs_tried"]),
        (
            "concurrent job pair: succeeded / failed fast (busy)",
            f"{pair['succeeded']} / {pair['failed_fast_with_busy_message']} in {pair['busy_failure_seconds']} s",
        ),
        ("stores readable after concurrency", readable),
    ]
    comparison = pair.get("comparison_to_uninterrupted")
    return Verdict(
        "concurrency", bool(passed), conc, rows, rows_lost=comparison["rows_lost"] if comparison else 0
    )
