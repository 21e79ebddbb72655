"""`make stress`: what real data and real machines do to a scheduled retraining pipeline.

* bad input: thousands of generated rows in hundreds of files (malformed JSON, wrong types, missing and
  extra keys, empty texts, chosen == rejected, invalid UTF-8, NUL bytes, 1 MB texts, duplicates, mixed
  formats), files that are not data at all, and the hypothesis property tests with many examples;
* crashes: the Dagster run's step process is killed with SIGKILL inside a DuckDB transaction and between
  chunks of anchor generation and of weight computation, during training and during model
  registration; the re-run must end exactly where an uninterrupted run ends, with no partial or
  duplicated rows, and the same again through `dagster job execute` (multiprocess executor);
* concurrency: several materializations of the job at once against one data dir;
* registry safety: a gate failure never moves `champion`; a NaN run registers nothing; a weaker
  challenger that beats its reference but not the champion never takes the alias, a stronger one does;
* dependencies down and safe defaults;
* the slow tests: `pytest -m slow` (the benchmark harnesses, DDP stopped by a signal), kept out of `make
  test` so that it fits CI's budget.

Every run here is a real subprocess (`python -m stress.run worker ...` runs one `dagster.materialize` of
the asset graph, stress/worker.py) on a temporary data dir. Each scenario (one module each) returns its
verdict; the table printed at the end is assembled from them and also written to stress/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stress import report
from stress.bad_input import scenario_bad_input
from stress.concurrency import scenario_concurrency
from stress.config import RESULTS_PATH, ROOT, stress_config
from stress.crashes import run_baseline, scenario_crashes
from stress.datadir import Baseline
from stress.dependencies import scenario_dependencies
from stress.processes import run_worker
from stress.registry_safety import scenario_registry
from stress.safe_defaults import scenario_safe_defaults
from stress.slow_tests import scenario_slow_tests
from stress.verdict import Verdict
from stress.worker import worker_main

SCENARIOS = "bad_input,crashes,concurrency,registry,dependencies,safe_defaults,slow_tests"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=SCENARIOS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    parser.add_argument("--no-cli", action="store_true", help="skip the `dagster job execute` crash")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--property-examples", type=int, default=200)
    return parser.parse_args(argv)


def run_scenarios(args: argparse.Namespace, work: Path, verdicts: list[Verdict]) -> None:
    """Run the chosen scenarios in order, appending each verdict as it comes so that a stress run that
    stops half way still reports what it found. The crashes' baseline run serves the later scenarios."""
    only = set(args.only.split(","))
    baseline: Baseline | None = None
    trained_dir: Path | None = None
    if "bad_input" in only:
        verdicts.append(scenario_bad_input(work, files=args.files, property_examples=args.property_examples))
    if "crashes" in only:
        baseline = run_baseline(work)
        verdicts.append(scenario_crashes(work, baseline, cli=not args.no_cli))
        trained_dir = baseline.data_dir
    if "concurrency" in only:
        verdicts.append(scenario_concurrency(work, baseline))
    if "registry" in only:
        if trained_dir is None:
            trained_dir = work / "registry"
            run_worker(trained_dir, stress_config(), work / "logs", "registry_setup")
        verdicts.append(scenario_registry(trained_dir))
    if "dependencies" in only:
        verdicts.append(scenario_dependencies(work))
    if "safe_defaults" in only:
        verdicts.append(scenario_safe_defaults(trained_dir))
    if "slow_tests" in only:
        verdicts.append(scenario_slow_tests())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    args = _parse(argv)
    work = Path(tempfile.mkdtemp(prefix="tidpo-stress-"))
    print(f"work dir {work}")
    verdicts: list[Verdict] = []
    started = time.monotonic()
    try:
        run_scenarios(args, work, verdicts)
    finally:
        results = report.assemble(verdicts, time.monotonic() - started)
        RESULTS_PATH.write_text(json.dumps(results, indent=1, default=str) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.print_table(report.table_rows(verdicts))
    print(f"\n{results['seconds'] / 60:.1f} min; results in {RESULTS_PATH.relative_to(ROOT)}")
    return 0 if report.passed(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
