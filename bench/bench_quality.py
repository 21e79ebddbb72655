"""Does TI-DPO pay off? DPO, SimPO and TI-DPO on the built-in data set, 3 seeds each.

One reference model (tokenizer + tiny Llama + SFT on both answers) and one set of anchors and token
weights serve every run, so the methods differ only in their loss; the seed sets the data order. For
each run: held-out preference accuracy (the implicit DPO reward beta * log(pi/pi_ref) of chosen vs
rejected, what TRL logs as rewards/accuracies; also the policy's own likelihood preference, summed and
length-normalised), and the critical-phrase rate of sampled answers (does the policy say the safe phrase
or the risky one). Importance precision@k of the stored hybrid weights against uniform weights (chance)
measures whether the weights find the critical span at all.

If TI-DPO does not beat DPO, single-switch ablations on one seed (no KL term, no triplet, neither: pure
token-weighted DPO) show which part of the loss is responsible; the findings go to "notes".
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "quality"
HEADLINE = "reward_accuracy"
METRICS = ("reward_accuracy", "reward_margin", "likelihood_win_rate", "normalized_likelihood_win_rate")
METHODS = {"dpo": {"loss_type": "dpo"}, "simpo": {"loss_type": "simpo"}, "tidpo": {"loss_type": "tidpo"}}
ABLATIONS = {
    # DPO with a 5x stronger pull to the reference: is TI-DPO's gain only its KL control?
    "dpo_beta0.5": {"loss_type": "dpo", "beta": 0.5},
    "tidpo_no_kl (alpha=0)": {"loss_type": "tidpo", "alpha": 0.0},
    "tidpo_no_triplet (gamma=0)": {"loss_type": "tidpo", "gamma": 0.0},
    "weighted_dpo (alpha=0, gamma=0)": {"loss_type": "tidpo", "alpha": 0.0, "gamma": 0.0},
    # METHOD.md's option: anchors re-sampled from the current policy (every 50 of the epoch's ~228 steps).
    "tidpo_anchor_refresh (every 50 steps)": {"loss_type": "tidpo", "anchor_refresh_every": 50},
    # SeqKL from the reference's cached top-64 next tokens (of 2,048) instead of a reference forward.
    "tidpo_cached_kl (top-64 reference cache)": {"loss_type": "tidpo", "reference_kl": "cached"},
}


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "pairs": 24, "eval_fraction": 0.25, "seeds": [0], "sft_steps": 4, "anchor_new_tokens": 8,
            "sample_new_tokens": 4, "tiny": True, "ablations": False, "max_steps": 3,
        }
    return {
        "pairs": 2000, "eval_fraction": 0.1, "seeds": [0, 1, 2], "sft_steps": 300, "anchor_new_tokens": 64,
        "sample_new_tokens": 80, "tiny": False, "ablations": True, "max_steps": -1,
    }


def tiny_model_config(tiny: bool):
    from tidpo_core.modeling import TinyModelConfig

    if tiny:
        return TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return TinyModelConfig()


def _phrase_rate(samples: list[str], pairs: list[Any]) -> dict[str, Any] | str:
    rate = common.optional("tidpo_core.evaluation", "critical_phrase_rate")
    usable = [(s, p) for s, p in zip(samples, pairs, strict=True) if p.meta.get("chosen_phrase") and p.meta.get("rejected_phrase")]
    if rate is None:
        return "pending"
    if not usable:
        return "n/a (no critical phrases in this data)"
    return rate([s for s, _ in usable], [p.meta["chosen_phrase"] for _, p in usable], [p.meta["rejected_phrase"] for _, p in usable])


class Evaluator:
    """Held-out metrics of a policy against the shared reference (reference scores computed once)."""

    def __init__(self, prepared: common.Prepared, sample_new_tokens: int, phrases: bool, beta: float = 0.1):
        from tidpo_core.evaluation import preference_metrics, score_pairs
        from tidpo_core.features import EncodingSettings
        from tidpo_core.generation import SamplingSettings
        from tidpo_core.modeling import load_model_and_tokenizer

        self.prepared = prepared
        self.beta = beta
        self.phrases = phrases
        self.pairs = common.eval_pairs(prepared)
        self.settings = EncodingSettings(prepared.max_prompt_tokens, prepared.max_response_tokens)
        self.sampling = SamplingSettings(
            max_new_tokens=sample_new_tokens, seed=1234, batch_size=32, max_prompt_tokens=prepared.max_prompt_tokens
        )
        reference, self.tokenizer = load_model_and_tokenizer(prepared.reference_path)
        self.reference_model = reference
        self._score, self._metrics = score_pairs, preference_metrics
        self.reference_scores = score_pairs(reference, self.tokenizer, self.pairs, self.settings, 32)
        self.reference = self.evaluate_model(reference, is_reference=True)

    def evaluate_model(self, model, is_reference: bool = False) -> dict[str, Any]:
        from tidpo_core.generation import sample_responses

        scores = self.reference_scores if is_reference else self._score(model, self.tokenizer, self.pairs, self.settings, 32)
        metrics = self._metrics(scores, self.reference_scores, self.beta)
        out: dict[str, Any] = {k: metrics[k] for k in METRICS}
        out["eval_pairs"] = len(self.pairs)
        if self.phrases:
            samples = sample_responses(model, self.tokenizer, [p.prompt for p in self.pairs], self.sampling)
            out["critical_phrase"] = _phrase_rate(samples, self.pairs)
        if not is_reference and self.sampling.max_new_tokens > 0:
            # KL(pi || ref) on pure samples of the policy (temperature 1, no top-k/top-p: unbiased).
            from dataclasses import replace

            from tidpo_core.evaluation import KL_SAMPLING, kl_to_reference

            kl_sampling = replace(KL_SAMPLING, max_new_tokens=self.sampling.max_new_tokens, seed=1234,
                                  max_prompt_tokens=self.prepared.max_prompt_tokens)
            estimate, _ = kl_to_reference(model, self.reference_model, self.tokenizer, [p.prompt for p in self.pairs], kl_sampling)
            out["kl"], out["kl_stderr"] = estimate.kl, estimate.stderr
        return out

    def evaluate_path(self, path: str | Path) -> dict[str, Any]:
        from tidpo_core.modeling import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(path)
        return self.evaluate_model(model)


def train_and_evaluate(
    prepared: common.Prepared, evaluator: Evaluator, name: str, overrides: dict[str, Any], seed: int, work: Path, max_steps: int
) -> dict[str, Any]:
    out = work / f"{name.split()[0]}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    loss_type = overrides["loss_type"]
    extra = {k: v for k, v in overrides.items() if k != "loss_type"}
    config = common.train_config(prepared, loss_type, out, seed=seed, max_steps=max_steps, **extra)
    run = common.run_training(config)
    result = {
        "method": name,
        "seed": seed,
        "train_s": run.summary.seconds,
        "steps": run.summary.steps,
        "first_loss": run.summary.first_loss,
        "last_loss": run.summary.last_loss,
        "train_reward_accuracy_last": run.summary.history[-1].get("rewards/accuracies") if run.summary.history else None,
        **evaluator.evaluate_path(run.summary.final_model_path),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def phrase_value(run: dict[str, Any], key: str) -> float | None:
    phrase = run.get("critical_phrase")
    if not isinstance(phrase, dict):
        return None
    if key == "chosen_of_all":
        # Share of ALL samples that use the safe phrase: chosen_rate is over the samples that use either
        # phrase, which hides a policy whose answers stopped using either (collapsed generation).
        return phrase["chosen_rate"] * (1.0 - phrase["neither_rate"]) if phrase["neither_rate"] < 1.0 else 0.0
    return phrase.get(key)


def aggregate(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row = {metric: common.mean_std([r[metric] for r in mine]) for metric in METRICS}
        for key in ("chosen_of_all", "chosen_rate", "rejected_rate", "neither_rate"):
            values = [v for r in mine if (v := phrase_value(r, key)) is not None and not math.isnan(v)]
            if values:
                row[f"critical_phrase_{key}"] = common.mean_std(values)
        if any(r.get("critical_phrase") == "pending" for r in mine):
            row["critical_phrase"] = "pending"
        if all("kl" in r for r in mine):
            row["kl"] = common.mean_std([r["kl"] for r in mine])
        row["train_s"] = common.mean_std([r["train_s"] for r in mine])
        table[method] = row
    return table


def importance_precision(prepared: common.Prepared, limit: int | None = None) -> dict[str, Any] | str:
    """precision@k (k = span size) of the stored weights vs uniform, prior only and attribution only."""
    precision = common.optional("tidpo_core.evaluation", "importance_precision_at_k")
    if precision is None:
        return "pending"
    import numpy as np
    import torch

    from tidpo_core import store
    from tidpo_core.features import EncodingSettings, encode_response
    from tidpo_core.importance import gaussian_prior, hybrid_weights
    from tidpo_core.modeling import load_model_and_tokenizer
    from tidpo_core.tokenization import tokens_overlapping

    _, tokenizer = load_model_and_tokenizer(prepared.reference_path)
    settings = EncodingSettings(prepared.max_prompt_tokens, prepared.max_response_tokens)
    con = store.connect(prepared.duckdb_path, read_only=True)
    try:
        stored = store.read_token_weights(con, prepared.weights_fingerprint)
    finally:
        con.close()
    scores: dict[str, list[float]] = {"hybrid (stored, lambda 0.7)": [], "attribution only": [], "prior only": [], "uniform": []}
    span_share = []
    pairs = [p for p in common.train_pairs(prepared) if "chosen_span" in (p.meta or {})][:limit]
    for pair in pairs:
        for side in ("chosen", "rejected"):
            weights = stored.get((pair.pair_id, side))
            if weights is None:
                continue
            encoded = encode_response(tokenizer, pair.prompt, getattr(pair, side), settings)
            start, end = pair.meta[f"{side}_span"]
            span = tokens_overlapping(encoded.response_offsets, (int(start), int(end)))
            if not span:
                continue
            attribution = torch.tensor(weights.attribution, dtype=torch.float32)
            variants = {
                "hybrid (stored, lambda 0.7)": np.asarray(weights.weight),
                "attribution only": hybrid_weights(attribution, 1.0).numpy(),
                "prior only": gaussian_prior(len(weights.weight)).numpy(),
                "uniform": np.ones(len(weights.weight)),
            }
            for key, values in variants.items():
                scores[key].append(precision(values, span))
            span_share.append(len(span) / len(weights.weight))
    if not span_share:
        return "n/a (no critical spans in this data)"
    return {
        "k": "span size",
        "responses": len(span_share),
        "mean_span_share_of_response": float(np.mean(span_share)),
        **{key: float(np.mean(values)) for key, values in scores.items()},
    }


def investigate(table: dict[str, Any], ablations: dict[str, Any], precision: Any, reference: dict[str, Any]) -> list[str]:
    """Data-driven notes: who won, by how much against the seed spread, and what the ablations show."""
    notes = []
    if "dpo" not in table or "tidpo" not in table:
        return notes
    d, t = table["dpo"][HEADLINE], table["tidpo"][HEADLINE]
    diff = t["mean"] - d["mean"]
    spread = max(d["std"], t["std"])
    if min(d["n"], t["n"]) < 2:
        notes.append(
            f"Single seed: TI-DPO {t['mean']:.3f} vs DPO {d['mean']:.3f} held-out {HEADLINE} (diff {diff:+.3f}); "
            "no seed spread to judge the difference against."
        )
    elif diff > 2 * spread:
        notes.append(f"TI-DPO beats DPO on held-out {HEADLINE}: {t['mean']:.3f} vs {d['mean']:.3f} (diff {diff:+.3f}, seed std <= {spread:.3f}).")
    elif diff < -2 * spread:
        notes.append(f"TI-DPO does NOT beat DPO here: held-out {HEADLINE} {t['mean']:.3f} vs DPO {d['mean']:.3f} (diff {diff:+.3f}, seed std <= {spread:.3f}).")
    else:
        notes.append(f"TI-DPO and DPO are within seed noise on held-out {HEADLINE}: {t['mean']:.3f} vs {d['mean']:.3f} (diff {diff:+.3f}, seed std <= {spread:.3f}).")
    key = "critical_phrase_chosen_of_all"
    if key in table["dpo"] and key in table["tidpo"]:
        notes.append(
            f"Safe critical phrase in sampled answers (share of all samples): TI-DPO {table['tidpo'][key]['mean']:.3f} "
            f"vs DPO {table['dpo'][key]['mean']:.3f}; reference {(phrase_value(reference, 'chosen_of_all') or float('nan')):.3f}. "
            f"Answers with neither phrase: TI-DPO {table['tidpo']['critical_phrase_neither_rate']['mean']:.2f}, "
            f"DPO {table['dpo']['critical_phrase_neither_rate']['mean']:.2f}, reference {(phrase_value(reference, 'neither_rate') or float('nan')):.2f}."
        )
    if "kl" in table["dpo"] and "kl" in table["tidpo"]:
        notes.append(f"KL(policy || reference), Monte-Carlo: TI-DPO {table['tidpo']['kl']['mean']:.2f} vs DPO {table['dpo']['kl']['mean']:.2f} nats per answer.")
    if isinstance(precision, dict):
        notes.append(
            "Importance precision@k (k = span size): hybrid {h:.3f}, attribution only {a:.3f}, prior only {p:.3f}, "
            "uniform/chance {u:.3f}.".format(
                h=precision["hybrid (stored, lambda 0.7)"], a=precision["attribution only"], p=precision["prior only"], u=precision["uniform"]
            )
        )
        if precision["hybrid (stored, lambda 0.7)"] <= precision["uniform"] * 1.1:
            notes.append("The hybrid weights hardly concentrate on the critical span (precision@k near chance), so weighting "
                         "cannot focus the DPO signal on it; on this data the chosen and rejected answers differ only in that span, "
                         "and every shared token's log-ratio cancels between chosen and rejected anyway under uniform weights.")
    if ablations:
        base = t["mean"]
        for name, row in ablations.items():
            phrase = phrase_value(row, "chosen_of_all")
            notes.append(
                f"Ablation {name} (seed 0): {HEADLINE} {row[HEADLINE]:.3f} (TI-DPO mean {base:.3f}, DPO mean {d['mean']:.3f}); "
                f"safe phrase in {phrase if phrase is not None else float('nan'):.3f} of samples; KL {row.get('kl', float('nan')):.2f}."
            )
    return notes


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    from tidpo_core.synthetic import generate_synthetic_pairs

    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-quality-"))
    try:
        model_config = tiny_model_config(sizes["tiny"])
        common.log(NAME, f"preparing {sizes['pairs']} synthetic pairs")
        prepared = common.prepare(
            work / "data",
            generate_synthetic_pairs(sizes["pairs"], seed=0),
            eval_fraction=sizes["eval_fraction"],
            model_config=model_config,
            vocab_size=model_config.vocab_size,
            sft_steps=sizes["sft_steps"],
            anchor_new_tokens=sizes["anchor_new_tokens"],
            reference_kl_top_k=common.REFERENCE_KL_TOP_K,
        )
        evaluator = Evaluator(prepared, sizes["sample_new_tokens"], phrases=True)
        common.log(NAME, f"reference: {evaluator.reference}")
        runs = []
        for seed in sizes["seeds"]:
            for method, overrides in METHODS.items():
                result = train_and_evaluate(prepared, evaluator, method, overrides, seed, work, sizes["max_steps"])
                runs.append(result)
                common.log(NAME, f"seed {seed} {method:<6} {HEADLINE} {result[HEADLINE]:.3f}  phrase {result.get('critical_phrase')}")
        table = aggregate(runs, list(METHODS))
        precision = importance_precision(prepared)
        ablations: dict[str, Any] = {}
        if sizes["ablations"]:
            for name, overrides in ABLATIONS.items():
                result = train_and_evaluate(prepared, evaluator, name, overrides, sizes["seeds"][0], work, sizes["max_steps"])
                ablations[name] = result
                common.log(NAME, f"ablation {name:<32} {HEADLINE} {result[HEADLINE]:.3f}")
        notes = investigate(table, ablations, precision, evaluator.reference)
        for note in notes:
            common.log(NAME, note)
        figures = {
            "setup": {
                "data": f"built-in synthetic, {sizes['pairs']} pairs, hash split ({prepared.n_train} train / {prepared.n_eval} eval)",
                "model_parameters": prepared.parameters,
                "seeds": sizes["seeds"],
                "seed_controls": "training data order (the reference model, anchors and weights are shared)",
                "training": "1 epoch, batch 8, AdamW lr 5e-4 cosine, beta 0.1; tidpo: lambda 0.7, alpha 0.5, gamma 0.1",
                "headline_metric": HEADLINE,
                "sampling": evaluator.sampling.as_dict(),
            },
            "prepare_s": prepared.timings,
            "reference": evaluator.reference,
            "methods": table,
            "runs": runs,
            "importance_precision_at_k": precision,
            "ablations": ablations,
            "notes": notes,
            "sizes": sizes,
        }
        return common.write_results(NAME, figures, quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.main_for(run)
