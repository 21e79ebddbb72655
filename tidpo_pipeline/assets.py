"""The tidpo asset graph: pairs -> reference model -> anchors -> token weights -> policy -> evaluation.

Assets are thin: they read configuration, call tidpo_core, and record metadata and lineage. Each
returns a small handle (paths, fingerprints, run ids) that downstream assets receive as input; the
data itself lives in DuckDB, model folders and MLflow.
"""


import dataclasses
import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import mlflow
import torch
from dagster._core.errors import DagsterPipesExecutionError
from mlflow.exceptions import MlflowException

from tidpo_core import store, tracking
from tidpo_core.contrastive import (
    ContrastiveSFT,
    contrastive_paths,
    is_built,
    load_base,
    train_contrastive_pair,
)
from tidpo_core.data import DataFileError
from tidpo_core.features import EncodingSettings, encode_response, side_texts, token_weights_row
from tidpo_core.fingerprint import digest, model_fingerprint, text_digest
from tidpo_core.generation import SamplingSettings, sample_responses
from tidpo_core.importance import compute_token_importance
from tidpo_core.modeling import (
    TinyModelConfig,
    build_tiny_model,
    check_model_available,
    count_parameters,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
    train_tokenizer,
)
from tidpo_core.sft import sft_texts, supervised_finetune
from tidpo_core.sources import (
    inbox_files,
    keep_at_most,
    load_source,
    merge_loads,
    refuse_sources_without_pairs,
)
from tidpo_core.train import FAILURE_FILE, TrainConfig
from tidpo_pipeline.metadata import GROUP, markdown_table, mlflow_tags, where_they_differ
from tidpo_pipeline.resources import MlflowTracking, TidpoDuckDB, TidpoStorage, bind_to_parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --- preference_pairs ------------------------------------------------------------------------------


def user_error(message: str, **context: Any) -> dg.Failure:
    """A failure caused by the user's input (a bad file, a missing model, a wrong setting), not by a bug:
    raised `from None`, so the log shows the message and the paths (as metadata), not chained tracebacks."""
    metadata = {name: dg.MetadataValue.json(value) if isinstance(value, list | dict) else str(value) for name, value in context.items()}
    return dg.Failure(description=message, metadata=metadata)


class PreferencePairsConfig(dg.Config):
    source: str = "synthetic"
    """`synthetic` (built-in corpus), a JSONL/Parquet/CSV file, a local data set folder, or a hub id."""
    synthetic_pairs: int = 2000
    synthetic_seed: int = 0
    synthetic_span_position: Literal["middle", "uniform"] = "middle"
    """Where the built-in corpus puts each answer's critical span: mostly mid-answer (`middle`, where the
    Gaussian prior looks) or anywhere (`uniform`, so the prior has no built-in advantage)."""
    split: str = "train"
    """Split to read from a hub data set or folder."""
    eval_fraction: float = 0.1
    max_chars: int = 20_000
    include_inbox: bool = True
    """Also load every data file dropped into <data_dir>/inbox."""
    max_pairs: int | None = None
    """Keep at most this many accepted pairs (all sources together): the first N after a shuffle seeded by
    `max_pairs_seed`, so the same file and settings always keep the same pairs. None: keep all."""
    max_pairs_seed: int = 0


@dg.asset(group_name=GROUP, kinds={"duckdb"}, description="Validated preference pairs with a train/eval split; bad rows go to the quarantine table.")
def preference_pairs(
    context: dg.AssetExecutionContext, config: PreferencePairsConfig, storage: TidpoStorage, duckdb: TidpoDuckDB
) -> dg.MaterializeResult:
    sources = [config.source] + ([str(p) for p in inbox_files(storage.inbox_dir)] if config.include_inbox else [])
    loads = []
    for source in sources:
        try:
            loads.append(
                load_source(
                    source,
                    synthetic_pairs=config.synthetic_pairs,
                    synthetic_seed=config.synthetic_seed,
                    synthetic_span_position=config.synthetic_span_position,
                    split=config.split,
                    max_chars=config.max_chars,
                )
            )
        except (DataFileError, FileNotFoundError) as exc:
            # Nothing has been written yet: the stored pairs stay exactly as they were.
            raise user_error(f"cannot load preference data from {source}: {exc}", source=source) from None
    try:
        refuse_sources_without_pairs(list(zip(sources, loads, strict=True)))
    except DataFileError as exc:
        raise user_error(str(exc), sources=sources) from None
    merged = merge_loads(loads)
    result = keep_at_most(merged, config.max_pairs, config.max_pairs_seed)
    with duckdb.get_connection() as con:
        summary = store.replace_pairs(con, result, config.eval_fraction)
        pairs_digest = store.table_digest(con, "SELECT pair_id, split FROM preference_pairs")
        preview = con.execute(
            "SELECT pair_id, split, prompt, chosen, rejected FROM preference_pairs ORDER BY pair_id LIMIT 5"
        ).fetchall()
        quarantine_preview = con.execute(
            "SELECT source, line_1based, reason, detail FROM quarantine ORDER BY source, line_1based LIMIT 10"
        ).fetchall()
    reasons = result.reason_counts()
    context.log.info(
        f"{summary.pairs} pairs stored ({summary.train} train / {summary.eval} eval), {summary.quarantined} quarantined, "
        f"{result.skipped_rows} rows skipped {result.skipped or ''}"
    )
    return dg.MaterializeResult(
        value={"digest": pairs_digest, "train": summary.train, "eval": summary.eval},
        metadata={
            "dagster/row_count": summary.pairs,
            "rows_read": result.rows_read,
            "accepted": result.accepted,
            "quarantined": summary.quarantined,
            "skipped": result.skipped_rows,
            "skipped_reasons": dg.MetadataValue.json(result.skipped),
            "pairs_available": merged.accepted,
            "max_pairs": str(config.max_pairs),
            "quarantine_share": result.quarantine_share,
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "train_pairs": summary.train,
            "eval_pairs": summary.eval,
            "sources": dg.MetadataValue.json(sources),
            "digest": pairs_digest,
            "preview": dg.MetadataValue.md(markdown_table([_preview_row(*row) for row in preview], 120)),
            "quarantine_preview": dg.MetadataValue.md(
                markdown_table([dict(zip(["source", "line (from 1)", "reason", "detail"], r, strict=True)) for r in quarantine_preview])
            ),
        },
    )


def _preview_row(pair_id: str, split: str, prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    chosen_part, rejected_part = where_they_differ(chosen, rejected)
    return {"pair_id": pair_id, "split": split, "prompt": prompt, "chosen (where it differs)": chosen_part, "rejected (where it differs)": rejected_part}


# --- reference_model -------------------------------------------------------------------------------


class ReferenceModelConfig(dg.Config):
    model_name_or_path: str = ""
    """Hub id (e.g. meta-llama/Llama-3.1-8B-Instruct) or local folder; empty builds the embedded tiny model."""
    revision: str | None = None
    trust_remote_code: bool = False
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    sft_steps: int = 300
    sft_on: Literal["chosen", "both"] = "both"
    """`both`: the reference learns the language of both answers, so preferring one is left to preference training."""
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 0


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, description="The starting policy: a configured checkpoint, or the embedded tiny Llama with a locally trained tokenizer and a short SFT.")
def reference_model(
    context: dg.AssetExecutionContext,
    config: ReferenceModelConfig,
    preference_pairs: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    experiment_id = mlflow_tracking.experiment_id()  # fails early if tracking is down
    metadata: dict[str, Any] = {}
    parameters: int | None = None
    if config.model_name_or_path:
        # Validate the checkpoint without loading its weights: an 8B model has no business in the
        # orchestrator's memory; the steps that need it load it themselves.
        try:
            model_config = check_model_available(
                config.model_name_or_path, trust_remote_code=config.trust_remote_code, revision=config.revision
            )
        except OSError as exc:  # a missing folder, a file, an unknown hub id, no network
            raise user_error(f"reference model: {exc}", model=config.model_name_or_path) from None
        path = config.model_name_or_path
        metadata["architecture"] = (model_config.architectures or ["?"])[0]
        sft_losses: list[float] = []
        base: dict[str, Any] = {"path": path, "revision": config.revision, "trust_remote_code": config.trust_remote_code}
    else:
        tiny_config = TinyModelConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
        )
        # What the reference starts from: the contrastive importance models fine-tune the same base.
        base = {"tiny_config": dataclasses.asdict(tiny_config), "seed": config.seed}
        build_key = digest({"pairs": preference_pairs["digest"], "config": config.model_dump()})
        path = storage.models_dir / "reference"
        marker = path / "tidpo_build.json"
        if marker.exists() and json.loads(marker.read_text()).get("build_key") == build_key:
            context.log.info(f"reference model at {path} is up to date; reusing it")
            model, tokenizer = load_model_and_tokenizer(path)
            sft_losses = json.loads(marker.read_text()).get("sft_losses", [])
        else:
            with duckdb.get_connection() as con:
                pairs = store.read_pairs(con, split="train")
            texts = [text for p in pairs for text in (p.prompt, p.chosen, p.rejected)]
            tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
            model = build_tiny_model(tokenizer, tiny_config, seed=config.seed)
            sft_losses = supervised_finetune(
                model,
                tokenizer,
                sft_texts(pairs, config.sft_on),
                steps=config.sft_steps,
                batch_size=config.sft_batch_size,
                learning_rate=config.sft_learning_rate,
                seed=config.seed,
                progress=True,
            )
            staging = path.with_name("reference.staging")
            shutil.rmtree(staging, ignore_errors=True)
            save_model_and_tokenizer(model, tokenizer, staging)
            (staging / "tidpo_build.json").write_text(json.dumps({"build_key": build_key, "sft_losses": sft_losses}))
            shutil.rmtree(path, ignore_errors=True)
            staging.rename(path)
        parameters = count_parameters(model)
        metadata["vocab_size"] = len(tokenizer)
    fingerprint = model_fingerprint(path, config.revision)
    client = tracking.client(mlflow_tracking.uri)
    run = client.create_run(experiment_id, run_name="reference_model", tags=mlflow_tags(context))
    client.log_batch(
        run.info.run_id,
        params=[
            mlflow.entities.Param(k, str(v)[:500])
            for k, v in {**config.model_dump(), "fingerprint": fingerprint, "path": str(path)}.items()
        ],
    )
    for step, loss in enumerate(sft_losses):
        client.log_metric(run.info.run_id, "sft/loss", loss, step=step)
    client.set_terminated(run.info.run_id)
    metadata.update(
        {
            "path": dg.MetadataValue.path(str(path)),
            "fingerprint": fingerprint,
            "parameters": parameters if parameters is not None else "not loaded",
            "mlflow_run_id": run.info.run_id,
            "sft_first_loss": sft_losses[0] if sft_losses else float("nan"),
            "sft_last_loss": sft_losses[-1] if sft_losses else float("nan"),
        }
    )
    return dg.MaterializeResult(
        value={
            "path": str(path),
            "fingerprint": fingerprint,
            "mlflow_run_id": run.info.run_id,
            "revision": config.revision,
            "trust_remote_code": config.trust_remote_code,
            "base": base,
        },
        metadata=metadata,
    )


def reference_loading(reference_model: dict) -> dict[str, Any]:
    """Arguments of `load_model_and_tokenizer` for the reference_model asset's handle."""
    return {
        "name_or_path": reference_model["path"],
        "revision": reference_model.get("revision"),
        "trust_remote_code": reference_model.get("trust_remote_code", False),
    }


# --- anchor_responses ------------------------------------------------------------------------------


class AnchorConfig(dg.Config):
    max_new_tokens: int = 64
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 0.8
    seed: int = 0
    batch_size: int = 32
    max_prompt_tokens: int = 192


@dg.asset(group_name=GROUP, kinds={"duckdb", "pytorch"}, description="One response per train prompt sampled from the reference policy: the triplet loss's anchor.")
def anchor_responses(
    context: dg.AssetExecutionContext,
    config: AnchorConfig,
    preference_pairs: dict,
    reference_model: dict,
    duckdb: TidpoDuckDB,
) -> dg.MaterializeResult:
    settings = SamplingSettings(**config.model_dump())
    fingerprint = digest({"model": reference_model["fingerprint"], "sampling": settings.as_dict()})
    with duckdb.get_connection() as con:
        missing = set(store.missing_anchor_pair_ids(con, fingerprint))
        pairs = [p for p in store.read_pairs(con, split="train") if p.pair_id in missing]
    context.log.info(f"{len(pairs)} anchors to sample, {preference_pairs['train'] - len(pairs)} reused")
    generated = 0
    if pairs:
        model, tokenizer = load_model_and_tokenizer(**reference_loading(reference_model))
        # Written in chunks, each in one transaction: a crash keeps finished chunks and loses no more.
        chunk = max(settings.batch_size * 8, 1)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            texts = sample_responses(model, tokenizer, [p.prompt for p in part], settings, progress=True)
            with duckdb.get_connection() as con:
                generated += store.insert_anchors(
                    con, fingerprint, {p.pair_id: t for p, t in zip(part, texts, strict=True)}, settings.as_dict()
                )
    with duckdb.get_connection() as con:
        preview = con.execute(
            "SELECT a.pair_id, p.prompt, a.anchor FROM anchor_responses a JOIN preference_pairs p USING (pair_id) "
            "WHERE a.fingerprint = ? ORDER BY a.pair_id LIMIT 5",
            [fingerprint],
        ).fetchall()
        stored = con.execute("SELECT count(*) FROM anchor_responses WHERE fingerprint = ?", [fingerprint]).fetchone()[0]
    return dg.MaterializeResult(
        value={"fingerprint": fingerprint},
        metadata={
            "fingerprint": fingerprint,
            "generated": generated,
            "reused": stored - generated,
            "dagster/row_count": stored,
            "sampling": dg.MetadataValue.json(settings.as_dict()),
            "preview": dg.MetadataValue.md(
                markdown_table([dict(zip(["pair_id", "prompt", "anchor"], r, strict=True)) for r in preview], 80)
            ),
        },
    )


# --- contrastive_models ----------------------------------------------------------------------------


class ContrastiveModelsConfig(dg.Config):
    sft_steps: int = 300
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 0


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "duckdb"},
    description="Two contrastive models for the `contrastive` importance estimator (TIS-DPO): the reference's base "
    "fine-tuned on the chosen answers only and on the rejected answers only. Not part of tidpo_training: "
    "materialize it before token_weights with estimator: contrastive.",
)
def contrastive_models(
    context: dg.AssetExecutionContext,
    config: ContrastiveModelsConfig,
    preference_pairs: dict,
    reference_model: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
) -> dg.MaterializeResult:
    recipe = ContrastiveSFT(config.sft_steps, config.sft_batch_size, config.sft_learning_rate, config.seed)
    fingerprint = digest(
        {"pairs": preference_pairs["digest"], "base": reference_model["base"], "recipe": dataclasses.asdict(recipe)}
    )
    out_dir = storage.models_dir / "contrastive" / fingerprint
    paths = [str(p) for p in contrastive_paths(out_dir)]
    reused = is_built(out_dir, fingerprint)
    losses: dict[str, list[float]] = {}
    if reused:
        context.log.info(f"contrastive models at {out_dir} are up to date; reusing them")
    else:
        with duckdb.get_connection() as con:
            pairs = store.read_pairs(con, split="train")
        _, tokenizer = load_model_and_tokenizer(**reference_loading(reference_model))
        base = load_base(reference_model["base"], tokenizer)
        losses = train_contrastive_pair(base, tokenizer, pairs, out_dir, recipe=recipe, build_key=fingerprint, progress=True)
    with duckdb.get_connection() as con:
        store.record_contrastive_models(con, fingerprint, reference_model["fingerprint"], paths, dataclasses.asdict(recipe))
    return dg.MaterializeResult(
        value={"fingerprint": fingerprint, "paths": paths},
        metadata={
            "fingerprint": fingerprint,
            "positive": dg.MetadataValue.path(paths[0]),
            "negative": dg.MetadataValue.path(paths[1]),
            "reused": reused,
            **{f"sft_last_loss/{name}": curve[-1] for name, curve in losses.items() if curve},
        },
    )


# --- token_weights ---------------------------------------------------------------------------------


class TokenWeightsConfig(dg.Config):
    estimator: Literal["attribution", "surprisal", "contrastive"] = "attribution"
    """The raw importance I (METHOD.md 1b): the paper's gradient attribution, the reference's surprisal
    -log pi_ref(y_t), or the contrastive |log pi_+ - log pi_-| of two models (paths below)."""
    exclude_eos: bool = False
    """The end-of-sequence token gets I = 0: it leaves the normalization and keeps the prior's term only."""
    contrastive_positive_path: str = ""
    """estimator contrastive: a model that prefers the chosen answers, with the reference's tokenizer.
    Empty: the newest pair the contrastive_models asset trained for this reference."""
    contrastive_negative_path: str = ""
    """estimator contrastive: a model that prefers the rejected answers (empty: see above)."""
    weight_lambda: float = 0.7
    """lambda of the hybrid weight: 0 is prior only, 1 attribution only (METHOD.md section 1)."""
    normalization: Literal["max", "sum", "softmax"] = "max"
    temperature: float = 1.0
    batch_size: int = 16
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    write_every: int = 512
    """Responses per DuckDB transaction; a crash loses at most one chunk of work."""
    reference_kl_top_k: int = 0
    """Also store the reference's k most likely next tokens per response token (from the same forward),
    so that tidpo_policy with reference_kl: cached computes SeqKL without a reference model. 0: none."""


@dg.asset(group_name=GROUP, kinds={"duckdb", "pytorch"}, description="Per-token hybrid importance (an importance estimate, by default the paper's gradient attribution, + Gaussian prior) and reference log-probs for chosen, rejected and anchor responses.")
def token_weights(
    context: dg.AssetExecutionContext,
    config: TokenWeightsConfig,
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    duckdb: TidpoDuckDB,
) -> dg.MaterializeResult:
    settings = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    importance_settings = {"lambda": config.weight_lambda, "normalization": config.normalization, "temperature": config.temperature}
    contrastive_model_paths = (config.contrastive_positive_path, config.contrastive_negative_path)
    if config.estimator != "attribution" or config.exclude_eos:
        # Only off the default, so that weights stored before estimators existed keep their fingerprint.
        importance_settings |= {"estimator": config.estimator, "exclude_eos": config.exclude_eos}
    if config.estimator == "contrastive":
        if not any(contrastive_model_paths):
            with duckdb.get_connection() as con:
                contrastive_model_paths = store.latest_contrastive_models(con, reference_model["fingerprint"]) or ("", "")
        if not all(contrastive_model_paths):
            raise dg.Failure(
                "estimator contrastive needs two contrastive models: materialize the contrastive_models asset first, "
                "or set contrastive_positive_path and contrastive_negative_path"
            )
        for path in contrastive_model_paths:
            try:
                check_model_available(path)
            except OSError as exc:
                raise user_error(f"contrastive model: {exc}", model=path) from None
        importance_settings["contrastive_models"] = [model_fingerprint(path) for path in contrastive_model_paths]
    if config.reference_kl_top_k < 0:
        raise dg.Failure(f"reference_kl_top_k must be >= 0, got {config.reference_kl_top_k}")
    fingerprint = digest(
        {
            "model": reference_model["fingerprint"],
            "encoding": settings.__dict__,
            "importance": importance_settings,
            # Only when set, so that weights stored before the option existed keep their fingerprint.
            **({"reference_kl_top_k": config.reference_kl_top_k} if config.reference_kl_top_k else {}),
        }
    )
    with duckdb.get_connection() as con:
        pairs = store.read_pairs(con, split="train")
        anchors = store.read_anchors(con, anchor_responses["fingerprint"])
        existing = store.existing_weight_keys(con, fingerprint)
    todo = []
    for pair in pairs:
        for side, text in side_texts(pair, anchors.get(pair.pair_id)).items():
            key = (pair.pair_id, side, text_digest(text))
            if key not in existing:
                todo.append((key, pair.prompt, text))
    expected = sum(len(side_texts(p, anchors.get(p.pair_id))) for p in pairs)
    context.log.info(f"{len(todo)} responses to weigh, {expected - len(todo)} reused")
    if todo:
        model, tokenizer = load_model_and_tokenizer(**reference_loading(reference_model))
        contrastive = None
        if config.estimator == "contrastive":
            contrastive = tuple(load_model_and_tokenizer(path)[0] for path in contrastive_model_paths)
        for start in range(0, len(todo), config.write_every):
            part = todo[start : start + config.write_every]
            encoded = [encode_response(tokenizer, prompt, text, settings) for _, prompt, text in part]
            importances = compute_token_importance(
                model,
                encoded,
                lambda_=config.weight_lambda,
                normalization=config.normalization,
                temperature=config.temperature,
                batch_size=config.batch_size,
                progress=True,
                reference_topk=config.reference_kl_top_k,
                estimator=config.estimator,
                exclude_eos=config.exclude_eos,
                eos_token_id=tokenizer.eos_token_id,
                contrastive_models=contrastive,
            )
            rows = [
                token_weights_row(*key, enc, imp) for (key, _, _), enc, imp in zip(part, encoded, importances, strict=True)
            ]
            with duckdb.get_connection() as con:
                store.write_token_weights(con, fingerprint, rows)
    with duckdb.get_connection() as con:
        stats = con.execute(
            "SELECT count(*), count(DISTINCT (pair_id, side)), avg(attribution), avg(weight) FROM token_weights WHERE fingerprint = ?",
            [fingerprint],
        ).fetchone()
    return dg.MaterializeResult(
        value={
            "fingerprint": fingerprint,
            "encoding": settings.__dict__,
            "importance": importance_settings,
            "reference_kl_top_k": config.reference_kl_top_k,
        },
        metadata={
            "fingerprint": fingerprint,
            "dagster/row_count": stats[0],
            "responses": stats[1],
            "computed": len(todo),
            "reused": expected - len(todo),
            "mean_attribution": float(stats[2] or 0.0),
            "mean_weight": float(stats[3] or 0.0),
            "reference_kl_top_k": config.reference_kl_top_k,
            "estimator": config.estimator + (" (eos excluded)" if config.exclude_eos else ""),
            "settings": dg.MetadataValue.json({"encoding": settings.__dict__, **importance_settings}),
        },
    )


# --- tidpo_policy ----------------------------------------------------------------------------------


class PolicyConfig(dg.Config):
    loss_type: Literal["dpo", "ipo", "simpo", "tidpo"] = "tidpo"
    beta: float = 0.1
    alpha: float = 0.5
    gamma: float = 0.1
    triplet_margin: float = 0.01
    triplet_space: Literal["sequence", "weighted_mean", "hidden"] = "sequence"
    weight_lambda: float | None = None
    """None: the lambda the token_weights were computed with. 0 / 1 run the paper's weight ablations."""
    uniform_weights: bool = False
    learning_rate: float = 5e-4
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = 10
    num_epochs: int = 1
    max_steps: int = -1
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    init_from: Literal["reference", "champion"] = "reference"
    """Where the policy's weights start. `champion`: continue from the current champion (a retraining on new
    data keeps what it learned); log-ratios and the KL still use the reference. Without a champion yet,
    the reference. Not with LoRA."""
    anchor_refresh_every: int = 0
    """Re-sample every train pair's anchor from the current policy every N optimizer steps (0: keep the
    anchor_responses asset's reference samples). Each refresh samples all train prompts and weighs the new
    anchors with the reference (loaded for it if the KL term does not already need it)."""
    reference_kl: Literal["forward", "cached"] = "forward"
    """SeqKL's reference distribution: `forward` runs the frozen reference every step (exact, METHOD.md);
    `cached` reads the top-k the token_weights asset stored (needs its reference_kl_top_k > 0): the step
    runs the policy only and no second model is loaded."""
    batch_layout: Literal["shared_prompt", "padded"] = "shared_prompt"
    """`shared_prompt`: one row per pair, its prompt read once (needs sdpa or eager attention); `padded`:
    one padded row per side, as TRL does (for flash-attention 2). Same loss up to rounding."""
    weights_mode: Literal["precomputed", "online"] = "precomputed"
    """`online` recomputes the attribution with the current policy every step (the paper's way, ~2x cost)."""
    lora: bool = False
    """Train a LoRA adapter instead of all weights; the KL reference is the base with the adapter disabled."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = ["q_proj", "v_proj"]
    merge_lora: bool = True
    """Merge the adapter into the saved model (a plain HF model); false saves the adapter only."""
    launcher: Literal["python", "accelerate"] = "python"
    """`python`: one process; `accelerate`: `accelerate launch` with the config file / process count below."""
    accelerate_config_file: str = ""
    num_processes: int = 1
    register_model: bool = True


# PolicyConfig fields that are not the engine's (how to launch it, whether to register the result), and
# weight_lambda, whose None the asset resolves from the token_weights it trains on.
_ASSET_ONLY_FIELDS = {"launcher", "accelerate_config_file", "num_processes", "register_model", "weight_lambda", "init_from"}


def training_fields(config: PolicyConfig) -> dict[str, Any]:
    """The PolicyConfig values that the engine's TrainConfig takes as they are (same names)."""
    return {k: v for k, v in config.model_dump().items() if k not in _ASSET_ONLY_FIELDS}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _training_command(config: PolicyConfig, config_path: Path) -> list[str]:
    module = ["-m", "tidpo_core.train", "--config", str(config_path)]
    if config.launcher == "python":
        return [sys.executable, *module]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.accelerate_config_file:
        launch += ["--config_file", config.accelerate_config_file]
    else:
        launch += ["--num_processes", str(config.num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
        launch += ["--main_process_port", str(_free_port())]  # two runs at once must not share 29500
        if not torch.cuda.is_available():
            launch += ["--mixed_precision", "no"]
        if config.num_processes > 1:
            # torchrun; the engine falls back to CPU + gloo itself when no GPU is visible (`--cpu` would
            # make accelerate start a single process whatever num_processes says).
            launch += ["--multi_gpu"]
        elif not torch.cuda.is_available():
            launch += ["--cpu"]
    return [*launch, *module]


def _log_training_inputs(tracking_uri: str, run_id: str, duckdb: TidpoDuckDB, preference_pairs: dict) -> None:
    """Lineage: the training table as an MLflow dataset (name, digest, row count)."""
    with duckdb.get_connection() as con:
        frame = con.execute(
            "SELECT pair_id, prompt, chosen, rejected, source FROM preference_pairs WHERE split = 'train' ORDER BY pair_id"
        ).df()
    dataset = mlflow.data.from_pandas(frame, name="preference_pairs/train", digest=preference_pairs["digest"][-16:])
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context="training")


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, description="The trained policy: an accelerate-driven TI-DPO run launched through Dagster Pipes, checkpointed and resumable, registered in MLflow.")
def tidpo_policy(
    context: dg.AssetExecutionContext,
    config: PolicyConfig,
    preference_pairs: dict,
    reference_model: dict,
    anchor_responses: dict,
    token_weights: dict,
    storage: TidpoStorage,
    duckdb: TidpoDuckDB,
    mlflow_tracking: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    if config.reference_kl == "cached" and config.loss_type == "tidpo" and config.alpha > 0 and not token_weights.get("reference_kl_top_k"):
        raise dg.Failure(
            "reference_kl: cached needs the reference top-k stored with the token weights: "
            "materialize token_weights with reference_kl_top_k > 0 (e.g. 64) first"
        )
    experiment_id = mlflow_tracking.experiment_id()
    lambda_ = config.weight_lambda if config.weight_lambda is not None else token_weights["importance"]["lambda"]
    start_version = (
        tracking.champion_version(mlflow_tracking.uri, mlflow_tracking.registered_model) if config.init_from == "champion" else None
    )
    if config.init_from == "champion" and start_version is None:
        context.log.info("init_from: champion, but there is no champion yet: starting from the reference")
    run_key = digest(
        {
            "start": start_version,
            "pairs": preference_pairs["digest"],
            "reference": reference_model["fingerprint"],
            "anchors": anchor_responses["fingerprint"],
            "weights": token_weights["fingerprint"],
            "config": config.model_dump(),
        }
    )
    run_dir = storage.models_dir / "policy" / run_key
    run_dir.mkdir(parents=True, exist_ok=True)
    init_model_path = None
    if start_version is not None:
        init_model_path = run_dir / f"init_champion_v{start_version}"
        if not (init_model_path / "config.json").exists():
            champion_model, champion_tokenizer = tracking.load_registered_model(
                mlflow_tracking.uri, f"models:/{mlflow_tracking.registered_model}/{start_version}"
            )
            save_model_and_tokenizer(champion_model, champion_tokenizer, init_model_path)
    client = tracking.client(mlflow_tracking.uri)
    run_file = run_dir / "mlflow_run.json"
    run_id = None
    if run_file.exists():  # an interrupted run with these exact inputs: resume it, in the same MLflow run
        previous = json.loads(run_file.read_text())["run_id"]
        try:
            status = client.get_run(previous).info.status
        except MlflowException:  # deleted from MLflow since: start over in a new run
            status = "DELETED"
        if status not in ("FINISHED", "DELETED"):
            run_id = previous
            context.log.info(f"resuming MLflow run {run_id} from the checkpoints in {run_dir}")
    if run_id is None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        run_id = client.create_run(experiment_id, run_name=f"tidpo_policy-{config.loss_type}", tags=mlflow_tags(context)).info.run_id
        run_file.write_text(json.dumps({"run_id": run_id}))
        client.log_batch(
            run_id,
            params=[
                mlflow.entities.Param(k, str(v)[:500])
                for k, v in {
                    **config.model_dump(),
                    "weight_lambda": lambda_,
                    "reference_fingerprint": reference_model["fingerprint"],
                    "weights_fingerprint": token_weights["fingerprint"],
                    "anchors_fingerprint": anchor_responses["fingerprint"],
                    "reference_mlflow_run_id": reference_model["mlflow_run_id"],
                }.items()
            ],
        )
        _log_training_inputs(mlflow_tracking.uri, run_id, duckdb, preference_pairs)
    train_config = TrainConfig(
        duckdb_path=str(storage.duckdb_path),
        reference_model_path=reference_model["path"],
        reference_revision=reference_model.get("revision"),
        trust_remote_code=reference_model.get("trust_remote_code", False),
        output_dir=str(run_dir),
        weights_fingerprint=token_weights["fingerprint"],
        anchors_fingerprint=anchor_responses["fingerprint"],
        **training_fields(config),
        init_model_path=str(init_model_path) if init_model_path else None,
        weight_lambda=lambda_,
        weight_normalization=token_weights["importance"]["normalization"],
        max_prompt_tokens=token_weights["encoding"]["max_prompt_tokens"],
        max_response_tokens=token_weights["encoding"]["max_response_tokens"],
        mlflow_tracking_uri=mlflow_tracking.uri,
        mlflow_run_id=run_id,
        progress=True,
    )
    config_path = train_config.to_yaml(run_dir / "train.yaml")
    try:
        # Dagster's own Pipes context reads a preview property of every message reader; the warning is
        # about Dagster's internals, not about anything this asset does.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader.expected_writer_count`", category=dg.PreviewWarning)
            invocation = pipes_subprocess_client.run(
                context=context,
                command=bind_to_parent(_training_command(config, config_path)),  # dies with this step
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"},
            )
    except DagsterPipesExecutionError as exc:
        client.set_terminated(run_id, status="FAILED")
        failure = run_dir / FAILURE_FILE
        reason = failure.read_text() if failure.exists() else "no reason recorded; see the step's log"
        raise dg.Failure(
            description=f"training failed: {reason}",
            metadata={"run_dir": dg.MetadataValue.path(str(run_dir)), "mlflow_run_id": run_id},
        ) from exc
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    reported = invocation.get_materialize_result().metadata
    summary = json.loads((run_dir / "summary.json").read_text())
    client.log_artifact(run_id, str(run_dir / "train.yaml"))
    client.log_artifact(run_id, str(run_dir / "summary.json"))
    version = None
    if config.register_model:
        info = tracking.log_transformers_model(mlflow_tracking.uri, run_id, summary["final_model_path"], mlflow_tracking.registered_model)
        version = getattr(info, "registered_model_version", None)
    client.set_terminated(run_id)
    history = summary["history"]
    return dg.MaterializeResult(
        value={
            "model_path": summary["final_model_path"],
            "mlflow_run_id": run_id,
            "model_version": version,
            "run_dir": str(run_dir),
            "beta": config.beta,
            "encoding": token_weights["encoding"],
            "loss_history": [h["loss"] for h in history],
            "step_history": [{"loss": h["loss"], "rewards/margins": h["rewards/margins"]} for h in history],
        },
        metadata={
            **reported,
            "model_path": dg.MetadataValue.path(summary["final_model_path"]),
            "mlflow_run_id": run_id,
            "mlflow_model_version": str(version),
            "mlflow_model_uri": f"models:/{mlflow_tracking.registered_model}/{version}" if version else "not registered",
            "steps": summary["steps"],
            "first_loss": summary["first_loss"],
            "last_loss": summary["last_loss"],
            "final_reward_accuracy": history[-1]["rewards/accuracies"] if history else float("nan"),
            "seconds": summary["seconds"],
        },
    )


