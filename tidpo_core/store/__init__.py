"""DuckDB storage: every table tidpo keeps and every query on them, in this package only.

Every writer replaces or appends its rows inside one transaction, so a crash mid-write leaves the
previous state intact and re-running a step never duplicates rows. Functions take an open DuckDB
connection; opening and locking the file is the caller's business (Dagster's DuckDBResource, or
`connect` below for scripts and the training process).
"""

from tidpo_core.store.anchors import (
    anchor_count,
    first_anchors,
    insert_anchors,
    missing_anchor_pair_ids,
    read_anchors,
    train_pairs_without_anchor,
)
from tidpo_core.store.connection import (
    DATABASE_FILE,
    SCHEMA,
    connect,
    ensure_schema,
    now,
    table_digest,
    transaction,
)
from tidpo_core.store.diagnostics import contents, integrity_problems, table_counts
from tidpo_core.store.pairs import (
    PairsValidity,
    PairsWriteSummary,
    first_pairs,
    first_quarantined,
    pair_count,
    pairs_digest,
    pairs_validity,
    quarantine_reasons,
    read_pairs,
    read_pairs_at,
    replace_pairs,
    set_eval_split,
    train_pairs_frame,
)
from tidpo_core.store.records import (
    ChampionEvent,
    champion_history,
    latest_contrastive_models,
    record_champion_event,
    record_contrastive_models,
    record_evaluation_pairs,
    replace_comparison,
    shared_evaluation_pairs,
    write_metrics,
)
from tidpo_core.store.rewards import (
    RewardModelRecord,
    latest_reward_model,
    record_reward_model,
    reward_model_record,
)
from tidpo_core.store.weights import (
    REFERENCE_TOPK_SIDES,
    StoredWeights,
    WeightsSummary,
    WeightsValidity,
    existing_weight_keys,
    read_token_weights,
    weights_summary,
    weights_validity,
    write_token_weights,
)

__all__ = [
    "DATABASE_FILE",
    "REFERENCE_TOPK_SIDES",
    "SCHEMA",
    "ChampionEvent",
    "PairsValidity",
    "PairsWriteSummary",
    "RewardModelRecord",
    "StoredWeights",
    "WeightsSummary",
    "WeightsValidity",
    "anchor_count",
    "champion_history",
    "connect",
    "contents",
    "ensure_schema",
    "existing_weight_keys",
    "first_anchors",
    "first_pairs",
    "first_quarantined",
    "insert_anchors",
    "integrity_problems",
    "latest_contrastive_models",
    "latest_reward_model",
    "missing_anchor_pair_ids",
    "now",
    "pair_count",
    "pairs_digest",
    "pairs_validity",
    "quarantine_reasons",
    "read_anchors",
    "read_pairs",
    "read_pairs_at",
    "read_token_weights",
    "record_champion_event",
    "record_contrastive_models",
    "record_evaluation_pairs",
    "record_reward_model",
    "replace_comparison",
    "replace_pairs",
    "reward_model_record",
    "set_eval_split",
    "shared_evaluation_pairs",
    "table_counts",
    "table_digest",
    "train_pairs_frame",
    "train_pairs_without_anchor",
    "transaction",
    "weights_summary",
    "weights_validity",
    "write_metrics",
    "write_token_weights",
]
