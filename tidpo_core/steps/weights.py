"""Weigh the tokens: hybrid importance (an importance estimate mixed with the Gaussian prior) and the
reference's log-probs for every chosen, rejected and anchor response, stored once for all training runs.

The responses without weights are weighed as a sharded precompute (tidpo_core.runtime.precompute): in this
process or in N processes through the training launcher, each shard whole batches of the same
responses whatever the process count, so the stored values are the same bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from tidpo_core import store
from tidpo_core.batching.chat import closing_token_id
from tidpo_core.batching.features import EncodingSettings, encode_response, side_texts, token_weights_row
from tidpo_core.method.importance import compute_token_importance
from tidpo_core.models.modeling import check_model_available, load_model_and_tokenizer
from tidpo_core.runtime.errors import UserInputError
from tidpo_core.runtime.fingerprint import digest, model_fingerprint, text_digest
from tidpo_core.runtime.launch import ProcessRunner
from tidpo_core.runtime.layout import DataDir
from tidpo_core.runtime.precompute import (
    PrecomputeSettings,
    ShardOutcome,
    ShardWorker,
    data_dir_of,
    make_plan,
    remove_folder,
    run_sharded,
    shard_size,
)
from tidpo_core.steps import OpenDb, log_to
from tidpo_core.steps.reference import ReferenceHandle

SHARD_KIND = "weights"


@dataclass(frozen=True)
class WeighingSettings:
    estimator: Literal["attribution", "surprisal", "contrastive"] = "attribution"
    """The raw importance I (docs/method.md section 1, other estimators): the paper's gradient attribution, the reference's surprisal
    -log pi_ref(y_t), or the contrastive |log pi_+ - log pi_-| of two models (paths below)."""
    exclude_eos: bool = False
    """The end-of-sequence token gets I = 0: it leaves the normalization and keeps the prior's term only."""
    contrastive_positive_path: str = ""
    """estimator contrastive: a model that prefers the chosen answers, with the reference's tokenizer.
    Empty: the newest pair the contrastive_models asset trained for this reference."""
    contrastive_negative_path: str = ""
    """estimator contrastive: a model that prefers the rejected answers (empty: see above)."""
    weight_lambda: float = 0.7
    """lambda of the hybrid weight: 0 is prior only, 1 attribution only (docs/method.md section 1)."""
    normalization: Literal["max", "sum", "softmax"] = "max"
    temperature: float = 1.0
    batch_size: int = 16
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    reference_kl_top_k: int = 0
    """Also store the reference's k most likely next tokens per response token (from the same forward),
    so that tidpo_policy with reference_kl: cached computes SeqKL without a reference model. 0: none."""

    @property
    def encoding(self) -> EncodingSettings:
        return EncodingSettings(self.max_prompt_tokens, self.max_response_tokens)


@dataclass(frozen=True)
class WeightsReport:
    fingerprint: str
    importance: dict[str, Any]
    """The settings the fingerprint covers: lambda, normalization, temperature (and the estimator off its default)."""
    computed: int
    expected: int
    summary: store.WeightsSummary
    shards: ShardOutcome | None = None
    """How the weighing was sharded (None: nothing to weigh)."""


def _contrastive_paths(
    open_db: OpenDb, reference: ReferenceHandle, settings: WeighingSettings
) -> tuple[str, str]:
    paths = (settings.contrastive_positive_path, settings.contrastive_negative_path)
    if not any(paths):
        with open_db() as con:
            paths = store.latest_contrastive_models(con, reference.fingerprint) or ("", "")
    if not all(paths):
        raise UserInputError(
            "estimator contrastive needs two contrastive models: materialize the contrastive_models asset first, "
            "or set contrastive_positive_path and contrastive_negative_path"
        )
    for path in paths:
        try:
            check_model_available(path)
        except OSError as exc:
            raise UserInputError(f"contrastive model: {exc}", model=path) from None
    return paths


def weights_identity(
    open_db: OpenDb, reference: ReferenceHandle, settings: WeighingSettings
) -> tuple[str, dict[str, Any], tuple[str, str]]:
    """(fingerprint, the importance settings it covers, the contrastive model paths if any)."""
    if settings.reference_kl_top_k < 0:
        raise UserInputError(f"reference_kl_top_k must be >= 0, got {settings.reference_kl_top_k}")
    importance: dict[str, Any] = {
        "lambda": settings.weight_lambda,
        "normalization": settings.normalization,
        "temperature": settings.temperature,
    }
    if settings.estimator != "attribution" or settings.exclude_eos:
        # Only off the default, so that weights stored before estimators existed keep their fingerprint.
        importance |= {"estimator": settings.estimator, "exclude_eos": settings.exclude_eos}
    contrastive = ("", "")
    if settings.estimator == "contrastive":
        contrastive = _contrastive_paths(open_db, reference, settings)
        importance["contrastive_models"] = [model_fingerprint(path) for path in contrastive]
    fingerprint = digest(
        {
            "model": reference.fingerprint,
            "encoding": settings.encoding.__dict__,
            "importance": importance,
            # Only when set, so that weights stored before the option existed keep their fingerprint.
            **({"reference_kl_top_k": settings.reference_kl_top_k} if settings.reference_kl_top_k else {}),
        }
    )
    return fingerprint, importance, contrastive


def shard_worker(task: Mapping[str, Any]) -> ShardWorker:
    """The weights' computation in a precompute process: the reference (and contrastive models) loaded
    once, then per shard its responses encoded and weighed in batches of the settings' size."""
    settings = WeighingSettings(**task["settings"])
    model, tokenizer = load_model_and_tokenizer(**task["reference"])
    contrastive = None
    if settings.estimator == "contrastive":
        contrastive = tuple(load_model_and_tokenizer(path)[0] for path in task["contrastive_paths"])

    def weigh(items: pa.Table, progress: bool) -> pa.Table:
        keys = list(
            zip(*(items.column(name).to_pylist() for name in ("pair_id", "side", "text_digest")), strict=True)
        )
        encoded = [
            encode_response(tokenizer, prompt, text, settings.encoding)
            for prompt, text in zip(
                items.column("prompt").to_pylist(), items.column("text").to_pylist(), strict=True
            )
        ]
        importances = compute_token_importance(
            model,
            encoded,
            lambda_=settings.weight_lambda,
            normalization=settings.normalization,
            temperature=settings.temperature,
            batch_size=settings.batch_size,
            progress=progress,
            reference_topk=settings.reference_kl_top_k,
            estimator=settings.estimator,
            exclude_eos=settings.exclude_eos,
            eos_token_id=closing_token_id(tokenizer),  # a chat model's end-of-turn token
            contrastive_models=contrastive,
        )
        return store.weight_shard_table(
            token_weights_row(*key, enc, imp)
            for key, enc, imp in zip(keys, encoded, importances, strict=True)
        )

    return ShardWorker(weigh, (model, *(contrastive or ())))


def weigh_tokens(
    open_db: OpenDb,
    reference: ReferenceHandle,
    anchors_fingerprint: str | None,
    settings: WeighingSettings,
    *,
    precompute: PrecomputeSettings = PrecomputeSettings(),
    layout: DataDir | None = None,
    run_process: ProcessRunner | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> WeightsReport:
    """Weights for every train response (chosen, rejected and, with anchors, the anchor) that has none under
    these settings yet; a re-run computes only what is missing.

    `precompute` says how (in this process, or N processes); `layout` is the data dir that holds the
    shards in flight (default: the DuckDB file's folder); `run_process` runs a launched command (Dagster
    Pipes in the asset; a plain subprocess by default).
    """
    say = log_to(log)
    fingerprint, importance, contrastive_paths = weights_identity(open_db, reference, settings)
    with open_db() as con:
        pairs = store.read_pairs(con, split="train")
        anchors = store.read_anchors(con, anchors_fingerprint) if anchors_fingerprint else {}
        existing = store.existing_weight_keys(con, fingerprint)
        layout = layout or DataDir.at(data_dir_of(con))
    wanted = [
        ((pair.pair_id, side, text_digest(text)), pair.prompt, text)
        for pair in pairs
        for side, text in side_texts(pair, anchors.get(pair.pair_id)).items()
    ]
    # Sorted by key: the plan's order, the same whichever order the pairs were read in.
    todo = sorted(item for item in wanted if item[0] not in existing)
    say(f"{len(todo)} responses to weigh, {len(wanted) - len(todo)} reused")
    outcome = None
    if todo:
        task = {
            "reference": reference.loading(),
            "settings": dataclasses.asdict(settings),
            "contrastive_paths": list(contrastive_paths),
        }
        keys = [key for key, _, _ in todo]
        plan = make_plan(
            SHARD_KIND, fingerprint, task, keys, shard_size(settings.batch_size, precompute.batches_per_shard)
        )
        items = pa.table(
            {
                "pair_id": [key[0] for key in keys],
                "side": [key[1] for key in keys],
                "text_digest": [key[2] for key in keys],
                "prompt": [prompt for _, prompt, _ in todo],
                "text": [text for _, _, text in todo],
            }
        )
        outcome = run_sharded(
            layout.precompute(SHARD_KIND, fingerprint),
            plan,
            items,
            precompute,
            run_process=run_process,
            progress=progress,
            log=say,
        )
        with open_db() as con:
            loaded = store.load_weight_shards(con, fingerprint, outcome.files)
        remove_folder(outcome.folder)
        say(
            f"{loaded} responses' weights loaded from {outcome.planned} shards ({outcome.reused} reused from an interrupted run)"
        )
    else:
        # A run killed after its load committed but before the folder went: the shards are in DuckDB.
        remove_folder(layout.precompute(SHARD_KIND, fingerprint))
    with open_db() as con:
        summary = store.weights_summary(con, fingerprint)
    return WeightsReport(fingerprint, importance, len(todo), len(wanted), summary, outcome)
