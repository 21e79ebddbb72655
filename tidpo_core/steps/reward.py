"""Train the reward model of the GRPO baseline: a Bradley-Terry reward model on the stored train pairs, from
the reference's backbone, judged on the eval pairs, recorded in DuckDB and registered in MLflow as
`tidpo-reward`.

The model is keyed by what made it (the pairs digest, the reference's fingerprint and the training
settings): a second call with the same ones reuses the folder, its DuckDB row and, when that run finished
and registered it, its MLflow run and version.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidpo_core import store
from tidpo_core.models.reward import (
    RewardHeldOut,
    RewardTraining,
    build_info,
    final_metrics,
    held_out_accuracy,
    is_built,
    load_reward_function,
    train_reward_model,
)
from tidpo_core.runtime import tracking
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.layout import DataDir
from tidpo_core.steps import OpenDb, RunTracking, handle_of, log_to
from tidpo_core.steps.reference import ReferenceHandle


@dataclass(frozen=True)
class RewardModelSettings(RewardTraining):
    """The reward model's training (RewardTraining's fields) and how it is judged."""

    min_accuracy_margin: float = 0.1
    """The check reward_model_beats_chance passes when the held-out accuracy exceeds 0.5 by more than this."""
    eval_batch_size: int = 32
    """Sequences per forward pass when the eval pairs are scored."""

    def training(self) -> RewardTraining:
        """The fields that shape the model (the fingerprint's part of the settings)."""
        return RewardTraining(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RewardTraining)})


@dataclass(frozen=True)
class RewardHandle:
    """What later stages need of the reward model (the reward_model asset's value, as a dict)."""

    path: str
    """The model folder: `tidpo_core.models.reward.load_reward_function(path)` scores (prompts, completions)."""
    fingerprint: str
    held_out_accuracy: float
    eval_pairs: int
    mlflow_run_id: str | None = None
    registered_version: str | None = None
    """Version of the registered model `tidpo-reward` (None: not tracked)."""
    reference_fingerprint: str = ""
    train_pairs: int = 0
    reused: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out (`eval_accuracy`, `eval_margin`, `eval_loss`, `eval_pairs`) and the last training metrics (TRL's names)."""

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> RewardHandle:
        return handle_of(value, cls)


def beats_chance(accuracy: float, min_accuracy_margin: float) -> bool:
    """The check reward_model_beats_chance: held-out accuracy > 0.5 + margin (nan, no eval pairs, fails)."""
    return math.isfinite(accuracy) and accuracy > 0.5 + min_accuracy_margin


def reward_fingerprint(pairs_digest: str, reference: ReferenceHandle, settings: RewardModelSettings) -> str:
    return digest(
        {
            "pairs": pairs_digest,
            "reference": reference.fingerprint,
            "training": dataclasses.asdict(settings.training()),
        }
    )


def train_reward(
    open_db: OpenDb,
    reference: ReferenceHandle,
    settings: RewardModelSettings,
    layout: DataDir,
    pairs_digest: str,
    *,
    tracking_to: RunTracking | None = None,
    registered_model: str = tracking.REWARD_MODEL,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RewardHandle:
    """The reward model for the stored pairs and this reference: trained (or reused), judged on the eval
    pairs, recorded in DuckDB (`reward_models`), and with `tracking_to` logged to MLflow and registered. A
    learning rate left to None is settled by the reference first (a pretrained backbone gets a small one)."""
    log = log_to(log)
    settings = settings.settled(reference.is_pretrained)
    fingerprint = reward_fingerprint(pairs_digest, reference, settings)
    out_dir = layout.reward_model(fingerprint)
    with open_db() as con:
        eval_pairs = store.read_pairs(con, split="eval")
        previous = store.reward_model_record(con, fingerprint)
    reused = is_built(out_dir, fingerprint)
    if reused:
        log(f"reward model at {out_dir} is up to date; reusing it")
    else:
        _train_model(open_db, reference, settings, out_dir, fingerprint, progress, log)
        previous = None  # a new folder: whatever was recorded under this key described another one
    info = build_info(out_dir)
    held_out = _held_out(previous, out_dir, eval_pairs, settings)
    training_metrics = final_metrics(info.get("history", []))

    def record(run_id: str | None, version: str | None) -> None:
        _record(
            open_db, fingerprint, reference, pairs_digest, out_dir, held_out, info, settings, run_id, version
        )

    run_id, version = (
        (previous.mlflow_run_id, previous.registered_version) if previous is not None else (None, None)
    )
    if tracking_to is None:
        record(run_id, version)
    elif _finished_and_registered(tracking_to.uri, registered_model, run_id, version):
        log(f"reward model already logged in MLflow run {run_id} as {registered_model} version {version}")
        record(run_id, version)
    else:
        resume = (
            run_id
            if run_id is not None
            and tracking.run_status(tracking_to.uri, run_id) not in ("FINISHED", "DELETED")
            else None
        )
        if resume is not None:
            log(f"resuming MLflow run {resume}, interrupted before it registered the reward model")
        run_id, version = _track(
            tracking_to,
            registered_model,
            open_db,
            record,
            resume,
            out_dir,
            info,
            held_out,
            reference,
            settings,
            pairs_digest,
            fingerprint,
        )
    return RewardHandle(
        path=str(out_dir),
        fingerprint=fingerprint,
        held_out_accuracy=held_out.accuracy,
        eval_pairs=held_out.pairs,
        mlflow_run_id=run_id,
        registered_version=version,
        reference_fingerprint=reference.fingerprint,
        train_pairs=int(info["train_pairs"]),
        reused=reused,
        metrics={**held_out.as_metrics(), **training_metrics},
    )


def _train_model(
    open_db: OpenDb,
    reference: ReferenceHandle,
    settings: RewardModelSettings,
    out_dir: Any,
    fingerprint: str,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    with open_db() as con:
        train_pairs = store.read_pairs(con, split="train")
    result = train_reward_model(
        reference.path,
        train_pairs,
        out_dir,
        settings.training(),
        revision=reference.revision,
        trust_remote_code=reference.trust_remote_code,
        build_key=fingerprint,
        progress=progress,
    )
    log(
        f"reward model trained on {result.train_pairs} pairs in {result.steps} steps ({result.seconds:.1f} s)"
    )


def _record(
    open_db: OpenDb,
    fingerprint: str,
    reference: ReferenceHandle,
    pairs_digest: str,
    out_dir: Any,
    held_out: RewardHeldOut,
    info: dict[str, Any],
    settings: RewardModelSettings,
    run_id: str | None,
    version: str | None,
) -> None:
    """The reward model's row in DuckDB (reward_models), with its MLflow run and registered version if any."""
    with open_db() as con:
        store.record_reward_model(
            con,
            store.RewardModelRecord(
                fingerprint=fingerprint,
                reference_fingerprint=reference.fingerprint,
                pairs_digest=pairs_digest,
                path=str(out_dir),
                accuracy=held_out.accuracy,
                margin=held_out.margin,
                loss=held_out.loss,
                eval_pairs=held_out.pairs,
                train_pairs=int(info["train_pairs"]),
                settings=dataclasses.asdict(settings),
                mlflow_run_id=run_id,
                registered_version=version,
            ),
        )


def _held_out(
    previous: store.RewardModelRecord | None, out_dir: Any, eval_pairs: list, settings: RewardModelSettings
) -> RewardHeldOut:
    """The model's held-out figures: as recorded for this folder, else computed (the eval pairs are part of
    the model's key: the pairs digest covers every pair's split)."""
    if previous is not None and previous.eval_pairs == len(eval_pairs):
        return RewardHeldOut(previous.accuracy, previous.margin, previous.loss, previous.eval_pairs)
    return held_out_accuracy(load_reward_function(out_dir, batch_size=settings.eval_batch_size), eval_pairs)


def with_stored_reward_model(
    open_db: OpenDb, reference: ReferenceHandle, options: Mapping[str, Any]
) -> dict[str, Any]:
    """`options` (training settings) with grpo_reward_model filled in when grpo_reward is `model` and no folder
    is given: the newest reward model the reward_model asset trained on this reference."""
    options = dict(options)
    if options.get("grpo_reward") != "model" or options.get("grpo_reward_model"):
        return options
    with open_db() as con:
        record = store.latest_reward_model(con, reference.fingerprint)
    if record is None:
        raise UserInputError(
            "grpo_reward: model without grpo_reward_model: materialize the reward_model asset first (it trains one "
            "on this reference), or set grpo_reward_model to a reward model's folder"
        )
    options["grpo_reward_model"] = record.path
    return options


def _finished_and_registered(tracking_uri: str, name: str, run_id: str | None, version: str | None) -> bool:
    """Whether the recorded run finished and its version is still in the registry (then nothing is logged again)."""
    if run_id is None or version is None or tracking.run_status(tracking_uri, run_id) != "FINISHED":
        return False
    return any(
        str(v.version) == str(version) and v.run_id == run_id
        for v in tracking.model_versions(tracking_uri, name)
    )


def _track(
    tracking_to: RunTracking,
    registered_model: str,
    open_db: OpenDb,
    record: Callable[[str | None, str | None], None],
    resume: str | None,
    out_dir: Any,
    info: dict[str, Any],
    held_out: RewardHeldOut,
    reference: ReferenceHandle,
    settings: RewardModelSettings,
    pairs_digest: str,
    fingerprint: str,
) -> tuple[str, str]:
    """An MLflow run (a new one, or `resume`: one interrupted before it finished): parameters, TRL's training
    curve, the held-out metrics, the train pairs as a dataset, the folder registered as a new version of
    `registered_model`. The run is recorded in DuckDB as soon as it exists, so a crash before the end is
    resumed in the same run, which registers at most one version (tracking.register_model_folder)."""
    uri = tracking_to.uri
    run_id = resume or tracking.start_run(
        uri,
        tracking_to.experiment_id,
        "reward_model",
        tracking_to.tags,
        {
            **dataclasses.asdict(settings),
            "fingerprint": fingerprint,
            "path": str(out_dir),
            "train_pairs_used": info["train_pairs"],
            "reference_fingerprint": reference.fingerprint,
            "reference_mlflow_run_id": reference.mlflow_run_id,
        },
    )
    record(run_id, None)
    try:
        if not tracking.metric_history(
            uri, run_id, "eval_accuracy"
        ):  # a resumed run may have its curves already
            for entry in info.get("history", []):
                step = int(entry.get("step", 0))
                tracking.log_metrics(
                    uri, run_id, {k: v for k, v in entry.items() if k not in ("step", "epoch")}, step=step
                )
            with open_db() as con:
                frame = store.train_pairs_frame(con)
            tracking.log_dataset(uri, run_id, frame, "preference_pairs/train", pairs_digest[-16:], "training")
            tracking.log_metrics(uri, run_id, held_out.as_metrics(), step=int(info.get("steps", 0)))
        version = str(
            tracking.register_model_folder(
                uri,
                run_id,
                out_dir,
                registered_model,
                tags={
                    "held_out_accuracy": f"{held_out.accuracy:.4f}",
                    "eval_pairs": str(held_out.pairs),
                    "fingerprint": fingerprint,
                },
            )
        )
    except BaseException:
        tracking.finish_run(uri, run_id, failed=True)
        raise
    record(run_id, version)
    tracking.finish_run(uri, run_id)
    return run_id, version
