"""Cost of the token-weight precompute against a plain forward+backward over the same tokens.

The token_weights asset runs tidpo_core.method.importance.compute_token_importance: per batch one forward with
gradients on the input embeddings, one backward from the final max logit, the reference log-probs from
the same forward, then the hybrid weights per response. The yardstick is what a training step costs
without its optimizer update: forward, next-token loss on the response, backward into the parameters,
with the same batches (same length-sorted order, same batch size, right padding). A no-grad forward
(what TRL's precompute_ref_log_probs runs) is timed too, for context.

Rounds alternate the measurements; each figure is its best round. Target: precompute <= 1.5x fwd+bwd.

Data-parallel precompute (tidpo_core.runtime.precompute): the token_weights and anchor_responses steps, end to
end (plan, launch, model load, compute, load into DuckDB), with `accelerate launch` of 1 and of 2 CPU
processes on the same data, as responses per second. Both launches pay accelerate's start-up; the
single process runs under the thread plan (one thread per CPU), each of the two takes half the CPUs.
`two_process_speedup` (weights) and `anchors_two_process_speedup`: target >= 1.7x. The full run also
times one process on one thread, to show what the thread plan already gives a single process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import common, preparation

NAME = "weights"
TARGET = 1.5
SPEEDUP_TARGET = 1.7


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "pairs": 16,
            "batch_size": 8,
            "rounds": 1,
            "tiny": True,
            "sharded_pairs": 16,
            "anchor_pairs": 8,
            "sharded_rounds": 1,
        }
    return {
        "pairs": 600,
        "batch_size": 16,
        "rounds": 3,
        "tiny": False,
        "sharded_pairs": 3000,
        "anchor_pairs": 1000,
        "sharded_rounds": 2,
    }


def _batches(encoded, batch_size: int, pad_id: int):
    import torch

    from tidpo_core.batching.tokenization import pad_right

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
    from tidpo_core.method.logps import token_logps

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

    from tidpo_core.method.logps import token_logps

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for input_ids, attention_mask, _ in batches:
            token_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), input_ids)
    return time.perf_counter() - start


def _attribution_core(model, batches) -> float:
    from tidpo_core.method.importance import attribution_and_logps

    start = time.perf_counter()
    for input_ids, attention_mask, response_mask in batches:
        attribution_and_logps(model, input_ids, attention_mask, response_mask.long())
    return time.perf_counter() - start


def _importance(model, encoded, batch_size: int) -> float:
    from tidpo_core.method.importance import compute_token_importance

    start = time.perf_counter()
    compute_token_importance(model, encoded, batch_size=batch_size)
    return time.perf_counter() - start


def _sharded_data(folder: Path, pairs, tokenizer, model) -> tuple[Path, Any]:
    """A data dir holding `pairs` (all train) and the reference model: the starting point of each timed run."""
    from tidpo_core import store
    from tidpo_core.data.pairs import LoadResult
    from tidpo_core.models.modeling import save_model_and_tokenizer
    from tidpo_core.runtime.fingerprint import model_fingerprint
    from tidpo_core.runtime.layout import DataDir
    from tidpo_core.steps.reference import ReferenceHandle

    layout = DataDir.at(folder)
    layout.root.mkdir(parents=True, exist_ok=True)
    con = store.connect(layout.database)
    try:
        store.replace_pairs(con, LoadResult(list(pairs), [], len(pairs)), eval_fraction=0.0)
    finally:
        con.close()
    path = save_model_and_tokenizer(model, tokenizer, layout.reference_model)
    return layout.database, ReferenceHandle(str(path), model_fingerprint(path))


def _timed_precompute(
    kind: str,
    database: Path,
    reference,
    workdir: Path,
    processes: int,
    batch_size: int,
    one_thread: bool = False,
) -> tuple[float, int]:
    """Seconds and items of one precompute step on a fresh copy of `database`, through `accelerate launch`."""
    import os
    import shutil

    from tidpo_core.models.generation import SamplingSettings
    from tidpo_core.runtime.layout import DataDir
    from tidpo_core.runtime.precompute import PrecomputeSettings
    from tidpo_core.runtime.threads import NUM_THREADS_ENV
    from tidpo_core.steps import database_at
    from tidpo_core.steps.anchors import sample_anchors
    from tidpo_core.steps.weights import WeighingSettings, weigh_tokens

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    layout = DataDir.at(workdir)
    shutil.copyfile(database, layout.database)
    settings = PrecomputeSettings(launcher="accelerate", num_processes=processes)
    open_db = database_at(layout.database)
    previous = os.environ.get(NUM_THREADS_ENV)
    if one_thread:
        os.environ[NUM_THREADS_ENV] = "1"
    else:
        os.environ.pop(NUM_THREADS_ENV, None)  # the thread plan decides (and shares the CPUs between ranks)
    try:
        start = time.perf_counter()
        if kind == "weights":
            items = weigh_tokens(
                open_db,
                reference,
                None,
                WeighingSettings(batch_size=batch_size),
                precompute=settings,
                layout=layout,
                progress=False,
            ).computed
        else:
            sampling = SamplingSettings(batch_size=batch_size)
            items = sample_anchors(
                open_db, reference, sampling, precompute=settings, layout=layout, progress=False
            ).generated
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop(NUM_THREADS_ENV, None)
        else:
            os.environ[NUM_THREADS_ENV] = previous
    shutil.rmtree(workdir, ignore_errors=True)
    return seconds, items


def data_parallel(sizes: dict[str, Any], tokenizer, model, pairs) -> dict[str, Any]:
    """Responses per second of the weights and anchors steps with 1 and 2 processes (best of the rounds)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        root = Path(tmp)
        database, reference = _sharded_data(root / "source", pairs, tokenizer, model)
        runs: dict[str, tuple[str, int, bool]] = {
            "weights_1_process": ("weights", 1, False),
            "weights_2_processes": ("weights", 2, False),
            "anchors_1_process": ("anchors", 1, False),
            "anchors_2_processes": ("anchors", 2, False),
        }
        if not sizes["tiny"]:
            runs["weights_1_process_1_thread"] = ("weights", 1, True)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        items: dict[str, int] = {}
        for r in range(sizes["sharded_rounds"]):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                kind, processes, one_thread = runs[name]
                source = (
                    database if kind == "weights" else _anchor_source(database, root, sizes["anchor_pairs"])
                )
                took, items[name] = _timed_precompute(
                    kind, source, reference, root / "work", processes, sizes["batch_size"], one_thread
                )
                seconds[name].append(took)
                common.log(NAME, f"round {r + 1} {name:<27} {took:6.2f}s  {items[name] / took:7.1f} items/s")
    per_s = {name: items[name] / min(values) for name, values in seconds.items()}
    weights_speedup = per_s["weights_2_processes"] / per_s["weights_1_process"]
    anchors_speedup = per_s["anchors_2_processes"] / per_s["anchors_1_process"]
    figures: dict[str, Any] = {
        "items": items,
        "seconds": {name: {"best": min(values), "rounds": values} for name, values in seconds.items()},
        "items_per_s": per_s,
        "two_process_speedup": weights_speedup,
        "anchors_two_process_speedup": anchors_speedup,
        "target": {
            "min": SPEEDUP_TARGET,
            "weights_met": weights_speedup >= SPEEDUP_TARGET,
            "anchors_met": anchors_speedup >= SPEEDUP_TARGET,
        },
        "measured": "the step end to end through accelerate launch: plan, process start-up, model load, compute, DuckDB load",
    }
    if "weights_1_process_1_thread" in per_s:
        figures["two_process_speedup_over_one_thread"] = (
            per_s["weights_2_processes"] / per_s["weights_1_process_1_thread"]
        )
    common.log(
        NAME,
        f"data parallel: weights x{weights_speedup:.2f}, anchors x{anchors_speedup:.2f} with 2 processes (target >= {SPEEDUP_TARGET})",
    )
    return figures


def _anchor_source(database: Path, root: Path, pairs: int) -> Path:
    """`database` cut to its first `pairs` pairs (sampling is slower per item than weighing)."""
    import shutil

    from tidpo_core import store

    cut = root / f"anchors_{pairs}.duckdb"
    if not cut.exists():
        shutil.copyfile(database, cut)
        con = store.connect(cut)
        try:
            con.execute(
                "DELETE FROM preference_pairs WHERE pair_id NOT IN (SELECT pair_id FROM preference_pairs ORDER BY pair_id LIMIT ?)",
                [pairs],
            )
        finally:
            con.close()
    return cut


def _workload(sizes: dict[str, Any]):
    """The synthetic pairs' tokenizer, a fresh tiny model, every response encoded, and its length-sorted batches."""
    from tidpo_core.batching.features import EncodingSettings, encode_response
    from tidpo_core.data.synthetic import generate_synthetic_pairs
    from tidpo_core.models.modeling import build_tiny_model, train_tokenizer

    pairs = generate_synthetic_pairs(sizes["pairs"], seed=1)
    tokenizer = train_tokenizer([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=2048)
    config = preparation.tiny_model_config(sizes["tiny"])
    model = build_tiny_model(tokenizer, config, seed=0)
    settings = EncodingSettings()
    encoded = [
        encode_response(tokenizer, p.prompt, text, settings) for p in pairs for text in (p.chosen, p.rejected)
    ]
    batches = _batches(encoded, sizes["batch_size"], tokenizer.pad_token_id)
    return tokenizer, model, encoded, batches


def _measure_rounds(model, encoded, batches, sizes: dict[str, Any], tokens: int) -> dict[str, list[float]]:
    """Seconds of each measurement per round; the order alternates between rounds."""
    # Warm-up (allocator, kernels) outside the measurements.
    _forward_backward(model, batches[:2])
    _importance(model, encoded[: sizes["batch_size"] * 2], sizes["batch_size"])

    measured: dict[str, list[float]] = {
        "forward_backward": [],
        "importance": [],
        "attribution_core": [],
        "forward_only": [],
    }
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
    return measured


def _figures(
    measured: dict[str, list[float]], sizes: dict[str, Any], model, encoded, batches, tokens: int
) -> dict[str, Any]:
    """Setup, best-round seconds, tokens/s and the ratios against forward+backward, with the 1.5x target."""
    from tidpo_core.models.modeling import count_parameters

    best = {k: min(v) for k, v in measured.items()}
    ratio = best["importance"] / best["forward_backward"]
    return {
        "setup": {
            "sequences": len(encoded),
            "tokens": tokens,
            "padded_tokens": sum(int(b[0].numel()) for b in batches),
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


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    from tidpo_core.data.synthetic import generate_synthetic_pairs

    tokenizer, model, encoded, batches = _workload(sizes)
    tokens = sum(len(e.input_ids) for e in encoded)
    measured = _measure_rounds(model, encoded, batches, sizes, tokens)
    figures = _figures(measured, sizes, model, encoded, batches, tokens)
    sharded_pairs = generate_synthetic_pairs(sizes["sharded_pairs"], seed=2)
    figures["data_parallel"] = data_parallel(sizes, tokenizer, model, sharded_pairs)
    tokens_per_s = figures["tokens_per_s"]
    common.log(
        NAME,
        f"precompute {tokens_per_s['importance']:.0f} tok/s vs fwd+bwd {tokens_per_s['forward_backward']:.0f} tok/s: "
        f"x{figures['ratios']['importance_over_forward_backward']:.2f} (target <= {TARGET})",
    )
    return common.write_results(NAME, figures, quick, started)


if __name__ == "__main__":
    common.main_for(run)
