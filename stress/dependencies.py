"""Scenario: dependencies down. An unreachable MLflow and a missing model path fail within seconds, with a
message that says what is wrong, and leave nothing half made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stress.config import stress_config
from stress.datadir import registry
from stress.processes import run_worker
from stress.verdict import Verdict


def scenario_dependencies(work: Path) -> Verdict:
    print("\n== dependencies down")
    logs = work / "logs"
    config = stress_config()
    out: dict[str, Any] = {}
    data_dir = work / "deps"
    # Each worker has its own ephemeral Dagster instance, so upstream assets are selected too.
    down = run_worker(
        data_dir,
        config,
        logs,
        "mlflow_down",
        select="preference_pairs,reference_model",
        tracking_uri="http://127.0.0.1:9",
    )
    out["mlflow_unreachable"] = {
        "failed": not down["success"],
        "seconds": round(down.get("seconds", 0), 1),
        "clear_message": any("not reachable" in e for e in down["errors"]),
        "no_model_built": not (data_dir / "models" / "reference").exists(),
    }
    missing_config = json.loads(json.dumps(config))
    missing_config["ops"]["reference_model"]["config"] = {"model_name_or_path": "/nonexistent/model-dir"}
    missing = run_worker(
        data_dir, missing_config, logs, "missing_model", select="preference_pairs,reference_model"
    )
    out["missing_model_path"] = {
        "failed": not missing["success"],
        "seconds": round(missing.get("seconds", 0), 1),
        "clear_message": any("/nonexistent/model-dir" in e for e in missing["errors"]),
        "no_mlflow_run": not any(r[1] == "reference_model" for r in registry(data_dir)["runs"]),
    }
    print(f"   {out}")
    passed = all(part["failed"] and part["clear_message"] and part["seconds"] < 60 for part in out.values())
    rows = [
        ("MLflow unreachable: fails in (s)", out["mlflow_unreachable"]["seconds"]),
        ("missing model path: fails in (s)", out["missing_model_path"]["seconds"]),
    ]
    return Verdict("dependencies", passed, out, rows)
