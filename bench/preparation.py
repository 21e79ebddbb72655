"""Data preparation through tidpo_core's steps: what the pipeline's assets do, with an explicit split.

Pairs -> reference model (tokenizer + tiny Llama + short SFT, or a checkpoint) -> anchors -> token
weights, into a DuckDB file beside the reference model folder; the benchmarks train and evaluate on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import timed
from tidpo_core.runtime.layout import DataDir

# The reference top-k the benchmarks store for `reference_kl: cached` (of a 2,048-token vocabulary).
REFERENCE_KL_TOP_K = 64


@dataclass
class Prepared:
    """A DuckDB file with pairs, anchors and token weights, and the reference model folder beside it."""

    data_dir: Path
    duckdb_path: Path
    reference_path: Path
    weights_fingerprint: str
    anchors_fingerprint: str | None
    max_prompt_tokens: int
    max_response_tokens: int
    n_train: int
    n_eval: int
    parameters: int
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    extra_weights: dict[str, str] = field(default_factory=dict)
    """Other weight tables of the same responses (add_weights): name -> fingerprint."""

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("data_dir", "duckdb_path", "reference_path"):
            out.pop(key)
        return out


@dataclass(frozen=True)
class PrepareSettings:
    """How :func:`prepare_uncached` builds the data: the split, the reference model, anchors and weights.

    The train/eval split: `eval_ids` (if given) decides it; otherwise the stored hash split with
    `eval_fraction` does. The reference model is a tokenizer + `model_config` (the embedded tiny Llama by
    default) with a short SFT, or the checkpoint `model_name_or_path`.
    """

    eval_ids: set[str] | None = None
    eval_fraction: float = 0.1
    model_config: Any = None
    vocab_size: int = 2048
    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 0
    anchors: bool = True
    anchor_new_tokens: int = 64
    sampling_batch_size: int = 32
    max_prompt_tokens: int = 192
    max_response_tokens: int = 128
    weight_batch_size: int = 16
    weight_lambda: float = 0.7
    reference_kl_top_k: int = 0
    model_name_or_path: str = ""


def prepare(data_dir: Path, pairs: Sequence[Any], **settings: Any) -> Prepared:
    """Pairs -> reference model -> anchors -> token weights (see :func:`prepare_uncached`).

    With TIDPO_BENCH_CACHE set (development only), a preparation with the same pairs and arguments is
    copied from that folder instead of being recomputed; its timings are then those of the run that made
    it, marked as cached.
    """
    import shutil

    cache_root = os.environ.get("TIDPO_BENCH_CACHE")
    if not cache_root:
        return prepare_uncached(data_dir, pairs, **settings)
    from tidpo_core.runtime.fingerprint import digest

    key = digest(
        {
            "pairs": [(p.pair_id, p.prompt, p.chosen, p.rejected) for p in pairs],
            "kwargs": {k: (sorted(v) if isinstance(v, set) else v) for k, v in settings.items()},
        }
    )
    cached = Path(cache_root) / key
    stamp = cached / "prepared.json"
    data_dir = Path(data_dir)
    if stamp.exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(cached, data_dir)
        values = json.loads(stamp.read_text())
        values["timings"] = {**values.get("timings", {}), "cached": True}
        return Prepared(
            data_dir=data_dir,
            duckdb_path=DataDir.at(data_dir).database,
            reference_path=DataDir.at(data_dir).reference_model,
            **values,
        )
    prepared = prepare_uncached(data_dir, pairs, **settings)
    shutil.rmtree(cached, ignore_errors=True)
    shutil.copytree(data_dir, cached)
    (cached / "prepared.json").write_text(json.dumps(prepared.summary()))
    return prepared


def prepare_uncached(data_dir: Path, pairs: Sequence[Any], **settings: Any) -> Prepared:
    """Pairs -> reference model -> anchors -> token weights, each stage timed; `settings` are
    :class:`PrepareSettings` fields.

    The pipeline's own steps (tidpo_core.steps), given the pairs directly so that a benchmark can fix the
    train/eval split exactly.
    """
    from tidpo_core.data.pairs import LoadResult
    from tidpo_core.steps import database_at
    from tidpo_core.steps.pairs import store_pairs

    recipe = PrepareSettings(**settings)
    layout = DataDir.at(data_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    open_db = database_at(layout.database)
    timings: dict[str, float] = {}
    with timed(timings, "pairs"):
        ingested = store_pairs(
            open_db, LoadResult(list(pairs), [], len(pairs)), recipe.eval_fraction, recipe.eval_ids
        )
    with timed(timings, "reference_model"):
        reference = _build_reference(open_db, layout, ingested.digest, recipe)
    anchors_fingerprint = None
    if recipe.anchors:
        with timed(timings, "anchor_responses"):
            anchors_fingerprint = _sample_anchors(open_db, reference.handle, recipe)
    with timed(timings, "token_weights"):
        weights = _weigh(open_db, reference.handle, anchors_fingerprint, recipe)
    return Prepared(
        data_dir=layout.root,
        duckdb_path=layout.database,
        reference_path=Path(reference.handle.path),
        weights_fingerprint=weights.fingerprint,
        anchors_fingerprint=anchors_fingerprint,
        max_prompt_tokens=recipe.max_prompt_tokens,
        max_response_tokens=recipe.max_response_tokens,
        n_train=ingested.stored.train,
        n_eval=ingested.stored.eval,
        parameters=int(reference.parameters or 0),
        timings=timings,
        tokens={
            "weighted_responses": weights.summary.responses,
            "weighted_response_tokens": weights.summary.token_rows,
        },
    )


def _build_reference(open_db: Any, layout: DataDir, pairs_digest: str, recipe: PrepareSettings) -> Any:
    """The reference_model step: the tiny model trained from scratch, or the checkpoint named."""
    import dataclasses

    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.models.modeling import TinyModelConfig
    from tidpo_core.steps.reference import ReferenceRecipe, build_reference

    return build_reference(
        open_db,
        ReferenceRecipe(
            model_name_or_path=recipe.model_name_or_path,
            sft_steps=recipe.sft_steps,
            sft_batch_size=recipe.sft_batch_size,
            sft_learning_rate=recipe.sft_learning_rate,
            seed=recipe.seed,
        ),
        dataclasses.replace(recipe.model_config or TinyModelConfig(), vocab_size=recipe.vocab_size),
        layout,
        pairs_digest,
        encoding=EncodingSettings(recipe.max_prompt_tokens, recipe.max_response_tokens),
        progress=False,
    )


def _sample_anchors(open_db: Any, reference: Any, recipe: PrepareSettings) -> str:
    """The anchor_responses step; returns the anchors' fingerprint."""
    from tidpo_core.models.generation import SamplingSettings
    from tidpo_core.steps.anchors import sample_anchors

    sampling = SamplingSettings(
        max_new_tokens=recipe.anchor_new_tokens,
        seed=recipe.seed,
        batch_size=recipe.sampling_batch_size,
        max_prompt_tokens=recipe.max_prompt_tokens,
    )
    return sample_anchors(open_db, reference, sampling, progress=False).fingerprint


def _weigh(open_db: Any, reference: Any, anchors_fingerprint: str | None, recipe: PrepareSettings) -> Any:
    """The token_weights step (with the reference's top-k cache when `reference_kl_top_k` > 0)."""
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    weighing = WeighingSettings(
        weight_lambda=recipe.weight_lambda,
        batch_size=recipe.weight_batch_size,
        max_prompt_tokens=recipe.max_prompt_tokens,
        max_response_tokens=recipe.max_response_tokens,
        reference_kl_top_k=recipe.reference_kl_top_k,
    )
    return weigh_tokens(open_db, reference, anchors_fingerprint, weighing, progress=False)


def add_weights(prepared: Prepared, **settings: Any) -> str:
    """Another weights table for `prepared`'s pairs and anchors (another estimator: WeighingSettings fields);
    returns its fingerprint."""
    from tidpo_core.runtime.fingerprint import model_fingerprint
    from tidpo_core.steps import database_at
    from tidpo_core.steps.reference import ReferenceHandle
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    reference = ReferenceHandle(str(prepared.reference_path), model_fingerprint(prepared.reference_path))
    weighing = WeighingSettings(
        max_prompt_tokens=prepared.max_prompt_tokens,
        max_response_tokens=prepared.max_response_tokens,
        **settings,
    )
    return weigh_tokens(
        database_at(prepared.duckdb_path), reference, prepared.anchors_fingerprint, weighing, progress=False
    ).fingerprint


def eval_pairs(prepared: Prepared) -> list[Any]:
    return _read_pairs(prepared, "eval")


def train_pairs(prepared: Prepared) -> list[Any]:
    return _read_pairs(prepared, "train")


def _read_pairs(prepared: Prepared, split: str) -> list[Any]:
    from tidpo_core import store

    con = store.connect(prepared.duckdb_path, read_only=True)
    try:
        return store.read_pairs(con, split=split)
    finally:
        con.close()


def tiny_model_config(tiny: bool):
    """The embedded default's model shape, or a much smaller one for the smoke tests' quick sizes."""
    from tidpo_core.models.modeling import TinyModelConfig

    if tiny:
        return TinyModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    return TinyModelConfig()
