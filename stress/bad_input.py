"""Scenario: bad input. Thousands of generated rows in hundreds of files, junk files, the same through the
inbox of a materialization, and the hypothesis property tests with many examples."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from stress.config import ROOT
from stress.datadir import db_contents
from stress.fuzz import fuzz_file, junk_files
from stress.verdict import Verdict


def _load_fuzz_files(fuzz_dir: Path, files: int) -> dict[str, Any]:
    """Generate and load `files` fuzz files: every row must be accepted or quarantined, none crash the loader."""
    from tidpo_core.data.files import load_preferences
    from tidpo_core.data.pairs import DataFileError

    rng = random.Random(1234)
    fuzz_dir.mkdir(parents=True)
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    crashes, lost, refused_with_data = [], 0, 0
    for i in range(files):
        path, expected = fuzz_file(rng, fuzz_dir, i)
        try:
            result = load_preferences(path)
        except DataFileError:
            tally["files_refused"] += 1
            refused_with_data += 1  # a generated file always holds some decodable rows
            continue
        except Exception as exc:  # noqa: BLE001 - a crash is what this counts
            crashes.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        tally["rows_read"] += result.rows_read
        tally["accepted"] += result.accepted
        tally["quarantined"] += len(result.quarantined)
        lost += expected - result.accepted - len(result.quarantined)
        reasons.update(result.reason_counts())
    return {
        "rows_read": tally["rows_read"],
        "rows_accepted": tally["accepted"],
        "rows_quarantined": tally["quarantined"],
        "quarantine_reasons": dict(sorted(reasons.items())),
        "rows_lost": lost,
        "crashes": crashes,
        "files_with_data_refused": refused_with_data,
    }


def _junk_refused_naming_the_file(junk: list[Path]) -> int:
    from tidpo_core.data.files import load_preferences
    from tidpo_core.data.pairs import DataFileError

    named = 0
    for path in junk:
        try:
            load_preferences(path)
        except DataFileError as exc:
            named += path.name in str(exc)
    return named


def _bad_input_pipeline(work: Path, fuzz_dir: Path, junk: Path) -> dict[str, Any]:
    """Messy files in the inbox: the asset stores what is good, the check reports the quarantine share;
    a junk file in the inbox fails the asset naming it and leaves the stored rows unchanged."""
    import dagster as dg

    from tidpo_pipeline.checks import ALL_CHECKS
    from tidpo_pipeline.definitions import ASSETS
    from tidpo_pipeline.resources import build_resources

    data_dir = work / "inbox_run"
    inbox = data_dir / "inbox"
    inbox.mkdir(parents=True)
    for path in sorted(fuzz_dir.iterdir())[:40]:
        shutil.copy(path, inbox / path.name)
    config = {
        "ops": {"preference_pairs": {"config": {"synthetic_pairs": 50}}},
        # The junk file's failure is expected: keep its traceback out of the report.
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
    }

    def materialize() -> Any:
        return dg.materialize(
            [*ASSETS, *ALL_CHECKS],
            resources=build_resources(str(data_dir)),
            run_config=config,
            selection=["preference_pairs"],
            raise_on_error=False,
        )

    result = materialize()
    meta = result.asset_materializations_for_node("preference_pairs")[0].metadata
    check = next(
        c for c in result.get_asset_check_evaluations() if c.check_name == "quarantine_share_below_limit"
    )
    before = db_contents(data_dir)
    shutil.copy(junk, inbox / junk.name)
    failed = materialize()
    message = "".join(
        e.event_specific_data.error.to_string()
        for e in failed.all_events
        if getattr(e.event_specific_data, "error", None)
    )
    return {
        "inbox_run_success": result.success,
        "inbox_rows_read": meta["rows_read"].value,
        "inbox_quarantine_share_metadata": round(meta["quarantine_share"].value, 4),
        "inbox_quarantine_share_check": round(check.metadata["quarantine_share"].value, 4),
        "junk_in_inbox_fails_asset_naming_file": (not failed.success) and junk.name in message,
        "junk_in_inbox_stored_rows_unchanged": db_contents(data_dir) == before,
    }


def _property_tests(examples: int) -> subprocess.CompletedProcess[str]:
    """tests/test_data_properties.py with `examples` hypothesis examples per test."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data_properties.py"],
        cwd=ROOT,
        env={**os.environ, "TIDPO_PROPERTY_EXAMPLES": str(examples)},
        capture_output=True,
        text=True,
    )


def scenario_bad_input(work: Path, files: int = 300, property_examples: int = 300) -> Verdict:
    print(
        f"\n== bad input: {files} generated files, junk files, property tests ({property_examples} examples each)"
    )
    fuzz_dir = work / "fuzz"
    loaded = _load_fuzz_files(fuzz_dir, files)
    junk = junk_files(work / "junk")
    junk_named = _junk_refused_naming_the_file(junk)
    pipeline = _bad_input_pipeline(work, fuzz_dir, junk[1])
    prop = _property_tests(property_examples)
    detail = {
        "files_tried": files,
        "junk_files_tried": len(junk),
        **loaded,
        "junk_files_refused_naming_the_file": junk_named,
        "property_tests_passed": prop.returncode == 0,
        "property_examples_per_test": property_examples,
        "property_output_tail": prop.stdout[-600:] if prop.returncode else "",
        **pipeline,
    }
    print(json.dumps({k: v for k, v in detail.items() if k != "quarantine_reasons"}, indent=1))
    return _verdict(detail)


def _verdict(bad: dict[str, Any]) -> Verdict:
    """Passed: no loader crash, the property tests passed, every junk file refused naming itself, and junk in
    the inbox fails the asset without touching the stored rows."""
    passed = (
        not bad["crashes"]
        and bad["property_tests_passed"]
        and bad["junk_files_refused_naming_the_file"] == bad["junk_files_tried"]
    )
    passed = (
        passed and bad["junk_in_inbox_fails_asset_naming_file"] and bad["junk_in_inbox_stored_rows_unchanged"]
    )
    rows = [
        ("input files tried (generated + junk)", f"{bad['files_tried']} + {bad['junk_files_tried']}"),
        (
            "property-test examples",
            f"{bad['property_examples_per_test']} per test, passed: {bad['property_tests_passed']}",
        ),
        ("rows read", bad["rows_read"]),
        ("rows accepted", bad["rows_accepted"]),
        ("rows quarantined", bad["rows_quarantined"]),
        ("loader crashes on a row", len(bad["crashes"])),
        (
            "junk files refused, naming the file",
            f"{bad['junk_files_refused_naming_the_file']} / {bad['junk_files_tried']}",
        ),
        (
            "quarantine share (asset metadata / check)",
            f"{bad['inbox_quarantine_share_metadata']} / {bad['inbox_quarantine_share_check']}",
        ),
    ]
    return Verdict("bad_input", bool(passed), bad, rows, rows_lost=bad["rows_lost"])
