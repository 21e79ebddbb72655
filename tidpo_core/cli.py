"""`tidpo` command line: look the champion model up in the MLflow registry (`tidpo run`, which needs
Dagster, is tidpo_pipeline.cli's)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tidpo_core.evaluation.metrics import evaluation_by_model, key_metric_lines
from tidpo_core.runtime.tracking import REGISTERED_MODEL, STORE_FILE, champion, sqlite_tracking_uri

DEFAULT_DATA_DIR = ".tidpo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidpo", description="tidpo utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run",
        help="materialize the pipeline: tidpo run [--config my.yaml] (see python -m tidpo_pipeline.run -h)",
    )
    show = sub.add_parser("champion", help="print the champion model's version, run, metrics and path")
    show.add_argument("--data-dir", default=os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR))
    show.add_argument("--tracking-uri", default=None, help="overrides --data-dir (default: its sqlite store)")
    show.add_argument("--name", default=REGISTERED_MODEL)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument(
        "--history", action="store_true", help="every promotion, refusal and rollback, oldest first"
    )
    back = sub.add_parser("rollback", help="give an earlier version the champion alias back, recording why")
    back.add_argument("version")
    back.add_argument("--reason", required=True)
    back.add_argument("--data-dir", default=os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR))
    back.add_argument("--tracking-uri", default=None, help="overrides --data-dir (default: its sqlite store)")
    back.add_argument("--name", default=REGISTERED_MODEL)
    answer = sub.add_parser("generate", help="answer a prompt with the champion; prints only the completion")
    answer.add_argument("prompt")
    answer.add_argument("--data-dir", default=os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR))
    answer.add_argument(
        "--tracking-uri", default=None, help="overrides --data-dir (default: its sqlite store)"
    )
    answer.add_argument("--name", default=REGISTERED_MODEL)
    answer.add_argument("--max-new-tokens", type=int, default=64)
    answer.add_argument("--temperature", type=float, default=0.8)
    answer.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "run":  # reached only when this module is called directly, not through `tidpo`
        print(
            "tidpo run needs the pipeline: python -m tidpo_pipeline.run [--config my.yaml]", file=sys.stderr
        )
        return 2

    tracking_uri = args.tracking_uri or sqlite_tracking_uri(args.data_dir)
    store_file = (Path(args.data_dir) / STORE_FILE).resolve()
    if not args.tracking_uri and not store_file.exists():
        # Opening a missing sqlite store would create it (and its folder) as a side effect.
        print(
            f"no tidpo data at {store_file.parent} (run `make run` first, or pass --data-dir)",
            file=sys.stderr,
        )
        return 1
    if args.command == "rollback":
        return _rollback(args, tracking_uri)
    if args.command == "champion" and args.history:
        return _history(args)
    info = champion(tracking_uri, args.name)
    if info is None:
        print(f"no champion for {args.name!r} in {tracking_uri}", file=sys.stderr)
        return 1
    if args.command == "generate":
        return _generate(args, tracking_uri, info.model_uri)
    if args.json:
        # The gate's three-way comparison, side by side: this version, its reference, and the champion it
        # was judged against (when there was one); the verdict is in tags.gate_verdict.
        print(json.dumps({**asdict(info), "evaluation": evaluation_by_model(info.metrics)}, indent=2))
        return 0
    print(f"model      {info.model_uri}  (version {info.version})")
    print(f"run        {info.run_id}")
    print(f"artifacts  {info.source}")
    print(f"tracking   {tracking_uri}\n")
    print("\n".join(key_metric_lines(info.metrics, indent="")))
    print("(every metric: tidpo champion --json)")
    print(
        f"\nload it:   mlflow.transformers.load_model({info.model_uri!r})  with MLFLOW_TRACKING_URI={tracking_uri}"
    )
    return 0


def _database(data_dir: str) -> Path:
    from tidpo_core.runtime.layout import DataDir

    return DataDir.at(data_dir).database


def _history(args: argparse.Namespace) -> int:
    from tidpo_core import store

    if not _database(args.data_dir).exists():
        print(f"no history: {_database(args.data_dir)} does not exist", file=sys.stderr)
        return 1
    con = store.connect(_database(args.data_dir), read_only=True)
    try:
        events = store.champion_history(con, args.name)
    finally:
        con.close()
    if args.json:
        print(json.dumps([asdict(e) for e in events], indent=2, default=str))
        return 0
    if not events:
        print(f"no promotion, refusal or rollback recorded for {args.name!r}")
        return 0
    for e in events:
        before = (
            f"(champion before: v{e.previous_champion})" if e.previous_champion else "(no champion before)"
        )
        print(f"{e.recorded_at:%Y-%m-%d %H:%M:%S}  v{e.version:<4} {e.event:<9} {before}  {e.reason}")
    return 0


def _rollback(args: argparse.Namespace, tracking_uri: str) -> int:
    from tidpo_core import store
    from tidpo_core.runtime.errors import UserInputError
    from tidpo_core.runtime.tracking import rollback_champion

    try:
        previous = rollback_champion(tracking_uri, args.version, args.reason, args.data_dir, args.name)
    except UserInputError as exc:  # an unknown version: nothing moved, nothing to record
        print(f"tidpo rollback: {exc}", file=sys.stderr)
        return 1
    con = store.connect(_database(args.data_dir))
    try:
        store.record_champion_event(
            con, store.ChampionEvent(args.name, str(args.version), "rollback", previous, None, args.reason)
        )
    finally:
        con.close()
    print(f"champion of {args.name!r}: version {args.version} (was {previous or 'none'}); reason recorded")
    return 0


def _generate(args: argparse.Namespace, tracking_uri: str, model_uri: str) -> int:
    from tidpo_core.models.generation import SamplingSettings, sample_responses
    from tidpo_core.runtime.tracking import load_registered_model

    model, tokenizer = load_registered_model(tracking_uri, model_uri)
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, batch_size=1
    )
    print(sample_responses(model, tokenizer, [args.prompt], settings)[0].strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
