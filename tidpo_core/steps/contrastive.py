"""Train the two contrastive models of the `contrastive` importance estimator (TIS-DPO): the reference's
base fine-tuned on the chosen answers only and on the rejected answers only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tidpo_core import store
from tidpo_core.models.contrastive import (
    ContrastiveSFT,
    contrastive_paths,
    is_built,
    load_base,
    train_contrastive_pair,
)
from tidpo_core.runtime.fingerprint import digest
from tidpo_core.runtime.layout import DataDir
from tidpo_core.steps import OpenDb, log_to
from tidpo_core.steps.reference import ReferenceHandle


@dataclass(frozen=True)
class ContrastiveBuilt:
    fingerprint: str
    paths: tuple[str, str]
    """(positive, negative) model folders."""
    reused: bool
    sft_losses: dict[str, list[float]]


def train_contrastive_models(
    open_db: OpenDb,
    reference: ReferenceHandle,
    recipe: ContrastiveSFT,
    layout: DataDir,
    pairs_digest: str,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ContrastiveBuilt:
    """Both models for the stored train pairs (reused when built from the same pairs, base and recipe), recorded
    in DuckDB so that token weighing with estimator contrastive finds them. A learning rate left to None is
    settled by the reference first (a pretrained base gets a small one)."""
    recipe = recipe.settled(reference.is_pretrained)
    fingerprint = digest(
        {"pairs": pairs_digest, "base": reference.base, "recipe": dataclasses.asdict(recipe)}
    )
    out_dir = layout.contrastive_models(fingerprint)
    positive, negative = (str(p) for p in contrastive_paths(out_dir))
    reused = is_built(out_dir, fingerprint)
    losses: dict[str, list[float]] = {}
    if reused:
        log_to(log)(f"contrastive models at {out_dir} are up to date; reusing them")
    else:
        with open_db() as con:
            pairs = store.read_pairs(con, split="train")
        _, tokenizer = reference.load()
        base = load_base(reference.base, tokenizer)
        losses = train_contrastive_pair(
            base, tokenizer, pairs, out_dir, recipe=recipe, build_key=fingerprint, progress=progress
        )
    with open_db() as con:
        store.record_contrastive_models(
            con, fingerprint, reference.fingerprint, (positive, negative), dataclasses.asdict(recipe)
        )
    return ContrastiveBuilt(fingerprint, (positive, negative), reused, losses)
