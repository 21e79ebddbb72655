"""Ingest preference pairs: read every source, validate, and replace the stored pairs in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tidpo_core import store
from tidpo_core.data.pairs import DataFileError, LoadResult
from tidpo_core.data.sources import keep_at_most, load_source, merge_loads, refuse_sources_without_pairs
from tidpo_core.data.synthetic import SpanPosition
from tidpo_core.steps import OpenDb


@dataclass(frozen=True)
class PairSources:
    source: str = "synthetic"
    """`synthetic` (built-in corpus), a JSONL/Parquet/CSV file, a local data set folder, or a hub id."""
    synthetic_pairs: int = 2000
    synthetic_seed: int = 0
    synthetic_span_position: SpanPosition = "middle"
    """Where the built-in corpus puts each answer's critical span: mostly mid-answer (`middle`, where the
    Gaussian prior looks) or anywhere (`uniform`, so the prior has no built-in advantage)."""
    split: str = "train"
    """Split to read from a hub data set or folder."""
    eval_fraction: float = 0.1
    max_chars: int = 20_000
    max_pairs: int | None = None
    """Keep at most this many accepted pairs (all sources together): the first N after a shuffle seeded by
    `max_pairs_seed`, so the same file and settings always keep the same pairs. None: keep all."""
    max_pairs_seed: int = 0


@dataclass(frozen=True)
class IngestReport:
    sources: list[str]
    result: LoadResult
    """What was stored: the accepted pairs after max_pairs, every quarantined and skipped row."""
    available: int
    """Accepted pairs before max_pairs."""
    stored: store.PairsWriteSummary
    digest: str
    preview: list[tuple[str, str, str, str, str]]
    quarantine_preview: list[tuple[str, int, str, str]]


def ingest_pairs(
    open_db: OpenDb,
    settings: PairSources,
    extra_sources: Sequence[str] = (),
    eval_ids: set[str] | None = None,
) -> IngestReport:
    """Load `settings.source` and `extra_sources` (inbox files), then make them the stored pairs.

    Nothing is written unless every source loads and each yields at least one pair: a bad or empty file
    leaves the stored pairs exactly as they were (DataFileError, naming the file). `eval_ids`, if given,
    fixes the eval split (a benchmark's); otherwise each pair's hash decides with `eval_fraction`.
    """
    sources = [settings.source, *extra_sources]
    loads = []
    for source in sources:
        try:
            loads.append(
                load_source(
                    source,
                    synthetic_pairs=settings.synthetic_pairs,
                    synthetic_seed=settings.synthetic_seed,
                    synthetic_span_position=settings.synthetic_span_position,
                    split=settings.split,
                    max_chars=settings.max_chars,
                )
            )
        except (DataFileError, FileNotFoundError) as exc:
            raise DataFileError(f"cannot load preference data from {source}: {exc}", source=source) from None
    try:
        refuse_sources_without_pairs(list(zip(sources, loads, strict=True)))
    except DataFileError as exc:
        raise DataFileError(str(exc), sources=sources) from None
    merged = merge_loads(loads)
    return store_pairs(
        open_db,
        keep_at_most(merged, settings.max_pairs, settings.max_pairs_seed),
        settings.eval_fraction,
        eval_ids,
        sources,
        merged.accepted,
    )


def store_pairs(
    open_db: OpenDb,
    result: LoadResult,
    eval_fraction: float,
    eval_ids: set[str] | None = None,
    sources: Sequence[str] = (),
    available: int | None = None,
) -> IngestReport:
    """Make `result` the stored pairs and quarantine, in one transaction (then fix the eval split if asked)."""
    with open_db() as con:
        stored = store.replace_pairs(con, result, eval_fraction if eval_ids is None else 0.0)
        if eval_ids is not None:
            store.set_eval_split(con, eval_ids)
            train = store.pair_count(con, split="train")
            stored = store.PairsWriteSummary(stored.pairs, train, stored.pairs - train, stored.quarantined)
        return IngestReport(
            sources=list(sources),
            result=result,
            available=result.accepted if available is None else available,
            stored=stored,
            digest=store.pairs_digest(con),
            preview=store.first_pairs(con, 5),
            quarantine_preview=store.first_quarantined(con, 10),
        )
