"""Scenario: the tests marked `slow` (the benchmark harnesses, DDP stopped by a signal), which `make test`
leaves out to fit CI's budget."""

from __future__ import annotations

import subprocess
import sys
import time

from stress.config import ROOT
from stress.verdict import Verdict


def scenario_slow_tests() -> Verdict:
    started = time.monotonic()
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "slow",
            "--timeout",
            "900",
            "tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last_line = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    detail = {
        "passed": tests.returncode == 0,
        "summary": last_line,
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": tests.stdout[-2000:] if tests.returncode else "",
    }
    print(f"slow tests: {last_line}")
    return Verdict("slow_tests", detail["passed"], detail, [("slow tests (pytest -m slow)", last_line)])
