"""The preference data a run trains on: the configured source plus any files dropped in the inbox."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tidpo_core.data.files import is_data_file, load_preferences
from tidpo_core.data.pairs import DataFileError, LoadResult, QuarantinedRow, QuarantineReason
from tidpo_core.data.synthetic import SpanPosition, generate_synthetic_pairs

SYNTHETIC = "synthetic"


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
        pairs = generate_synthetic_pairs(
            synthetic_pairs, seed=synthetic_seed, span_position=synthetic_span_position
        )
        return LoadResult(pairs=pairs, quarantined=[], rows_read=len(pairs))
    return load_preferences(source, split=split, max_chars=max_chars)


def inbox_files(inbox: Path) -> list[Path]:
    """Data files waiting in the inbox; anything else there is left alone."""
    if not inbox.exists():
        return []
    return sorted(p for p in inbox.iterdir() if is_data_file(p))


def refuse_sources_without_pairs(loads: Sequence[tuple[str, LoadResult]]) -> None:
    """Raise DataFileError naming every source that yielded no accepted pair.

    Called before anything is stored: replacing the stored pairs with an empty or all-invalid file would
    erase them (and only then would the blocking check fail).
    """
    problems = []
    for source, result in loads:
        if result.accepted:
            continue
        blank = f", {result.skipped_rows} blank lines skipped" if result.skipped_rows else ""
        if not result.quarantined:
            problems.append(f"{source}: no rows{blank}")
        else:
            reasons = ", ".join(f"{reason} {n}" for reason, n in result.reason_counts().items())
            problems.append(
                f"{source}: no valid rows, {len(result.quarantined)} quarantined ({reasons}){blank}"
            )
    if problems:
        raise DataFileError(
            "no preference pair to store; the stored pairs are unchanged. " + "; ".join(problems)
        )


def merge_loads(results: Sequence[LoadResult]) -> LoadResult:
    """Concatenate loads; a pair already accepted from an earlier source is quarantined as a duplicate."""
    seen: set[str] = set()
    pairs, quarantined, rows_read, pair_lines = [], [], 0, []
    skipped: Counter[str] = Counter()
    for result in results:
        rows_read += result.rows_read
        skipped.update(result.skipped)
        quarantined.extend(result.quarantined)
        lines = result.pair_lines or list(range(1, len(result.pairs) + 1))
        for line, pair in zip(lines, result.pairs, strict=True):
            if pair.pair_id in seen:
                quarantined.append(
                    QuarantinedRow(
                        source=pair.source,
                        line_1based=line,
                        reason=QuarantineReason.DUPLICATE,
                        detail=f"pair {pair.pair_id} already loaded from an earlier source",
                        raw=repr(pair.to_row())[:2000],
                    )
                )
                continue
            seen.add(pair.pair_id)
            pairs.append(pair)
            pair_lines.append(line)
    return LoadResult(pairs, quarantined, rows_read, dict(sorted(skipped.items())), pair_lines)


BEYOND_MAX_PAIRS = "beyond_max_pairs"


def keep_at_most(result: LoadResult, max_pairs: int | None, seed: int = 0) -> LoadResult:
    """The first `max_pairs` accepted pairs after a shuffle seeded by `seed`, in their original order; the
    others are counted as skipped (`beyond_max_pairs`), so every row stays accounted for. None: all."""
    if max_pairs is None or result.accepted <= max_pairs:
        return result
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 (or unset), got {max_pairs}")
    kept = sorted(random.Random(seed).sample(range(result.accepted), max_pairs))
    lines = result.pair_lines
    return LoadResult(
        pairs=[result.pairs[i] for i in kept],
        quarantined=result.quarantined,
        rows_read=result.rows_read,
        skipped={**result.skipped, BEYOND_MAX_PAIRS: result.accepted - max_pairs},
        pair_lines=[lines[i] for i in kept] if lines is not None else None,
    )
