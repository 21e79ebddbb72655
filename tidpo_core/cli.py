"""`tidpo` command line: look the champion model up in the MLflow registry."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from tidpo_core.tracking import REGISTERED_MODEL, champion, sqlite_tracking_uri

DEFAULT_DATA_DIR = ".tidpo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidpo", description="tidpo utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("champion", help="print the champion model's version, run, metrics and path")
    show.add_argument("--data-dir", default=os.environ.get("TIDPO_DATA_DIR", DEFAULT_DATA_DIR))
    show.add_argument("--tracking-uri", default=None, help="overrides --data-dir (default: its sqlite store)")
    show.add_argument("--name", default=REGISTERED_MODEL)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    tracking_uri = args.tracking_uri or sqlite_tracking_uri(args.data_dir)
    info = champion(tracking_uri, args.name)
    if info is None:
        print(f"no champion for {args.name!r} in {tracking_uri}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(f"model      {info.model_uri}  (version {info.version})")
    print(f"run        {info.run_id}")
    print(f"artifacts  {info.source}")
    for key in sorted(info.metrics):
        if key.startswith("eval/"):
            print(f"{key:<40} {info.metrics[key]:.4f}")
    print(f"\nload it:   mlflow.transformers.load_model({info.model_uri!r})  with MLFLOW_TRACKING_URI={tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
