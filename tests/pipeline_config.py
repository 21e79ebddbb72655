"""A small run config of the whole graph: tens of pairs, a tiny model, a few steps."""

TINY_MODEL = {
    "vocab_size": 400,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "sft_steps": 40,
    "sft_batch_size": 8,
}


# Enough steps for the reward model to beat chance on 40 train pairs (its defaults take 3 on them).
REWARD_MODEL = {"epochs": 10, "batch_size": 8, "learning_rate": 5e-3}


def small_run_config(pairs: int = 48, steps: int = 16, with_reward_model: bool = False, **policy) -> dict:
    """`with_reward_model`: also configure reward_model (a run config may only name the assets it runs)."""
    config = {
        "ops": {
            "preference_pairs": {"config": {"synthetic_pairs": pairs, "eval_fraction": 0.25}},
            "reference_model": {"config": TINY_MODEL},
            "anchor_responses": {"config": {"max_new_tokens": 12, "batch_size": 16}},
            "token_weights": {"config": {"max_response_tokens": 64, "batch_size": 16}},
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
            # The default benchmarks (built-in TruthfulQA and IFEval samples), cut to a few documents.
            "evaluation": {"config": {"benchmark_limit": 3, "benchmark_max_gen_tokens": 16}},
        }
    }
    if with_reward_model:
        config["ops"]["reward_model"] = {"config": dict(REWARD_MODEL)}
    return config
