"""The training features: pairs, anchors and stored token weights read from DuckDB and encoded."""

from __future__ import annotations

import time
from typing import Any

from tidpo_core import store
from tidpo_core.batching.features import EncodingSettings, build_features
from tidpo_core.training.config import TrainConfig

# Pairs whose stored token weights are read and turned into features at a time: the rows of one chunk
# are the loader's peak memory, whatever the size of the data set.
FEATURE_CHUNK_PAIRS = 512


def load_training_features(
    config: TrainConfig, tokenizer, timings: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Pairs and anchors read from DuckDB in bulk, token weights in chunks of pairs, turned into features."""
    timings = timings if timings is not None else {}
    loss_config = config.loss_config()
    settings = EncodingSettings(config.max_prompt_tokens, config.max_response_tokens)
    read_s = features_s = 0.0
    features: list[dict[str, Any]] = []
    started = time.perf_counter()
    con = store.connect(config.duckdb_path, read_only=True)
    try:
        pairs = store.read_pairs(con, split="train")
        anchors = None
        if loss_config.needs_anchor:
            if not config.anchors_fingerprint:
                raise ValueError(
                    "loss tidpo with gamma > 0 needs anchors_fingerprint (the anchor_responses asset)"
                )
            anchors = store.read_anchors(con, config.anchors_fingerprint)
        read_s += time.perf_counter() - started
        if not pairs:
            raise ValueError(f"no training pairs in {config.duckdb_path}")
        if not config.weights_fingerprint and loss_config.needs_reference and not loss_config.needs_kl:
            raise ValueError(
                f"loss {config.loss_type} needs precomputed reference log-probs: set weights_fingerprint"
            )
        if not config.weights_fingerprint and config.cached_reference_kl:
            raise ValueError(
                "reference_kl: cached reads the reference top-k stored with the token weights: set weights_fingerprint"
            )
        pairs = sorted(pairs, key=lambda p: p.pair_id)  # chunks are id ranges; the loader shuffles anyway
        for begin in range(0, len(pairs), FEATURE_CHUNK_PAIRS):
            chunk = pairs[begin : begin + FEATURE_CHUNK_PAIRS]
            started = time.perf_counter()
            stored = None
            if config.weights_fingerprint:
                id_range = (chunk[0].pair_id, chunk[-1].pair_id)
                stored = store.read_token_weights(
                    con,
                    config.weights_fingerprint,
                    pair_id_range=id_range,
                    with_reference_topk=config.cached_reference_kl,
                )
            read_s += time.perf_counter() - started
            started = time.perf_counter()
            features += build_features(
                tokenizer,
                chunk,
                settings,
                anchors=anchors,
                stored=stored,
                lambda_=config.weight_lambda,
                normalization=config.weight_normalization,
                uniform_weights=config.uniform_token_weights,
            )
            features_s += time.perf_counter() - started
    finally:
        con.close()
    timings["duckdb_read_s"] = read_s
    timings["features_s"] = features_s
    return features
