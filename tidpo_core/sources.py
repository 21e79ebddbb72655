"""The preference data a run trains on: the configured source plus any files dropped in the inbox."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tidpo_core.data import LoadResult, QuarantinedRow, QuarantineReason, load_preferences
from tidpo_core.synthetic import SpanPosition, generate_synthetic_pairs

SYNTHETIC = "synthetic"
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


def load_source(
    source: str,
    *,
    synthetic_pairs: int = 2000,
    synthetic_seed: int = 0,
    synthetic_span_position: SpanPosition = "middle",
    split: str = "train",
    max_chars: int = 20_000,
) -> LoadResult:
    """`synthetic` (the built-in corpus), a local file or folder, or a Hugging Face hub data set id."""
    if source == SYNTHETIC:
        pairs = generate_synthetic_pairs(synthetic_pairs, seed=synthetic_seed, span_position=synthetic_span_position)
        return LoadResult(pairs=pairs, quarantined=[], rows_read=len(pairs))
    return load_preferences(source, split=split, max_chars=max_chars)


def is_data_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(DATA_SUFFIXES)


def inbox_files(inbox: Path) -> list[Path]:
    """Data files waiting in the inbox; anything else there is left alone."""
    if not inbox.exists():
        return []
    return sorted(p for p in inbox.iterdir() if is_data_file(p))


def merge_loads(results: Sequence[LoadResult]) -> LoadResult:
    """Concatenate loads; a pair already accepted from an earlier source is quarantined as a duplicate."""
    seen: set[str] = set()
    pairs, quarantined, rows_read = [], [], 0
    for result in results:
        rows_read += result.rows_read
        quarantined.extend(result.quarantined)
        for index, pair in enumerate(result.pairs):
            if pair.pair_id in seen:
                quarantined.append(
                    QuarantinedRow(
                        source=pair.source,
                        row_number=index,
                        reason=QuarantineReason.DUPLICATE,
                        detail=f"pair {pair.pair_id} already loaded from an earlier source",
                        raw=repr(pair.to_row())[:2000],
                    )
                )
                continue
            seen.add(pair.pair_id)
            pairs.append(pair)
    return LoadResult(pairs=pairs, quarantined=quarantined, rows_read=rows_read)
