"""What every stress run shares: where the repository and the results are, the lines a worker prints for
its parent, the offline environment, and the small whole-graph config the runs materialize."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidpo_core.runtime.offline import apply_offline_defaults

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "stress" / "results.json"
MARK = "TIDPO-MARK"
RESULT = "TIDPO-RESULT"
BUSY = "is in use by another tidpo run"

apply_offline_defaults()

TINY_MODEL = {
    "vocab_size": 400,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "sft_steps": 30,
    "sft_batch_size": 8,
}
# The policy of a resumed training run is compared with the uninterrupted one's to this tolerance; the
# measured difference is reported (float32 round-off on CPU, not a lost or repeated step: one optimizer
# step at these learning rates moves weights by about 1e-3).
POLICY_TOLERANCE = 1e-4
ANCHOR_BATCH = 8
WEIGHT_CHUNK = 96  # responses per token_weights shard (6 batches of 16)


def stress_config(pairs: int = 160, steps: int = 24, **policy: Any) -> dict[str, Any]:
    """A small whole-graph config whose anchor and weight steps take several chunks each."""
    return {
        "ops": {
            "preference_pairs": {"config": {"synthetic_pairs": pairs, "eval_fraction": 0.2}},
            "reference_model": {"config": TINY_MODEL},
            "anchor_responses": {"config": {"max_new_tokens": 12, "batch_size": ANCHOR_BATCH}},
            "token_weights": {
                "config": {
                    "max_response_tokens": 64,
                    "batch_size": 16,
                    "batches_per_shard": WEIGHT_CHUNK // 16,
                }
            },
            "tidpo_policy": {
                "config": {
                    "max_steps": steps,
                    "per_device_batch_size": 4,
                    "learning_rate": 2e-3,
                    "warmup_steps": 1,
                    "checkpoint_every": 4,
                    **policy,
                }
            },
            "evaluation": {"config": {"heatmap_pairs": 0, "sample_prompts": 8, "max_new_tokens": 16}},
        }
    }
