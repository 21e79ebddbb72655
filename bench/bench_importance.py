"""Do the token weights find the tokens that matter? Importance precision@k per estimator, on the built-in
data with its critical spans placed mid-answer (`middle`) and anywhere in the answer (`uniform`).

For each span position: one reference (tokenizer + tiny Llama + SFT on both answers, as the pipeline's
reference_model), and for the `contrastive` estimator the pair of models TIS-DPO builds by SFT: the same
base (the untrained tiny model, which is where the embedded reference starts too) fine-tuned on the chosen
answers only and on the rejected answers only, with the reference's SFT settings. Each estimator's hybrid
weights (lambda 0.7, max normalization: what TI-DPO trains with) and its raw estimate are scored on the
eval pairs' chosen and rejected responses, overall and per third of the response the span sits in.
`uniform_weights` is the chance line and `prior` the Gaussian prior alone.

Writes bench/results/importance.json as `span_position.<middle|uniform>.<estimator>.precision_at_k`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, preparation

NAME = "importance"
SPAN_POSITIONS = ("middle", "uniform")
ESTIMATORS = (
    "attribution",
    "attribution_no_eos",
    "surprisal",
    "surprisal_no_eos",
    "contrastive",
    "contrastive_no_eos",
)
TARGET = 0.6


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pairs": 24, "eval_fraction": 0.25, "sft_steps": 4, "tiny": True}
    return {"pairs": 2000, "eval_fraction": 0.1, "sft_steps": 300, "tiny": False}


def contrastive_pair_paths(
    prepared: preparation.Prepared, sizes: dict[str, Any], seed: int = 0
) -> tuple[str, str]:
    """TIS-DPO's SFT contrastive models, trained by the pipeline's own step (as the contrastive_models asset)."""
    import dataclasses

    from bench.preparation import tiny_model_config
    from tidpo_core.models.contrastive import ContrastiveSFT
    from tidpo_core.runtime.fingerprint import model_fingerprint
    from tidpo_core.runtime.layout import DataDir
    from tidpo_core.steps import database_at
    from tidpo_core.steps.contrastive import train_contrastive_models
    from tidpo_core.steps.reference import ReferenceHandle

    reference = ReferenceHandle(
        str(prepared.reference_path),
        model_fingerprint(prepared.reference_path),
        base={"tiny_config": dataclasses.asdict(tiny_model_config(sizes["tiny"])), "seed": seed},
    )
    built = train_contrastive_models(
        database_at(prepared.duckdb_path),
        reference,
        ContrastiveSFT(sft_steps=sizes["sft_steps"], seed=seed),
        DataDir.at(prepared.data_dir),
        "bench",
        progress=False,
    )
    return built.paths


def contrastive_pair(prepared: preparation.Prepared, sizes: dict[str, Any], seed: int = 0):
    from tidpo_core.models.contrastive import load_contrastive_pair

    return load_contrastive_pair(contrastive_pair_paths(prepared, sizes, seed))


def score(prepared: preparation.Prepared, contrastive: tuple[Any, Any]) -> dict[str, Any]:
    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.models.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(prepared.reference_path)
    settings = EncodingSettings(prepared.max_prompt_tokens, prepared.max_response_tokens)
    return score_model(model, tokenizer, preparation.eval_pairs(prepared), settings, ESTIMATORS, contrastive)


def score_model(model, tokenizer, pairs, settings, estimators, contrastive=None) -> dict[str, Any]:
    """Precision@k of each estimator's hybrid weights (and raw estimate) on `pairs`, overall and by third."""
    from tidpo_core.evaluation.critical_tokens import critical_token_precision
    from tidpo_core.runtime.threads import threads_for

    with threads_for(model):
        metrics = critical_token_precision(
            model, tokenizer, pairs, settings, estimators=estimators, contrastive_models=contrastive
        )
    rows: dict[str, Any] = {}

    def row(hybrid_key: str, raw_key: str | None) -> dict[str, Any]:
        out = {"precision_at_k": metrics[f"precision_at_k_{hybrid_key}"]}
        if raw_key is not None:
            out["raw_precision_at_k"] = metrics[f"precision_at_k_{raw_key}"]
        out["by_third"] = {
            third: metrics.get(f"precision_at_k_{hybrid_key}_{third}") for third in ("start", "middle", "end")
        }
        return out

    for estimator in estimators:
        rows[estimator] = row("hybrid" if estimator == "attribution" else f"hybrid_{estimator}", estimator)
    rows["prior"] = row("prior", None)
    rows["uniform_weights"] = row("uniform", None)
    rows["responses"] = {
        "all": metrics["critical_responses"],
        **{third: metrics[f"critical_responses_{third}"] for third in ("start", "middle", "end")},
    }
    rows["mean_span_tokens"] = metrics["mean_span_tokens"]
    return rows


# The pretrained contrastive pair: the model itself fine-tuned on the train split's chosen / rejected answers
# (ContrastiveSFT's pretrained learning rate, 2e-5).
PRETRAINED_CONTRASTIVE_STEPS, PRETRAINED_CONTRASTIVE_BATCH = 96, 8


def pretrained_contrastive_pair(model, tokenizer, train_pairs, out_dir: Path, steps: int, batch_size: int):
    """TIS-DPO's contrastive pair from a pretrained model (the base the reference is), as the pipeline's
    contrastive_models step builds it for a checkpoint."""
    from tidpo_core.models.contrastive import (
        ContrastiveSFT,
        contrastive_paths,
        load_contrastive_pair,
        train_contrastive_pair,
    )

    recipe = ContrastiveSFT(sft_steps=steps, sft_batch_size=batch_size).settled(pretrained=True)
    losses = train_contrastive_pair(model, tokenizer, train_pairs, out_dir, recipe=recipe)
    return load_contrastive_pair(contrastive_paths(out_dir)), {
        "recipe": recipe.__dict__,
        "final_sft_loss": {k: v[-1] for k, v in losses.items()},
    }


def run_pretrained(model_name_or_path: str, quick: bool = False) -> dict[str, Any]:
    """Precision@k with a pretrained model as the reference, on the built-in pairs' eval split at both span
    positions (prompts in the model's chat template), every estimator including the contrastive pair
    fine-tuned from the model on the train split; written as importance-<model>.json."""
    from tidpo_core.batching.features import EncodingSettings
    from tidpo_core.data.pairs import assign_split
    from tidpo_core.data.synthetic import generate_synthetic_pairs
    from tidpo_core.models.modeling import load_model_and_tokenizer, resolve_model_source

    common.setup_threads()
    started = time.perf_counter()
    pairs_count, eval_fraction = (12, 0.5) if quick else (240, 0.4)
    steps, batch = (1, 2) if quick else (PRETRAINED_CONTRASTIVE_STEPS, PRETRAINED_CONTRASTIVE_BATCH)
    source = resolve_model_source(model_name_or_path, Path(tempfile.gettempdir()) / "tidpo-bench-imports")
    model, tokenizer = load_model_and_tokenizer(source)
    settings = EncodingSettings(192, 128)
    figures: dict[str, Any] = {
        "model": model_name_or_path,
        "pairs": pairs_count,
        "eval_fraction": eval_fraction,
        "span_position": {},
        "contrastive": {},
    }
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-importance-pretrained-"))
    try:
        for position in SPAN_POSITIONS:
            pairs = generate_synthetic_pairs(pairs_count, seed=0, span_position=position)
            scored = [p for p in pairs if assign_split(p.pair_id, eval_fraction) == "eval"]
            trained = [p for p in pairs if assign_split(p.pair_id, eval_fraction) == "train"]
            contrastive, figures["contrastive"][position] = pretrained_contrastive_pair(
                model, tokenizer, trained, work / position, steps, batch
            )
            figures["span_position"][position] = score_model(
                model, tokenizer, scored, settings, ESTIMATORS, contrastive
            )
            common.log(
                NAME,
                f"{model_name_or_path} {position}: "
                + ", ".join(
                    f"{name} {row['precision_at_k']:.3f}"
                    for name, row in figures["span_position"][position].items()
                    if isinstance(row, dict) and "precision_at_k" in row
                ),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["target"] = {
        "contrastive hybrid precision@k at uniform >= 0.8": figures["span_position"]["uniform"][
            "contrastive"
        ]["precision_at_k"]
        >= 0.8
    }
    name = f"{NAME}-{Path(model_name_or_path).name.lower()}"
    return common.write_results(name, figures, quick, started)


def run(quick: bool = False) -> dict[str, Any]:
    from bench.preparation import tiny_model_config
    from tidpo_core.data.synthetic import generate_synthetic_pairs

    common.setup_threads()
    started = time.perf_counter()
    sizes = _sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-importance-"))
    figures: dict[str, Any] = {"sizes": sizes, "span_position": {}, "seconds_by_position": {}}
    try:
        for position in SPAN_POSITIONS:
            t0 = time.time()
            pairs = generate_synthetic_pairs(sizes["pairs"], seed=0, span_position=position)
            prepared = preparation.prepare(
                work / position,
                pairs,
                eval_fraction=sizes["eval_fraction"],
                model_config=tiny_model_config(sizes["tiny"]),
                sft_steps=sizes["sft_steps"],
                anchors=False,
            )
            common.log(
                NAME,
                f"{position}: reference ready in {time.time() - t0:.0f} s; training the contrastive pair",
            )
            contrastive = contrastive_pair(prepared, sizes)
            figures["span_position"][position] = score(prepared, contrastive)
            figures["seconds_by_position"][position] = time.time() - t0
            common.log(
                NAME,
                f"{position}: "
                + ", ".join(
                    f"{name} {row['precision_at_k']:.3f}"
                    for name, row in figures["span_position"][position].items()
                    if isinstance(row, dict) and "precision_at_k" in row
                ),
            )
        uniform = figures["span_position"]["uniform"]
        best = max(ESTIMATORS, key=lambda v: uniform[v]["precision_at_k"])
        figures["best_estimator_uniform"] = best
        figures["target"] = {
            "best hybrid precision@k on span_position uniform >= 0.6": uniform[best]["precision_at_k"]
            >= TARGET
        }
        figures["notes"] = [
            "precision@k: k = the span's token count; ties at the k-th place count their expected share (uniform "
            "weights score |span| / T exactly, the chance line).",
            "hybrid = 0.7 * I / max I + 0.3 * Gaussian prior, rescaled to mean 1 (what TI-DPO trains with); "
            "raw_precision_at_k scores the estimator's I alone.",
            "contrastive: I = |log pi_+ - log pi_-| with pi_+ / pi_- the untrained base fine-tuned on chosen / "
            "rejected answers only (TIS-DPO's SFT construction), same SFT settings as the reference.",
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return common.write_results(NAME, figures, quick, started)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="importance precision@k per estimator")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the smoke test runs)")
    parser.add_argument(
        "--model", default="", help="score a pretrained reference (e.g. smollm2-135m-instruct) instead"
    )
    args = parser.parse_args()
    if args.model:
        run_pretrained(args.model, quick=args.quick)
    else:
        run(quick=args.quick)


if __name__ == "__main__":
    main()
