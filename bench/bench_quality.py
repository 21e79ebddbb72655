"""Does TI-DPO pay off? DPO, SimPO, TI-DPO with each importance estimator and the paper's ablations, on the
built-in data with its critical spans mid-answer (`middle`) and anywhere (`uniform`), 3 seeds each.

Per span position, one reference model (tokenizer + tiny Llama + SFT on both answers) and one set of anchors
and token weights per estimator serve every run, so the methods differ only in their loss and weights; the
seed sets the data order. The authors' own algorithm (attribution recomputed with the current policy every
step, a fresh anchor from the current policy every step) runs beside tidpo's default on the `middle` data:
its epoch time against the default's is the honest cost of precomputing. For
each run: held-out preference accuracy (the implicit DPO reward beta * log(pi/pi_ref) of chosen vs
rejected, what TRL logs as rewards/accuracies; also the policy's own likelihood preference, summed and
length-normalised), and the critical-phrase rate of sampled answers (does the policy say the safe phrase
or the risky one). Importance precision@k of the stored hybrid weights against uniform weights (chance)
measures whether the weights find the critical span at all.

If TI-DPO does not beat DPO, single-switch ablations on one seed (no KL term, no triplet, neither: pure
token-weighted DPO) show which part of the loss is responsible; the findings go to "notes".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, preparation, quality_eval
from bench.quality_eval import METRICS, phrase_value

NAME = "quality"
HEADLINE = "reward_accuracy"
SPAN_POSITIONS = ("middle", "uniform")
# "weights" names the estimator whose stored table a method trains on (default: the paper's attribution).
METHODS = {
    "dpo": {"loss_type": "dpo"},
    "simpo": {"loss_type": "simpo"},
    "tidpo": {"loss_type": "tidpo"},
    "tidpo_surprisal": {"loss_type": "tidpo", "weights": "surprisal"},
    "tidpo_contrastive": {"loss_type": "tidpo", "weights": "contrastive"},
    # The paper's three ablations.
    "tidpo_no_attribution": {"loss_type": "tidpo", "weight_lambda": 0.0},
    "tidpo_no_prior": {"loss_type": "tidpo", "weight_lambda": 1.0},
    "tidpo_no_triplet": {"loss_type": "tidpo", "gamma": 0.0},
}
# The authors' per-step algorithm in tidpo's engine (docs/method.md 1 and 3, the reference code's choices).
AUTHORS = {"loss_type": "tidpo", "weights_mode": "online", "anchor_refresh_every": 1}
# Single switches on seed 0 of the middle data: the KL term, the cached KL, and the other triplet spaces.
ABLATIONS = {
    "tidpo_no_kl (alpha=0)": {"loss_type": "tidpo", "alpha": 0.0},
    "weighted_dpo (alpha=0, gamma=0)": {"loss_type": "tidpo", "alpha": 0.0, "gamma": 0.0},
    "tidpo_cached_kl (top-64 reference cache)": {"loss_type": "tidpo", "reference_kl": "cached"},
    "tidpo_triplet_weighted_mean": {"loss_type": "tidpo", "triplet_space": "weighted_mean"},
    "tidpo_triplet_hidden": {"loss_type": "tidpo", "triplet_space": "hidden"},
}


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "pairs": 24,
            "eval_fraction": 0.25,
            "seeds": [0],
            "sft_steps": 4,
            "anchor_new_tokens": 8,
            "sample_new_tokens": 4,
            "tiny": True,
            "ablations": False,
            "max_steps": 3,
            "plan": {
                "middle": {"methods": list(METHODS), "seed_methods": list(METHODS), "authors_seeds": [0]}
            },
        }
    # What fits one sitting of the 2-core machine (about 70 minutes): every method on seed 0 of the middle
    # data, the headline methods (DPO, the paper's TI-DPO, TI-DPO with the best estimator) on 3 seeds of both
    # span positions, the authors' per-step algorithm on seed 0. TIDPO_QUALITY_FULL=1 runs every method on
    # every seed of both positions and the single-switch ablations (about 2.5 hours).
    headline = ["dpo", "tidpo", "tidpo_contrastive"]
    if os.environ.get("TIDPO_QUALITY_FULL"):
        plan = {
            p: {
                "methods": list(METHODS),
                "seed_methods": list(METHODS),
                "authors_seeds": [0, 1, 2] if p == "middle" else [],
            }
            for p in SPAN_POSITIONS
        }
    else:
        plan = {
            "middle": {"methods": list(METHODS), "seed_methods": headline, "authors_seeds": [0]},
            "uniform": {"methods": headline, "seed_methods": headline, "authors_seeds": []},
        }
    return {
        "pairs": 2000,
        "eval_fraction": 0.1,
        "seeds": [0, 1, 2],
        "sft_steps": 300,
        "anchor_new_tokens": 64,
        "sample_new_tokens": 80,
        "tiny": False,
        "ablations": bool(os.environ.get("TIDPO_QUALITY_FULL")),
        "max_steps": -1,
        "plan": plan,
    }


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


# "Beats over 3 seeds": a verdict needs that many seeds on both sides (quick runs have one: no verdict).
MIN_SEEDS_FOR_A_VERDICT = 3


def beats(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """a's mean - std above b's mean + std (the issue's rule for "beats over 3 seeds")."""
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return None
    return a["mean"] - a["std"] > b["mean"] + b["std"]


def verdict(table: dict[str, Any], method: str) -> dict[str, Any]:
    """Does `method` beat DPO on the safe-phrase rate at a KL no larger than DPO's?"""
    key = "critical_phrase_chosen_of_all"
    mine, dpo = table.get(method, {}), table.get("dpo", {})
    if min(mine.get(key, {}).get("n", 0), dpo.get(key, {}).get("n", 0)) < MIN_SEEDS_FOR_A_VERDICT:
        return {
            "method": method,
            "met": None,
            "why": f"fewer than {MIN_SEEDS_FOR_A_VERDICT} seeds: no spread to judge by",
        }
    phrase = beats(mine.get(key), dpo.get(key))
    kl_ok = None
    if "kl" in mine and "kl" in dpo:
        kl_ok = mine["kl"]["mean"] <= dpo["kl"]["mean"]
    return {
        "method": method,
        "safe_phrase_beats_dpo (mean - std > dpo mean + std)": phrase,
        "kl_no_larger_than_dpo": kl_ok,
        "met": bool(phrase and kl_ok),
    }


def investigate(position: str, table: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Data-driven notes for one span position: every method's accuracy, safe phrase and KL against DPO's."""
    notes = []
    if "dpo" not in table:
        return notes
    d = table["dpo"]
    key = "critical_phrase_chosen_of_all"
    ref_phrase = phrase_value(reference, "chosen_of_all")
    for method, row in table.items():
        if method == "dpo":
            continue
        parts = [f"{HEADLINE} {row[HEADLINE]['mean']:.3f} (DPO {d[HEADLINE]['mean']:.3f})"]
        if key in row and key in d:
            relation = (
                "above"
                if beats(row[key], d[key])
                else "below"
                if beats(d[key], row[key])
                else "within the spread of"
            )
            parts.append(
                f"safe phrase {row[key]['mean']:.3f} ± {row[key]['std']:.3f}, {relation} DPO's {d[key]['mean']:.3f} ± {d[key]['std']:.3f}"
                + (f" (reference {ref_phrase:.3f})" if ref_phrase is not None else "")
            )
        if "kl" in row and "kl" in d:
            parts.append(f"KL {row['kl']['mean']:.2f} vs DPO {d['kl']['mean']:.2f}")
        notes.append(f"[{position}] {method}: " + "; ".join(parts) + ".")
    return notes


# Sizes that must match for a run of an earlier results file to stand in for a new one (the plan may grow).
REUSE_KEYS = (
    "pairs",
    "eval_fraction",
    "seeds",
    "sft_steps",
    "anchor_new_tokens",
    "sample_new_tokens",
    "tiny",
    "max_steps",
)


def reusable_runs(
    previous: dict[str, Any] | None, sizes: dict[str, Any], position: str
) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, seed) -> run of an earlier quality.json made with the same sizes (TIDPO_QUALITY_REUSE), so a
    longer plan only trains what is missing. Each reused run says where it came from (`reused_from`)."""
    if not previous or any(previous.get("sizes", {}).get(k) != sizes[k] for k in REUSE_KEYS):
        return {}
    section = previous.get("span_position", {}).get(position, {})
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for run in section.get("runs", []):
        found[(run["method"], run["seed"])] = {
            **run,
            "reused_from": run.get("reused_from", previous.get("commit")),
        }
    for name, run in section.get("ablations", {}).items():
        found[(name, sizes["seeds"][0])] = {
            **run,
            "reused_from": run.get("reused_from", previous.get("commit")),
        }
    return found


def _prepare_position(position: str, sizes: dict[str, Any], work: Path) -> preparation.Prepared:
    """The built-in pairs with the safe phrase at `position`, prepared with the top-k reference cache."""
    from tidpo_core.data.synthetic import generate_synthetic_pairs

    model_config = preparation.tiny_model_config(sizes["tiny"])
    common.log(NAME, f"[{position}] preparing {sizes['pairs']} synthetic pairs")
    return preparation.prepare(
        work / position,
        generate_synthetic_pairs(sizes["pairs"], seed=0, span_position=position),
        eval_fraction=sizes["eval_fraction"],
        model_config=model_config,
        vocab_size=model_config.vocab_size,
        sft_steps=sizes["sft_steps"],
        anchor_new_tokens=sizes["anchor_new_tokens"],
        reference_kl_top_k=preparation.REFERENCE_KL_TOP_K,
    )


def _authors_per_step(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """tidpo's default epoch over the authors' per-step algorithm's, on the seeds both ran; None before both ran.

    Same seeds and the same sitting on both sides (a reused run was timed in another one), so the ratio
    compares like with like."""
    default_by_seed = {r["seed"]: r for r in runs if r["method"] == "tidpo"}
    authors = [
        r
        for r in runs
        if r["method"] == "tidpo_authors_per_step"
        and r["seed"] in default_by_seed
        and default_by_seed[r["seed"]].get("reused_from") == r.get("reused_from")
    ]
    if not authors:
        return None
    default = [default_by_seed[a["seed"]] for a in authors]
    default_s, authors_s = (sum(r["train_s"] for r in rs) / len(rs) for rs in (default, authors))
    return {
        "seeds": sorted({a["seed"] for a in authors}),
        "epoch_s": {"tidpo_default": default_s, "authors_per_step": authors_s},
        "default_over_authors": default_s / authors_s,
        "target_default_at_most_0.5x_authors": default_s / authors_s <= 0.5,
    }


def _reuse_with_same_reference(
    previous: dict[str, Any] | None, sizes: dict[str, Any], position: str, reference: dict[str, float]
) -> dict[tuple[str, int], dict[str, Any]]:
    """reusable_runs, or none at all when the shared reference came out differently (another torch,
    another thread count) from the earlier file's."""
    reuse = reusable_runs(previous, sizes, position)
    earlier_reference = (previous or {}).get("span_position", {}).get(position, {}).get("reference", {})
    if reuse and any(
        not math.isclose(earlier_reference.get(k, math.nan), reference[k], rel_tol=1e-6) for k in METRICS
    ):
        common.log(NAME, f"[{position}] the reference differs from the reused file's; retraining every run")
        reuse = {}
    common.log(NAME, f"[{position}] reusing {len(reuse)} runs of an earlier results file")
    return reuse


def run_position(
    position: str,
    sizes: dict[str, Any],
    work: Path,
    progress: Any = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One span position's runs: `plan.methods` on the first seed, `plan.seed_methods` on every seed, the
    authors' algorithm on `plan.authors_seeds`. `progress(result_so_far)` is called after every run. Runs
    found in `previous` (an earlier results document with the same sizes) are taken from it, not retrained."""
    plan = sizes["plan"][position]
    methods = {name: METHODS[name] for name in plan["methods"]}
    prepared = _prepare_position(position, sizes, work)
    estimator_s = quality_eval.estimator_weights(prepared, sizes, methods)
    evaluator = quality_eval.Evaluator(prepared, sizes["sample_new_tokens"], phrases=True)
    common.log(NAME, f"[{position}] reference: {evaluator.reference}")
    out: dict[str, Any] = {
        "prepare_s": {**prepared.timings, "estimator_weights": estimator_s},
        "reference": evaluator.reference,
        "plan": plan,
    }
    runs: list[dict[str, Any]] = []
    ablations: dict[str, Any] = {}

    def summarize() -> dict[str, Any]:
        names = [m for m in [*METHODS, "tidpo_authors_per_step"] if any(r["method"] == m for r in runs)]
        table = aggregate(runs, names)
        out.update(
            {
                "methods": table,
                "runs": runs,
                "ablations": ablations,
                "notes": investigate(position, table, evaluator.reference),
            }
        )
        authors = _authors_per_step(runs)
        if authors is not None:
            out["authors_per_step"] = authors
        return out

    def record(result: dict[str, Any]) -> None:
        runs.append(result)
        common.log(
            NAME,
            f"[{position}] seed {result['seed']} {result['method']:<22} {HEADLINE} {result[HEADLINE]:.3f}  "
            f"KL {result.get('kl', float('nan')):.2f}  safe {phrase_value(result, 'chosen_of_all')}  train {result['train_s']:.0f} s",
        )
        if progress is not None:
            progress(summarize())

    reuse = _reuse_with_same_reference(previous, sizes, position, evaluator.reference)

    def trained(name: str, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
        if (name, seed) in reuse:
            return reuse[(name, seed)]
        return quality_eval.train_and_evaluate(
            prepared, evaluator, name, overrides, seed, work, sizes["max_steps"]
        )

    for seed in sizes["seeds"]:
        for method in plan["methods"] if seed == sizes["seeds"][0] else plan["seed_methods"]:
            record(trained(method, METHODS[method], seed))
        if seed in plan["authors_seeds"]:
            # The authors' per-step algorithm right after the default on the same seed: the cost of precomputing.
            record(trained("tidpo_authors_per_step", AUTHORS, seed))
    if sizes["ablations"] and position == "middle":
        for name, overrides in ABLATIONS.items():
            ablations[name] = trained(name, overrides, sizes["seeds"][0])
            common.log(NAME, f"[{position}] ablation {name:<32} {HEADLINE} {ablations[name][HEADLINE]:.3f}")
    summarize()
    for note in out["notes"]:
        common.log(NAME, note)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = _sizes(quick)
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-quality-"))
    by_position: dict[str, Any] = {}
    reuse_path = os.environ.get("TIDPO_QUALITY_REUSE")
    previous = json.loads(Path(reuse_path).read_text()) if reuse_path else None

    def figures(complete: bool) -> dict[str, Any]:
        targets = {}
        for position, result in by_position.items():
            for method in ("tidpo", "tidpo_surprisal", "tidpo_contrastive"):
                if method in result.get("methods", {}):
                    targets[f"{position}/{method}"] = verdict(result["methods"], method)
        first = by_position.get(next(iter(sizes["plan"])), {})
        return {
            "complete": complete,
            "setup": {
                "data": f"built-in synthetic, {sizes['pairs']} pairs per span position, hash split",
                "seeds": sizes["seeds"],
                "seed_controls": "training data order (the reference model, anchors and weights are shared)",
                "training": "1 epoch, batch 8, AdamW lr 5e-4 cosine, beta 0.1; tidpo: lambda 0.7, alpha 0.5 (inside beta), "
                "gamma 0.1, triplet Eq. 13 (sequence), margin 0.01",
                "headline_metric": HEADLINE,
                "methods": {**METHODS, "tidpo_authors_per_step": AUTHORS},
                "plan": sizes["plan"],
            },
            "span_position": by_position,
            # The middle data's figures also at the top level: the corpus tidpo ships by default.
            **{k: first.get(k) for k in ("reference", "methods", "runs")},
            "ablations": first.get("ablations", {}),
            "authors_per_step": first.get("authors_per_step"),
            "targets": targets,
            "notes": [n for result in by_position.values() for n in result.get("notes", [])],
            "sizes": sizes,
        }

    try:
        for position in sizes["plan"]:

            def progress(partial: dict[str, Any], position: str = position) -> None:
                by_position[position] = partial
                common.write_results(NAME, figures(complete=False), quick, started)

            by_position[position] = run_position(position, sizes, work, progress, previous)
        return common.write_results(NAME, figures(complete=True), quick, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.main_for(run)
