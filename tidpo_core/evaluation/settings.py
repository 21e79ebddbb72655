"""What `evaluate_model` measures and how (ModelEvalSettings)."""

from __future__ import annotations

from dataclasses import dataclass

from tidpo_core.batching.features import EncodingSettings
from tidpo_core.evaluation.importance_estimators import DEFAULT_IMPORTANCE_ESTIMATORS
from tidpo_core.evaluation.sampled_responses import KL_SAMPLING
from tidpo_core.method.importance import Normalization
from tidpo_core.models.generation import SamplingSettings


@dataclass(frozen=True)
class ModelEvalSettings:
    """What `evaluate_model` measures and how; defaults fit the embedded tiny model on a CPU."""

    beta: float = 0.1
    batch_size: int = 32
    encoding: EncodingSettings = EncodingSettings()
    sample_prompts: int = 64
    """Eval prompts sampled for KL, diversity and the critical-phrase rate (0: skip those metrics)."""
    sampling: SamplingSettings = KL_SAMPLING
    critical_k: int | None = None
    critical_pairs: int | None = 64
    """Pairs (with spans, first by pair_id) whose attribution is computed for precision@k; None: all.
    Attribution costs a forward and backward pass per response, the most expensive metric here."""
    weight_lambda: float = 0.7
    weight_normalization: Normalization = "max"
    importance_estimators: tuple[str, ...] = DEFAULT_IMPORTANCE_ESTIMATORS
    """Importance estimators scored by precision@k beside the paper's attribution (critical_token_precision)."""
