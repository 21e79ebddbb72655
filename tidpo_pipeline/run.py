"""`make run`: materialize the whole tidpo_training job (on the embedded default, or on your own data with
a run config), then say where everything is and how the champion scored.

    python -m tidpo_pipeline.run [--config my.yaml] [--docs-dir docs]

--config takes the YAML that `dagster job execute -j tidpo_training -c` takes (an `ops:` section per
asset); settings it leaves out keep their defaults. --docs-dir also writes the evaluation's PNGs
(heatmaps, training curves) to <dir>/img/, as the README shows them.
"""

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from tidpo_core.evaluation.metrics import key_metric_lines
from tidpo_core.runtime.tracking import champion
from tidpo_pipeline.definitions import defs, tidpo_training
from tidpo_pipeline.failures import failure_lines
from tidpo_pipeline.resources import MlflowTracking, TidpoStorage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="", help="a Dagster run config YAML (as `dagster job execute -c` takes)"
    )
    parser.add_argument("--docs-dir", default="", help="also write the evaluation PNGs to DIR/img/")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    job = defs.resolve_job_def(tidpo_training.name)
    try:
        run_config = run_config_for(args.config, args.docs_dir)
        # A misspelled key or a wrong type fails here, before any step runs or the instance is touched.
        dg.validate_run_config(job, run_config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"tidpo run: {exc}", file=sys.stderr)
        return 2
    except dg.DagsterInvalidConfigError as exc:
        print(f"tidpo run: {config_error_message(exc)}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
    minutes = (time.perf_counter() - started) / 60
    storage: TidpoStorage = defs.resources["storage"]  # type: ignore[assignment]
    tracking: MlflowTracking = defs.resources["mlflow_tracking"]  # type: ignore[assignment]
    print(
        f"\ntidpo_training {'succeeded' if result.success else 'FAILED'} in {minutes:.1f} min (run {result.run_id})"
    )
    for line in failure_lines(result):
        print(f"  {line}")
    checks = [
        (f"{c.asset_key.to_user_string()}:{c.check_name}", c.passed)
        for c in result.get_asset_check_evaluations()
    ]
    width = max((len(name) for name, _ in checks), default=0)
    for name, passed in checks:
        print(f"  check  {name:<{width}}  {'passed' if passed else 'FAILED'}")
    gate_line = gate_verdict(result)
    if gate_line:
        print(f"\n  {gate_line}")
    print(f"\n  data dir     {storage.root}")
    print(f"  DuckDB       {storage.duckdb_path}")
    print(f"  MLflow       {tracking.uri}   (browse: mlflow ui --backend-store-uri {tracking.uri})")
    print(f"  models       {storage.models_dir}")
    info = champion(tracking.uri, tracking.registered_model)
    if info is None:
        print("  champion     none (the evaluation gate has not passed yet)")
    else:
        print(f"  champion     {info.model_uri} = version {info.version} (run {info.run_id})\n")
        print("\n".join(key_metric_lines(info.metrics, indent="    ")))
        print("    (every metric: tidpo champion --json)")
    print("\n  UI           make ui  ->  http://127.0.0.1:3000")
    return 0 if result.success else 1


def run_config_for(config_path: str, docs_dir: str) -> dict[str, Any]:
    """The user's run config (a YAML file, optional) with make run's defaults where it is silent."""
    run_config: dict[str, Any] = {}
    if config_path:
        loaded = yaml.safe_load(Path(config_path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"{config_path}: a run config is a mapping with an `ops:` section, got {type(loaded).__name__}"
            )
        run_config = loaded or {}
    # Step events at INFO: the DEBUG stream of every input load would drown the progress bars.
    loggers = run_config.setdefault("loggers", {})
    loggers.setdefault("console", {"config": {"log_level": os.environ.get("TIDPO_LOG_LEVEL", "INFO")}})
    if docs_dir:
        evaluation = run_config.setdefault("ops", {}).setdefault("evaluation", {}).setdefault("config", {})
        evaluation["docs_dir"] = os.path.abspath(docs_dir)
    return run_config


def config_error_message(exc: dg.DagsterInvalidConfigError) -> str:
    """Dagster's message for an invalid run config (it names each bad key and its path), plus a
    "did you mean" for a key that is a near miss of one the config accepts."""
    message = str(exc).strip()
    hints = []
    for error in exc.errors:
        field = getattr(error.error_data, "field_name", None)
        expected = re.search(r'Expected: "\{(.*)\}"', error.message or "")
        if not field or not expected:
            continue
        known = re.findall(r"(?:^|\s)(\w+)\??:", expected.group(1))
        close = difflib.get_close_matches(field, known, n=1)
        if close:
            hints.append(f"did you mean {close[0]!r} instead of {field!r}?")
    return "\n".join([message, *hints])


def gate_verdict(result: dg.ExecuteInProcessResult) -> str:
    """One line on what the evaluation gate did to the registry; empty when the evaluation did not run."""
    materializations = result.asset_materializations_for_node("evaluation")
    if not materializations:
        return ""
    metadata = {k: getattr(v, "value", v) for k, v in materializations[-1].metadata.items()}
    version = metadata.get("mlflow_model_version")
    if metadata.get("champion"):
        return f"gate passed: version {version} is the new champion ({metadata.get('gate')})"
    return f"gate failed: champion unchanged, version {version} tagged gate=failed ({metadata.get('gate')})"


if __name__ == "__main__":
    sys.exit(main())
