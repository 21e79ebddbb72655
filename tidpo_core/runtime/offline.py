"""tidpo's environment defaults: no hub access (weights and data sets come from local folders unless the user
unsets the flags), no telemetry, and no tokenizers thread pool that would be forked into worker processes."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

OFFLINE_DEFAULTS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set every default the environment does not set yet (os.environ by default), so a user's own choice (say
    HF_HUB_OFFLINE=0 on a machine with a network) wins. Call it before transformers, datasets or mlflow load:
    they read these variables once, at import."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_DEFAULTS.items():
        target.setdefault(key, value)
    return target


def offline_child_environment(base: Mapping[str, str]) -> dict[str, str]:
    """A child process's environment: `base` with the defaults forced, because a child that trains or weighs
    must read the same local files as the parent that planned its work."""
    return {**base, **OFFLINE_DEFAULTS}
