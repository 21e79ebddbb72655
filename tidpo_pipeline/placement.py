"""Where the assets that run a model execute: on Kubernetes, the pod config that sends them to GPU nodes.

With Dagster's `k8s_job_executor` every step is its own pod, configured by its op's `dagster-k8s/config`
tag. `TIDPO_GPU_K8S_CONFIG` names a YAML file with that config (container resources, node selector,
tolerations, ...); it becomes the tag of exactly the assets that load a model, so data steps and checks
stay on cheap nodes. Read once, when the code location loads. See docs/cluster.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

GPU_K8S_CONFIG_ENV = "TIDPO_GPU_K8S_CONFIG"
K8S_CONFIG_TAG = "dagster-k8s/config"
# The keys dagster-k8s reads from the tag (its USER_DEFINED_K8S_CONFIG_KEY schema).
K8S_CONFIG_KEYS = frozenset(
    {
        "container_config",
        "pod_spec_config",
        "pod_template_spec_metadata",
        "job_spec_config",
        "job_metadata",
        "merge_behavior",
    }
)


def model_op_tags(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The op tags of a model asset: `{"dagster-k8s/config": <the YAML file's mapping>}`, or none when
    TIDPO_GPU_K8S_CONFIG is unset. A missing file or an unknown key is an error at load, not at run time."""
    path = (os.environ if environ is None else environ).get(GPU_K8S_CONFIG_ENV, "").strip()
    if not path:
        return {}
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{GPU_K8S_CONFIG_ENV}={path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{GPU_K8S_CONFIG_ENV}={path}: not YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{GPU_K8S_CONFIG_ENV}={path}: expected a mapping with some of {sorted(K8S_CONFIG_KEYS)}"
        )
    unknown = set(config) - K8S_CONFIG_KEYS
    if unknown:
        raise ValueError(
            f"{GPU_K8S_CONFIG_ENV}={path}: unknown keys {sorted(unknown)}; expected some of {sorted(K8S_CONFIG_KEYS)}"
        )
    return {K8S_CONFIG_TAG: config}


# What the model assets' decorators use: read once, when the code location loads.
MODEL_OP_TAGS = model_op_tags()
