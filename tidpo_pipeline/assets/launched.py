"""Launched processes of the precompute and training assets: run through Dagster Pipes, their metadata."""

import warnings
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError

from tidpo_core.runtime.launch import ProcessFailed
from tidpo_core.runtime.precompute import PrecomputeSettings, ShardOutcome
from tidpo_core.steps.policy import (
    ProcessRunner,
)


def through_pipes(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient) -> ProcessRunner:
    def run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
        try:
            # Dagster's own Pipes context reads a preview property of every message reader; the warning is
            # about Dagster's internals, not about anything this asset does.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore",
                    message=r"Function `PipesMessageReader.expected_writer_count`",
                    category=dg.PreviewWarning,
                )
                return client.run(context=context, command=command, env=env).get_materialize_result().metadata
        except DagsterPipesExecutionError as exc:
            raise ProcessFailed(str(exc)) from exc

    return run


def precompute_runner(
    context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient, settings: PrecomputeSettings
) -> ProcessRunner | None:
    """Launched precompute processes run through Dagster Pipes (rank 0 reports progress); in process: none."""
    return None if settings.launcher == "in_process" else through_pipes(context, client)


def shard_metadata(outcome: ShardOutcome | None, loaded: int) -> dict[str, Any]:
    """What a sharded precompute did: processes, shards planned / reused / computed, rows loaded."""
    if outcome is None:
        return {
            "processes": 0,
            "shards_planned": 0,
            "shards_reused": 0,
            "shards_computed": 0,
            "rows_loaded": 0,
        }
    return {
        "processes": outcome.processes,
        "shards_planned": outcome.planned,
        "shards_reused": outcome.reused,
        "shards_computed": outcome.computed,
        "rows_loaded": loaded,
    }
