"""Sample the anchors: one response per train prompt from the reference (the triplet loss's anchor)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tidpo_core import store
from tidpo_core.fingerprint import digest
from tidpo_core.generation import SamplingSettings, sample_responses
from tidpo_core.steps import OpenDb, log_to
from tidpo_core.steps.reference import ReferenceHandle

# Pairs per DuckDB transaction, in sampling batches: a crash keeps finished chunks and loses no more.
BATCHES_PER_WRITE = 8


@dataclass(frozen=True)
class AnchorsReport:
    fingerprint: str
    generated: int
    stored: int
    preview: list[tuple[str, str, str]]


def anchors_fingerprint(reference: ReferenceHandle, settings: SamplingSettings) -> str:
    return digest({"model": reference.fingerprint, "sampling": settings.as_dict()})


def sample_anchors(
    open_db: OpenDb,
    reference: ReferenceHandle,
    settings: SamplingSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> AnchorsReport:
    """Anchors for the train pairs that have none under these settings yet (a re-run samples only those)."""
    fingerprint = anchors_fingerprint(reference, settings)
    with open_db() as con:
        missing = set(store.missing_anchor_pair_ids(con, fingerprint))
        train = store.read_pairs(con, split="train")
    pairs = [p for p in train if p.pair_id in missing]
    log_to(log)(f"{len(pairs)} anchors to sample, {len(train) - len(pairs)} reused")
    generated = 0
    if pairs:
        model, tokenizer = reference.load()
        chunk = max(settings.batch_size * BATCHES_PER_WRITE, 1)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            texts = sample_responses(model, tokenizer, [p.prompt for p in part], settings, progress=progress)
            with open_db() as con:
                generated += store.insert_anchors(
                    con, fingerprint, {p.pair_id: t for p, t in zip(part, texts, strict=True)}, settings.as_dict()
                )
    with open_db() as con:
        return AnchorsReport(fingerprint, generated, store.anchor_count(con, fingerprint), store.first_anchors(con, fingerprint, 5))
