"""The tidpo asset graph: pairs -> reference model -> anchors -> token weights -> policy -> evaluation.

Assets are thin: they read configuration, call tidpo_core, and record metadata and lineage. Each
returns a small handle (paths, fingerprints, run ids) that downstream assets receive as input; the
data itself lives in DuckDB, model folders and MLflow.
"""


import dataclasses
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError

from tidpo_core.data.sources import inbox_files
from tidpo_core.models.contrastive import ContrastiveSFT
from tidpo_core.models.generation import SamplingSettings
from tidpo_core.models.modeling import TinyModelConfig
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.launch import ProcessFailed, TrainingFailed
from tidpo_core.runtime.precompute import PrecomputeFailed, PrecomputeSettings, ShardOutcome
from tidpo_core.steps import RunTracking, settings_of
from tidpo_core.steps.anchors import AnchorBackend, sample_anchors
from tidpo_core.steps.contrastive import train_contrastive_models
from tidpo_core.steps.pairs import PairSources, ingest_pairs
from tidpo_core.steps.policy import (
    SET_BY_THE_RUN,
    PolicyInputs,
    PolicyRunSettings,
    ProcessRunner,
    engine_option_names,
    train_policy,
)
from tidpo_core.steps.reference import ReferenceHandle, ReferenceRecipe, build_reference
from tidpo_core.steps.weights import WeighingSettings, weigh_tokens
from tidpo_core.training import TrainConfig
from tidpo_pipeline.config_from_core import DocumentedConfig, config_class, core_fields
from tidpo_pipeline.metadata import GROUP, anchors_preview, mlflow_tags, pairs_preview, quarantine_preview
from tidpo_pipeline.placement import MODEL_OP_TAGS
from tidpo_pipeline.resources import ComputeThreads, MlflowTracking, TidpoDuckDB, TidpoStorage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --- preference_pairs ------------------------------------------------------------------------------


def user_error(message: str, **context: Any) -> dg.Failure:
    """A failure caused by the user's input (a bad file, a missing model, a wrong setting), not by a bug:
    raised `from None`, so the log shows the message and the paths (as metadata), not chained tracebacks."""
    metadata = {name: dg.MetadataValue.json(value) if isinstance(value, list | dict) else str(value) for name, value in context.items()}
    return dg.Failure(description=message, metadata=metadata)


@contextmanager
def user_errors_as_failures() -> Iterator[None]:
    """A step's UserInputError (a bad file, a missing model) becomes a Failure without a traceback."""
    try:
        yield
    except UserInputError as exc:
        raise user_error(str(exc), **exc.context) from None


class PairsAssetSettings(DocumentedConfig):
    include_inbox: bool = True
    """Also load every data file dropped into <data_dir>/inbox."""


PreferencePairsConfig = config_class(
    "PreferencePairsConfig", "Where the preference pairs come from and how they are split.", PairsAssetSettings, core_fields(PairSources)
)


@dg.asset(group_name=GROUP, kinds={"duckdb"}, description="Validated preference pairs with a train/eval split; bad rows go to the quarantine table.")
def preference_pairs(
    context: dg.AssetExecutionContext, config: PreferencePairsConfig, storage: TidpoStorage, duckdb: TidpoDuckDB  # type: ignore[valid-type]
) -> dg.MaterializeResult:
    inbox = [str(p) for p in inbox_files(storage.inbox_dir)] if config.include_inbox else []
    with user_errors_as_failures():
        report = ingest_pairs(duckdb.get_connection, settings_of(config, PairSources), inbox)
    result, stored = report.result, report.stored
    context.log.info(
        f"{stored.pairs} pairs stored ({stored.train} train / {stored.eval} eval), {stored.quarantined} quarantined, "
        f"{result.skipped_rows} rows skipped {result.skipped or ''}"
    )
    return dg.MaterializeResult(
        value={"digest": report.digest, "train": stored.train, "eval": stored.eval},
        metadata={
            "dagster/row_count": stored.pairs,
            "rows_read": result.rows_read,
            "accepted": result.accepted,
            "quarantined": stored.quarantined,
            "skipped": result.skipped_rows,
            "skipped_reasons": dg.MetadataValue.json(result.skipped),
            "pairs_available": report.available,
            "max_pairs": str(config.max_pairs),
            "quarantine_share": result.quarantine_share,
            "quarantine_reasons": dg.MetadataValue.json(result.reason_counts()),
            "train_pairs": stored.train,
            "eval_pairs": stored.eval,
            "sources": dg.MetadataValue.json(report.sources),
            "digest": report.digest,
            "preview": dg.MetadataValue.md(pairs_preview(report.preview)),
            "quarantine_preview": dg.MetadataValue.md(quarantine_preview(report.quarantine_preview)),
        },
    )


# --- reference_model -------------------------------------------------------------------------------


ReferenceModelConfig = config_class(
    "ReferenceModelConfig",
    "The reference: a checkpoint, or the embedded tiny model (its shape below) and its short SFT.",
    DocumentedConfig,
    core_fields(ReferenceRecipe),
    core_fields(TinyModelConfig),
)


@dg.asset(group_name=GROUP, op_tags=MODEL_OP_TAGS, kinds={"pytorch", "mlflow"}, description="The starting policy: a configured checkpoint, or the embedded tiny Llama with a locally trained tokenizer and a short SFT.")
def reference_model(
    context: dg.AssetExecutionContext,
    config: ReferenceModelConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    run_tracking = RunTracking(mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context))  # fails early if tracking is down
    with user_errors_as_failures():
        built = build_reference(
            duckdb.get_connection,
            settings_of(config, ReferenceRecipe),
            settings_of(config, TinyModelConfig),
            storage.layout,
            preference_pairs["digest"],
            tracking_to=run_tracking,
            log=context.log.info,
        )
    handle, losses = built.handle, built.sft_losses
    return dg.MaterializeResult(
        value=dataclasses.asdict(handle),
        metadata={
            **built.details,
            "path": dg.MetadataValue.path(handle.path),
            "fingerprint": handle.fingerprint,
            "parameters": built.parameters if built.parameters is not None else "not loaded",
            "mlflow_run_id": str(handle.mlflow_run_id),
            "sft_first_loss": losses[0] if losses else float("nan"),
            "sft_last_loss": losses[-1] if losses else float("nan"),
        },
    )


# --- launched processes ------------------------------------------------------------------------


def _through_pipes(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient) -> ProcessRunner:
    def run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
        try:
            # Dagster's own Pipes context reads a preview property of every message reader; the warning is
            # about Dagster's internals, not about anything this asset does.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count`", category=dg.PreviewWarning)
                return client.run(context=context, command=command, env=env).get_materialize_result().metadata
        except DagsterPipesExecutionError as exc:
            raise ProcessFailed(str(exc)) from exc

    return run


# --- anchor_responses ------------------------------------------------------------------------------


AnchorConfig = config_class(
    "AnchorConfig",
    "How the anchors are sampled from the reference, and by how many processes.",
    DocumentedConfig,
    core_fields(SamplingSettings, defaults={"batch_size": 32}),
    core_fields(AnchorBackend),
    core_fields(PrecomputeSettings),
)


def _precompute_runner(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient, settings: PrecomputeSettings) -> ProcessRunner | None:
    """Launched precompute processes run through Dagster Pipes (rank 0 reports progress); in process: none."""
    return None if settings.launcher == "in_process" else _through_pipes(context, client)


@contextmanager
def precompute_failures_as_failures() -> Iterator[None]:
    """A failed precompute process: a Failure with the step's message (finished shards are kept)."""
    try:
        yield
    except PrecomputeFailed as exc:
        raise dg.Failure(description=str(exc)) from exc


def shard_metadata(outcome: ShardOutcome | None, loaded: int) -> dict[str, Any]:
    """What a sharded precompute did: processes, shards planned / reused / computed, rows loaded."""
    if outcome is None:
        return {"processes": 0, "shards_planned": 0, "shards_reused": 0, "shards_computed": 0, "rows_loaded": 0}
    return {
        "processes": outcome.processes,
        "shards_planned": outcome.planned,
        "shards_reused": outcome.reused,
        "shards_computed": outcome.computed,
        "rows_loaded": loaded,
    }


@dg.asset(group_name=GROUP, op_tags=MODEL_OP_TAGS, kinds={"duckdb", "pytorch"}, description="One response per train prompt sampled from the reference policy: the triplet loss's anchor.")
def anchor_responses(
    context: dg.AssetExecutionContext,
    config: AnchorConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    settings = settings_of(config, SamplingSettings)
    precompute = settings_of(config, PrecomputeSettings)
    backend = settings_of(config, AnchorBackend)
    with user_errors_as_failures(), precompute_failures_as_failures():
        report = sample_anchors(
            duckdb.get_connection,
            ReferenceHandle.from_value(reference_model),
            settings,
            backend=backend,
            precompute=precompute,
            layout=storage.layout,
            run_process=_precompute_runner(context, pipes_subprocess_client, precompute),
            log=context.log.info,
        )
    return dg.MaterializeResult(
        value={"fingerprint": report.fingerprint},
        metadata={
            "fingerprint": report.fingerprint,
            "generated": report.generated,
            "reused": report.stored - report.generated,
            "dagster/row_count": report.stored,
            **shard_metadata(report.shards, report.generated),
            "launcher": precompute.launcher,
            "generation_backend": backend.generation_backend,
            "sampling": dg.MetadataValue.json(settings.as_dict()),
            "preview": dg.MetadataValue.md(anchors_preview(report.preview)),
        },
    )


# --- contrastive_models ----------------------------------------------------------------------------


ContrastiveModelsConfig = config_class(
    "ContrastiveModelsConfig", "The SFT recipe of both contrastive models.", DocumentedConfig, core_fields(ContrastiveSFT)
)


@dg.asset(
    group_name=GROUP,
    op_tags=MODEL_OP_TAGS,
    kinds={"pytorch", "duckdb"},
    description="Two contrastive models for the `contrastive` importance estimator (TIS-DPO): the reference's base "
    "fine-tuned on the chosen answers only and on the rejected answers only. Not part of tidpo_training: "
    "materialize it before token_weights with estimator: contrastive.",
)
def contrastive_models(
    context: dg.AssetExecutionContext,
    config: ContrastiveModelsConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
) -> dg.MaterializeResult:
    built = train_contrastive_models(
        duckdb.get_connection,
        ReferenceHandle.from_value(reference_model),
        settings_of(config, ContrastiveSFT),
        storage.layout,
        preference_pairs["digest"],
        log=context.log.info,
    )
    return dg.MaterializeResult(
        value={"fingerprint": built.fingerprint, "paths": list(built.paths)},
        metadata={
            "fingerprint": built.fingerprint,
            "positive": dg.MetadataValue.path(built.paths[0]),
            "negative": dg.MetadataValue.path(built.paths[1]),
            "reused": built.reused,
            **{f"sft_last_loss/{name}": curve[-1] for name, curve in built.sft_losses.items() if curve},
        },
    )


# --- token_weights ---------------------------------------------------------------------------------


TokenWeightsConfig = config_class(
    "TokenWeightsConfig",
    "How each response token is weighed (docs/method.md section 1), and by how many processes.",
    DocumentedConfig,
    core_fields(WeighingSettings),
    core_fields(PrecomputeSettings),
)


@dg.asset(group_name=GROUP, op_tags=MODEL_OP_TAGS, kinds={"duckdb", "pytorch"}, description="Per-token hybrid importance (an importance estimate, by default the paper's gradient attribution, + Gaussian prior) and reference log-probs for chosen, rejected and anchor responses.")
def token_weights(
    context: dg.AssetExecutionContext,
    config: TokenWeightsConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    settings = settings_of(config, WeighingSettings)
    precompute = settings_of(config, PrecomputeSettings)
    with user_errors_as_failures(), precompute_failures_as_failures():
        report = weigh_tokens(
            duckdb.get_connection,
            ReferenceHandle.from_value(reference_model),
            anchor_responses["fingerprint"],
            settings,
            precompute=precompute,
            layout=storage.layout,
            run_process=_precompute_runner(context, pipes_subprocess_client, precompute),
            log=context.log.info,
        )
    summary = report.summary
    return dg.MaterializeResult(
        value={
            "fingerprint": report.fingerprint,
            "encoding": settings.encoding.__dict__,
            "importance": report.importance,
            "reference_kl_top_k": settings.reference_kl_top_k,
        },
        metadata={
            "fingerprint": report.fingerprint,
            "dagster/row_count": summary.token_rows,
            "responses": summary.responses,
            "computed": report.computed,
            "reused": report.expected - report.computed,
            **shard_metadata(report.shards, report.computed),
            "launcher": precompute.launcher,
            "mean_attribution": summary.mean_attribution,
            "mean_weight": summary.mean_weight,
            "reference_kl_top_k": settings.reference_kl_top_k,
            "estimator": settings.estimator + (" (eos excluded)" if settings.exclude_eos else ""),
            "settings": dg.MetadataValue.json({"encoding": settings.encoding.__dict__, **report.importance}),
        },
    )


# --- tidpo_policy ----------------------------------------------------------------------------------


PolicyConfig = config_class(
    "PolicyConfig",
    "Training of the policy: every option of the engine (TrainConfig), plus where it starts and how it is launched.",
    DocumentedConfig,
    core_fields(PolicyRunSettings),
    core_fields(TrainConfig, exclude=SET_BY_THE_RUN),
)


def training_fields(config: Any) -> dict[str, Any]:
    """The PolicyConfig values that are the engine's TrainConfig options (same names)."""
    return {name: getattr(config, name) for name in engine_option_names()}


@dg.asset(group_name=GROUP, op_tags=MODEL_OP_TAGS, kinds={"pytorch", "mlflow"}, description="The trained policy: an accelerate-driven TI-DPO run launched through Dagster Pipes, checkpointed and resumable, registered in MLflow.")
def tidpo_policy(
    context: dg.AssetExecutionContext,
    config: PolicyConfig,  # type: ignore[valid-type]
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    token_weights: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    compute: ComputeThreads,  # unused in the body: its setup applies the thread setting
    mlflow_tracking: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    inputs = PolicyInputs(
        preference_pairs["digest"], ReferenceHandle.from_value(reference_model), anchor_responses["fingerprint"], token_weights
    )
    with user_errors_as_failures():
        run_tracking = RunTracking(mlflow_tracking.uri, mlflow_tracking.experiment_id(), mlflow_tags(context))
        try:
            result = train_policy(
                duckdb.get_connection,
                storage.layout,
                run_tracking,
                mlflow_tracking.registered_model,
                inputs,
                settings_of(config, PolicyRunSettings),
                training_fields(config),
                _through_pipes(context, pipes_subprocess_client),
                log=context.log.info,
            )
        except TrainingFailed as exc:
            raise dg.Failure(
                description=f"training failed: {exc.reason}",
                metadata={"run_dir": dg.MetadataValue.path(str(exc.run_dir)), "mlflow_run_id": str(exc.mlflow_run_id)},
            ) from exc
    summary, version, history = result.summary, result.model_version, result.summary["history"]
    return dg.MaterializeResult(
        value={
            "model_path": summary["final_model_path"],
            "mlflow_run_id": result.mlflow_run_id,
            "model_version": version,
            "run_dir": str(result.run_dir),
            "beta": config.beta,
            "encoding": token_weights["encoding"],
            # The pair losses' margin, or GRPO's mean reward: what the training_is_healthy check reads.
            "step_history": [{k: h[k] for k in ("loss", "rewards/margins", "reward") if k in h} for h in history],
        },
        metadata={
            **result.reported,
            "model_path": dg.MetadataValue.path(summary["final_model_path"]),
            "mlflow_run_id": result.mlflow_run_id,
            "mlflow_model_version": str(version),
            "mlflow_model_uri": f"models:/{mlflow_tracking.registered_model}/{version}" if version else "not registered",
            "steps": summary["steps"],
            "first_loss": summary["first_loss"],
            "last_loss": summary["last_loss"],
            "final_reward_accuracy": history[-1].get("rewards/accuracies", float("nan")) if history else float("nan"),
            "seconds": summary["seconds"],
        },
    )
