"""The training engine's command line: ``python -m tidpo_core.training --config run.yaml`` (also under
``accelerate launch``; tidpo_core.runtime.launch builds those commands). The engine is tidpo_core.training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tidpo_core.training import INTERRUPTED_EXIT_CODE, TrainConfig, TrainingInterrupted, train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a policy with TI-DPO (or dpo/ipo/simpo).")
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig fields")
    args = parser.parse_args(argv)
    try:
        train(TrainConfig.from_yaml(args.config))
    except TrainingInterrupted as exc:
        print(f"tidpo.train: {exc}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
