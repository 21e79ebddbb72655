"""Preference pairs and the bookkeeping of loading them: what a row becomes and why a row was refused.

A loaded source is a :class:`LoadResult`: every row it read is either a :class:`PreferencePair`, a
:class:`QuarantinedRow` (with a :class:`QuarantineReason`) or, for blank lines only, counted as skipped.
Nothing is silently dropped: the ``accepted + quarantined + skipped == rows_read`` invariant is checked
when a :class:`LoadResult` is built, so a bad row always shows up in the quarantine report instead of
vanishing. Rows are numbered from 1 as an editor counts lines (``line_1based``): the line a row starts on
in JSON lines and CSV files, the row's position in JSON arrays, Parquet and data sets.

Reading files is tidpo_core.data.files, recognising a row's format tidpo_core.data.formats, and judging
rows tidpo_core.data.validation.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from tidpo_core.runtime.errors import UserInputError

__all__ = [
    "BLANK_LINE",
    "DataFileError",
    "DataRowError",
    "LoadResult",
    "PreferencePair",
    "QuarantineReason",
    "QuarantinedRow",
    "SkippedRow",
    "assign_split",
    "make_pair_id",
]


class QuarantineReason(StrEnum):
    MALFORMED = "malformed_row"
    MISSING_FIELD = "missing_field"
    NOT_TEXT = "not_text"
    EMPTY_TEXT = "empty_text"
    CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
    TOO_LONG = "too_long"
    UNRECOGNIZED_FORMAT = "unrecognized_format"
    DUPLICATE = "duplicate_pair"
    NUL_BYTE = "nul_byte"


class DataFileError(UserInputError):
    """A file that is not a data file at all (binary junk, truncated gzip, unreadable parquet)."""


class DataRowError(ValueError):
    """One row that could not be decoded; handed to validation.validate_rows so it gets quarantined."""

    def __init__(self, detail: str, raw: bytes | str = b"") -> None:
        super().__init__(detail)
        self.detail = detail
        self.raw = raw


@dataclass(frozen=True)
class PreferencePair:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    source: str
    # hash=False keeps the frozen dataclass hashable despite the dict field.
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_row(self) -> dict[str, Any]:
        return {
            "pair_id": self.pair_id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "source": self.source,
            "meta_json": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PreferencePair:
        meta_json = row.get("meta_json")
        meta = json.loads(meta_json) if meta_json else dict(row.get("meta") or {})
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        return cls(
            pair_id=row.get("pair_id") or make_pair_id(prompt, chosen, rejected),
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            source=row.get("source", ""),
            meta=meta,
        )


class SkippedRow:
    """A row that holds no data at all (a blank line): counted under `reason`, neither a pair nor quarantined."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


BLANK_LINE = SkippedRow("blank_line")


@dataclass(frozen=True)
class QuarantinedRow:
    source: str
    line_1based: int
    reason: str
    detail: str
    raw: str


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    quarantined: list[QuarantinedRow]
    rows_read: int
    """Every row the source holds, blank lines included."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows without data (blank lines), by reason."""
    pair_lines: list[int] | None = None
    """`line_1based` of each accepted pair, where the source has lines or rows."""

    def __post_init__(self) -> None:
        # Raised explicitly (not `assert`) so the guarantee survives `python -O`.
        if len(self.pairs) + len(self.quarantined) + self.skipped_rows != self.rows_read:
            raise ValueError(
                f"rows silently dropped: {len(self.pairs)} accepted + {len(self.quarantined)} "
                f"quarantined + {self.skipped_rows} skipped != {self.rows_read} read"
            )
        if self.pair_lines is not None and len(self.pair_lines) != len(self.pairs):
            raise ValueError(f"{len(self.pair_lines)} line numbers for {len(self.pairs)} pairs")

    @property
    def accepted(self) -> int:
        return len(self.pairs)

    @property
    def skipped_rows(self) -> int:
        return sum(self.skipped.values())

    @property
    def quarantine_share(self) -> float:
        """Quarantined over the rows that hold data (blank lines are not data)."""
        data_rows = self.rows_read - self.skipped_rows
        return len(self.quarantined) / data_rows if data_rows else 0.0

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))


def make_pair_id(prompt: str, chosen: str, rejected: str) -> str:
    payload = json.dumps([prompt, chosen, rejected])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def assign_split(pair_id: str, eval_fraction: float = 0.1) -> Literal["train", "eval"]:
    # Hash-based, so a pair keeps its split when the corpus grows or is reordered.
    return "eval" if int(pair_id[:8], 16) / 16**8 < eval_fraction else "train"
