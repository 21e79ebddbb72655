"""TIDPO_GPU_K8S_CONFIG: the Kubernetes pod config of the assets that load a model (docs/cluster.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidpo_pipeline.placement import GPU_K8S_CONFIG_ENV, K8S_CONFIG_TAG, model_op_tags

GPU_POD = """
container_config:
  resources:
    limits: {nvidia.com/gpu: "8"}
pod_spec_config:
  node_selector: {pool: h100}
"""
MODEL_ASSETS = {
    "reference_model",
    "anchor_responses",
    "contrastive_models",
    "token_weights",
    "reward_model",
    "tidpo_policy",
    "evaluation",
    "method_comparison",
}
ROOT = Path(__file__).resolve().parents[1]


def test_no_setting_no_tags():
    assert model_op_tags({}) == {} and model_op_tags({GPU_K8S_CONFIG_ENV: " "}) == {}


def test_the_file_becomes_the_dagster_k8s_config_tag(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text(GPU_POD)
    assert model_op_tags({GPU_K8S_CONFIG_ENV: str(path)}) == {
        K8S_CONFIG_TAG: {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": "8"}}},
            "pod_spec_config": {"node_selector": {"pool": "h100"}},
        }
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "No such file"),
        ("- a list\n", "expected a mapping"),
        ("container: {}\n", "unknown keys \\['container'\\]"),
        ("a: [\n", "not YAML"),
    ],
)
def test_a_bad_file_is_refused_by_name(tmp_path, text, message):
    path = tmp_path / "gpu.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        model_op_tags({GPU_K8S_CONFIG_ENV: str(path)})
    assert str(path) in str(error.value)


def test_the_model_assets_and_only_they_carry_the_tag(tmp_path):
    """Loaded as a code location loads it (a fresh process with the variable set)."""
    path = tmp_path / "gpu.yaml"
    path.write_text(GPU_POD)
    script = (
        "import json; from tidpo_pipeline.definitions import defs\n"
        "graph = defs.resolve_asset_graph()\n"
        "print(json.dumps({key.to_user_string(): graph.get(key).assets_def.op.tags.get('dagster-k8s/config') is not None"
        " for key in graph.get_all_asset_keys()}))"
    )
    env = {**os.environ, GPU_K8S_CONFIG_ENV: str(path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    tagged = json.loads(out.strip().splitlines()[-1])
    assert {name for name, has in tagged.items() if has} == MODEL_ASSETS
    assert tagged["preference_pairs"] is False
