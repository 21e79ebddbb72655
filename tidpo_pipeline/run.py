"""`make run`: materialize the whole tidpo_training job on the embedded default, then say where
everything is and how the champion scored.

    python -m tidpo_pipeline.run [--docs-dir docs]

--docs-dir also writes the evaluation's PNGs (heatmaps, training curves) to <dir>/img/, as the README
shows them.
"""

import argparse
import os
import sys
import time

import dagster as dg

from tidpo_core.tracking import champion
from tidpo_pipeline.definitions import defs, tidpo_training
from tidpo_pipeline.resources import MlflowTracking, TidpoStorage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs-dir", default="", help="also write the evaluation PNGs to DIR/img/")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def(tidpo_training.name)
    # Step events at INFO: the DEBUG stream of every input load would drown the progress bars.
    run_config: dict = {"loggers": {"console": {"config": {"log_level": os.environ.get("TIDPO_LOG_LEVEL", "INFO")}}}}
    if args.docs_dir:
        run_config["ops"] = {"evaluation": {"config": {"docs_dir": os.path.abspath(args.docs_dir)}}}
    result = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
    minutes = (time.perf_counter() - started) / 60
    storage: TidpoStorage = defs.resources["storage"]  # type: ignore[assignment]
    tracking: MlflowTracking = defs.resources["mlflow_tracking"]  # type: ignore[assignment]
    print(f"\ntidpo_training {'succeeded' if result.success else 'FAILED'} in {minutes:.1f} min (run {result.run_id})")
    for check in result.get_asset_check_evaluations():
        print(f"  check {check.asset_key.to_user_string()}:{check.check_name:<30} {'passed' if check.passed else 'FAILED'}")
    print(f"\n  data dir     {storage.root}")
    print(f"  DuckDB       {storage.duckdb_path}")
    print(f"  MLflow       {tracking.uri}   (browse: mlflow ui --backend-store-uri {tracking.uri})")
    print(f"  models       {storage.models_dir}")
    info = champion(tracking.uri, tracking.registered_model)
    if info is None:
        print("  champion     none (the evaluation gate has not passed yet)")
    else:
        print(f"  champion     {info.model_uri} = version {info.version} (run {info.run_id})")
        for key in sorted(k for k in info.metrics if k.startswith("eval/")):
            print(f"    {key:<44} {info.metrics[key]:.4f}")
    print("\n  UI           make ui  ->  http://127.0.0.1:3000")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
