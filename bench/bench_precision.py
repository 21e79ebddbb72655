"""CPU precision on a real chat model: float32, bf16 autocast and bf16 weights, for a DPO training step and for
the attribution precompute, on SmolLM2-135M-Instruct with HH-RLHF pairs in its chat template.

    python -m bench.bench_precision [--quick] [--steps 8] [--rounds 3] [--learning-rate 5e-6]

For each precision, in interleaved rounds: the seconds of one training step (4 pairs, forward + backward +
RMSprop step, the paper's optimizer) and of the attribution pass over 8 responses. Then the loss curve of
`--steps` steps on the same batches in each precision, beside a second float32 curve over another batch
order (the seed noise the issue compares against), and the attribution's agreement with float32.
Writes bench/results/precision.json; `mixed_precision: auto` follows its verdict on CPUs with native bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from tidpo_core.batching.tokenization import EncodedSequence, PreferenceCollator, encode_prompt_response
from tidpo_core.data.formats import split_hh_dialogue
from tidpo_core.method.importance import compute_token_importance
from tidpo_core.method.logps import token_logps
from tidpo_core.models.modeling import load_model_and_tokenizer, resolve_model_source
from tidpo_core.training.setup import cpu_has_native_bf16

NAME = "precision"
HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
PRECISIONS = ("float32", "bf16_autocast", "bf16_weights")
BATCH = 4
BETA = 0.1


def hh_pairs(count: int) -> list[tuple[str, str, str]]:
    out = []
    with gzip.open(HH_FILE, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            with contextlib.suppress(ValueError):
                out.append(split_hh_dialogue(row["chosen"], row["rejected"]))
            if len(out) == count:
                break
    return out


def features(tokenizer, pairs) -> list[dict]:
    rows = []
    for prompt, chosen, rejected in pairs:
        row = {}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            e = encode_prompt_response(tokenizer, prompt, text, max_prompt_tokens=128, max_response_tokens=64)
            row[f"{side}_input_ids"], row[f"{side}_response_mask"] = e.input_ids, e.response_mask
        rows.append(row)
    return rows


def side_logps(model, batch, side: str, autocast: bool) -> torch.Tensor:
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_response_mask"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits
    return (token_logps(logits.float(), ids) * mask).sum(-1)


def model_in(precision: str, source: str):
    model, _ = load_model_and_tokenizer(
        source, dtype=torch.bfloat16 if precision == "bf16_weights" else torch.float32
    )
    return model.train()


def dpo_step(model, optimizer, batch, reference: dict[str, torch.Tensor], autocast: bool) -> float:
    margin = sum(
        sign * (side_logps(model, batch, side, autocast) - reference[side])
        for sign, side in ((1, "chosen"), (-1, "rejected"))
    )
    loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


@torch.no_grad()
def reference_logps(model, batches) -> list[dict[str, torch.Tensor]]:
    return [{side: side_logps(model, b, side, False) for side in ("chosen", "rejected")} for b in batches]


def curve(precision: str, source: str, batches, references, learning_rate: float) -> list[float]:
    model = model_in(precision, source)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=learning_rate)
    return [
        dpo_step(model, optimizer, b, r, precision == "bf16_autocast")
        for b, r in zip(batches, references, strict=True)
    ]


def timings(source: str, batch, reference, sequences, rounds: int) -> dict[str, dict[str, list[float]]]:
    models = {p: model_in(p, source) for p in PRECISIONS}
    optimizers = {
        p: torch.optim.RMSprop(m.parameters(), lr=0.0) for p, m in models.items()
    }  # lr 0: weights stay put
    out: dict[str, dict[str, list[float]]] = {p: {"step_s": [], "attribution_s": []} for p in PRECISIONS}
    for _ in range(rounds):
        for p in PRECISIONS:  # interleaved: every round times each precision once, back to back
            autocast = p == "bf16_autocast"
            tic = time.perf_counter()
            dpo_step(models[p], optimizers[p], batch, reference, autocast)
            out[p]["step_s"].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                compute_token_importance(models[p], sequences, batch_size=len(sequences))
            out[p]["attribution_s"].append(time.perf_counter() - tic)
    return out


def attribution_agreement(source: str, sequences) -> dict[str, float]:
    """Spearman-free agreement: Pearson correlation of the raw attribution with float32's, over all tokens."""
    raw = {}
    for p in PRECISIONS:
        model = model_in(p, source).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16_autocast"):
            raw[p] = np.concatenate(
                [t.attribution for t in compute_token_importance(model, sequences, batch_size=len(sequences))]
            )
    return {p: float(np.corrcoef(raw["float32"], raw[p])[0, 1]) for p in PRECISIONS[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    args = parser.parse_args()
    steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
    started = time.perf_counter()
    imports = Path(tempfile.gettempdir()) / "tidpo-bench-imports"
    source = resolve_model_source("smollm2-135m-instruct", imports)
    _, tokenizer = load_model_and_tokenizer(source)
    rows = features(tokenizer, hh_pairs(BATCH * steps))
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batches = [collate(rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    shuffled = [
        collate([rows[j] for j in order])
        for order in np.random.default_rng(1).permutation(len(rows)).reshape(-1, BATCH).tolist()
    ]
    reference = model_in("float32", source).eval()
    refs, refs_shuffled = reference_logps(reference, batches), reference_logps(reference, shuffled)
    del reference
    sequences = [
        EncodedSequence(
            r["chosen_input_ids"], r["chosen_response_mask"], [(0, 0)] * sum(r["chosen_response_mask"])
        )
        for r in rows[:8]
    ]
    common.log(NAME, f"timing {rounds} interleaved rounds")
    timed = timings(source, batches[0], refs[0], sequences, rounds)
    common.log(NAME, f"loss curves over {steps} steps")
    curves = {p: curve(p, source, batches, refs, args.learning_rate) for p in PRECISIONS}
    other_order = curve("float32", source, shuffled, refs_shuffled, args.learning_rate)
    seed_noise = statistics.fmean(abs(a - b) for a, b in zip(curves["float32"], other_order, strict=True))
    figures: dict = {
        "model": "SmolLM2-135M-Instruct",
        "pairs": len(rows),
        "batch": BATCH,
        "steps": steps,
        "learning_rate": args.learning_rate,
    }
    figures["cpu_bf16"] = cpu_has_native_bf16()
    figures["precisions"] = {}
    for p in PRECISIONS:
        deviation = statistics.fmean(abs(a - b) for a, b in zip(curves[p], curves["float32"], strict=True))
        figures["precisions"][p] = {
            "step_s": statistics.median(timed[p]["step_s"]),
            "attribution_s": statistics.median(timed[p]["attribution_s"]),
            "step_ratio_vs_float32": statistics.median(
                a / b for a, b in zip(timed[p]["step_s"], timed["float32"]["step_s"], strict=True)
            ),
            "attribution_ratio_vs_float32": statistics.median(
                a / b
                for a, b in zip(timed[p]["attribution_s"], timed["float32"]["attribution_s"], strict=True)
            ),
            "loss_curve": curves[p],
            "mean_abs_loss_deviation_from_float32": deviation,
            "within_seed_noise": deviation <= seed_noise,
        }
    figures["float32_other_batch_order_curve"] = other_order
    figures["seed_noise_mean_abs_loss_difference"] = seed_noise
    figures["attribution_correlation_with_float32"] = attribution_agreement(source, sequences)
    common.write_results(NAME, figures, args.quick, started)


if __name__ == "__main__":
    main()
