"""The `tidpo` command: `tidpo run` materializes the pipeline (Dagster); every other command is
tidpo_core.cli's, which answers without importing Dagster."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        from tidpo_pipeline.run import main as run

        return run(args[1:])
    from tidpo_core.cli import main as core

    return core(args)


if __name__ == "__main__":
    raise SystemExit(main())
