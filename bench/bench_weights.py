"""Cost of the token-weight precompute against a plain forward+backward over the same tokens.

The token_weights asset runs tidpo_core.importance.compute_token_importance: per batch one forward with
gradients on the input embeddings, one backward from the final max logit, the reference log-probs from
the same forward, then the hybrid weights per response. The yardstick is what a training step costs
without its optimizer update: forward, next-token loss on the response, backward into the parameters,
with the same batches (same length-sorted order, same batch size, right padding). A no-grad forward
(what TRL's precompute_ref_log_probs runs) is timed too, for context.

Rounds alternate the measurements; each figure is its best round. Target: precompute <= 1.5x fwd+bwd.
"""

from __future__ import annotations

import time
from typing import Any

from bench import common

NAME = "weights"
TARGET = 1.5


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pairs": 16, "batch_size": 8, "rounds": 1, "tiny": True}
    return {"pairs": 600, "batch_size": 16, "rounds": 3, "tiny": False}


def _batches(encoded, batch_size: int, pad_id: int):
    import torch

    from tidpo_core.tokenization import pad_right

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        out.append(
            (
                pad_right([s.input_ids for s in chunk], pad_id, torch.long),
                pad_right([[1] * len(s.input_ids) for s in chunk], 0, torch.long),
                pad_right([s.response_mask for s in chunk], 0, torch.float32),
            )
        )
    return out


def _forward_backward(model, batches) -> float:
    from tidpo_core.losses import token_logps

    model.train()
    start = time.perf_counter()
    for input_ids, attention_mask, response_mask in batches:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        loss = -(token_logps(logits, input_ids) * response_mask).sum() / response_mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _forward_only(model, batches) -> float:
    import torch

    from tidpo_core.losses import token_logps

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for input_ids, attention_mask, _ in batches:
            token_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), input_ids)
    return time.perf_counter() - start


def _attribution_core(model, batches) -> float:
    from tidpo_core.importance import attribution_and_logps

    start = time.perf_counter()
    for input_ids, attention_mask, response_mask in batches:
        attribution_and_logps(model, input_ids, attention_mask, response_mask.long())
    return time.perf_counter() - start


def _importance(model, encoded, batch_size: int) -> float:
    from tidpo_core.importance import compute_token_importance

    start = time.perf_counter()
    compute_token_importance(model, encoded, batch_size=batch_size)
    return time.perf_counter() - start


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    from tidpo_core.features import EncodingSettings, encode_response
    from tidpo_core.modeling import TinyModelConfig, build_tiny_model, count_parameters, train_tokenizer
    from tidpo_core.synthetic import generate_synthetic_pairs

    pairs = generate_synthetic_pairs(sizes["pairs"], seed=1)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=2048)
    config = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2) if sizes["tiny"] else TinyModelConfig()
    model = build_tiny_model(tokenizer, config, seed=0)
    settings = EncodingSettings()
    encoded = [encode_response(tokenizer, p.prompt, text, settings) for p in pairs for text in (p.chosen, p.rejected)]
    batches = _batches(encoded, sizes["batch_size"], tokenizer.pad_token_id)
    tokens = sum(len(e.input_ids) for e in encoded)
    padded = sum(int(b[0].numel()) for b in batches)

    # Warm-up (allocator, kernels) outside the measurements.
    _forward_backward(model, batches[:2])
    _importance(model, encoded[: sizes["batch_size"] * 2], sizes["batch_size"])

    measured: dict[str, list[float]] = {"forward_backward": [], "importance": [], "attribution_core": [], "forward_only": []}
    for r in range(sizes["rounds"]):
        order = list(measured) if r % 2 == 0 else list(reversed(measured))
        for key in order:
            if key == "forward_backward":
                seconds = _forward_backward(model, batches)
            elif key == "importance":
                seconds = _importance(model, encoded, sizes["batch_size"])
            elif key == "attribution_core":
                seconds = _attribution_core(model, batches)
            else:
                seconds = _forward_only(model, batches)
            measured[key].append(seconds)
            common.log(NAME, f"round {r + 1} {key:<17} {seconds:6.2f}s  {tokens / seconds:8.0f} tokens/s")

    best = {k: min(v) for k, v in measured.items()}
    ratio = best["importance"] / best["forward_backward"]
    figures = {
        "setup": {
            "sequences": len(encoded),
            "tokens": tokens,
            "padded_tokens": padded,
            "batch_size": sizes["batch_size"],
            "model_parameters": count_parameters(model),
            "threads": common.THREADS,
            "rounds": sizes["rounds"],
            "yardstick": "forward + response next-token loss + backward into the parameters, no optimizer step",
        },
        "seconds": {k: {"best": best[k], "rounds": v} for k, v in measured.items()},
        "tokens_per_s": {k: tokens / best[k] for k in best},
        "ratios": {
            "importance_over_forward_backward": ratio,
            "attribution_core_over_forward_backward": best["attribution_core"] / best["forward_backward"],
            "forward_only_over_forward_backward": best["forward_only"] / best["forward_backward"],
            "per_response_weight_overhead_s": best["importance"] - best["attribution_core"],
        },
        "target": {"importance_over_forward_backward": ratio, "max": TARGET, "met": ratio <= TARGET},
        "sizes": sizes,
    }
    common.log(
        NAME,
        f"precompute {tokens / best['importance']:.0f} tok/s vs fwd+bwd {tokens / best['forward_backward']:.0f} tok/s: "
        f"x{ratio:.2f} (target <= {TARGET})",
    )
    return common.write_results(NAME, figures, quick, started)


if __name__ == "__main__":
    common.main_for(run)
