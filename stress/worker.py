"""The worker side of `python -m stress.run worker ...`: one `dagster.materialize` of the asset graph in
this process, with optional instrumentation, ending with one RESULT line for the parent."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from stress.config import MARK, RESULT
from tidpo_core.runtime.layout import DATABASE_FILE


def _mark(text: str) -> None:
    print(f"{MARK} {text}", flush=True)


def _install_marks(
    pause_after_chunk: float, pause_in: set[str], pause_in_s: float, pause_after_register: float = 0.0
) -> None:
    """Print a line when a chunk commits (and when a chosen writer is inside its transaction), so the
    parent can kill at a known point; optionally hold there for a while."""
    from tidpo_core import store
    from tidpo_core.runtime import tracking

    current: dict[str, str | None] = {"what": None}
    original_transaction = store.transaction

    @contextlib.contextmanager
    def transaction(con):  # type: ignore[no-untyped-def]
        with original_transaction(con):
            yield con
            what = current["what"]
            if what in pause_in:
                _mark(f"in-transaction {what}")
                time.sleep(pause_in_s)

    # Every store writer calls connection.transaction at call time: one patch reaches them all.
    import tidpo_core.store.connection

    tidpo_core.store.connection.transaction = transaction  # type: ignore[assignment]

    def wrap(name: str, what: str) -> None:
        original = getattr(store, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            current["what"] = what
            try:
                count = original(*args, **kwargs)
            finally:
                current["what"] = None
            _mark(f"committed {what} {count}")
            if pause_after_chunk:
                time.sleep(pause_after_chunk)
            return count

        setattr(store, name, wrapped)

    # The steps load every precompute shard in one transaction (tidpo_core.runtime.precompute).
    wrap("load_anchor_shards", "anchors")
    wrap("load_weight_shards", "weights")
    original_log = tracking.log_transformers_model

    def log_model(*args: Any, **kwargs: Any) -> Any:
        _mark("registering")
        info = original_log(*args, **kwargs)
        _mark("registered")
        time.sleep(pause_after_register)  # hold before the MLflow run is marked finished
        return info

    tracking.log_transformers_model = log_model  # type: ignore[assignment]


def _nan_pipes_client(step: int) -> Any:
    """A Pipes client that plants a NaN loss at `step` in the training process's environment."""
    import dagster as dg

    from tidpo_core.runtime.faults import Faults

    class NanInjectingPipesClient(dg.PipesSubprocessClient):
        def run(self, *, env=None, **kwargs):  # type: ignore[no-untyped-def, override]
            return super().run(env={**(env or {}), **Faults(nan_at_step=step).as_env()}, **kwargs)

    return NanInjectingPipesClient()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress.run worker")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config", required=True, help="run config as JSON")
    parser.add_argument("--select", default="all", help="comma-separated asset keys, or all")
    parser.add_argument("--marks", action="store_true")
    parser.add_argument("--pause-after-chunk", type=float, default=0.0)
    parser.add_argument("--pause-in", default="", help="anchors,weights: hold inside that transaction")
    parser.add_argument("--pause-in-s", type=float, default=30.0)
    parser.add_argument("--pause-after-register", type=float, default=0.0)
    parser.add_argument("--lock-wait", type=float, default=0.0)
    parser.add_argument("--gate-margin", type=float, default=None)
    parser.add_argument("--nan-at-step", type=int, default=None)
    parser.add_argument("--tracking-uri", default="")
    return parser.parse_args(argv)


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's resources on the data dir, with the overrides the options ask for."""
    from tidpo_pipeline.resources import MlflowTracking, QualityRules, TidpoDuckDB, build_resources

    resources = build_resources(args.data_dir)
    if args.lock_wait:
        resources["duckdb"] = TidpoDuckDB(
            database=str(Path(args.data_dir).resolve() / DATABASE_FILE), lock_timeout_s=args.lock_wait
        )
    if args.gate_margin is not None:
        resources["quality"] = QualityRules(gate_margin=args.gate_margin)
    if args.nan_at_step is not None:
        resources["pipes_subprocess_client"] = _nan_pipes_client(args.nan_at_step)
    if args.tracking_uri:
        resources["mlflow_tracking"] = MlflowTracking(data_dir=args.data_dir, tracking_uri=args.tracking_uri)
    return resources


def _errors(result: Any) -> list[str]:
    """Each failure event's error and what caused it, messages only."""
    errors = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        messages = []
        while error is not None:
            messages.append(f"{error.cls_name}: {error.message.strip()}"[:1500])
            error = error.cause or error.context
        if messages:
            errors.append(" <- ".join(messages))
    return errors


def worker_main(argv: list[str]) -> int:
    args = _parse(argv)

    import dagster as dg

    from tidpo_pipeline.checks import ALL_CHECKS
    from tidpo_pipeline.definitions import ASSETS

    if args.marks or args.pause_in:
        pause_in = set(filter(None, args.pause_in.split(",")))
        _install_marks(args.pause_after_chunk, pause_in, args.pause_in_s, args.pause_after_register)
    resources = _resources(args)
    selection = None if args.select == "all" else args.select.split(",")
    run_config = json.loads(args.config)
    if selection is not None:  # config of unselected assets is an error to Dagster
        run_config["ops"] = {k: v for k, v in run_config.get("ops", {}).items() if k in selection}
    _mark(f"started pid {os.getpid()}")
    started = time.perf_counter()
    result = dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        resources=resources,
        run_config=run_config,
        selection=selection,
        raise_on_error=False,
    )
    checks = {c.check_name: bool(c.passed) for c in result.get_asset_check_evaluations()}
    print(
        f"{RESULT} "
        + json.dumps(
            {
                "success": result.success,
                "errors": _errors(result),
                "checks": checks,
                "seconds": time.perf_counter() - started,
            }
        ),
        flush=True,
    )
    return 0 if result.success else 1
