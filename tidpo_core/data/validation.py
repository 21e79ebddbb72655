"""Judging rows: every loader funnels its rows through :func:`validate_rows`.

Each raw row becomes a :class:`PreferencePair` or a :class:`QuarantinedRow`, or (blank lines only) is
counted as skipped with a reason, so the :class:`LoadResult` accounts for every row read. A row whose
format is recognised (tidpo_core.data.formats) is still quarantined when a text is empty, too long, holds
a NUL, or chosen equals rejected, and when it repeats an earlier pair.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from tidpo_core.data.formats import ChatTemplate, Rejection, parse_row
from tidpo_core.data.pairs import (
    DataRowError,
    LoadResult,
    PreferencePair,
    QuarantinedRow,
    QuarantineReason,
    SkippedRow,
    make_pair_id,
)

__all__ = ["EXTRA_MAX_CHARS", "RAW_MAX_CHARS", "validate_rows"]

RAW_MAX_CHARS = 2_000
# Extra columns are kept only when small: large ones (full conversations, embeddings) would bloat
# every stored row for no benefit to training.
EXTRA_MAX_CHARS = 1_000


def _safe_text(text: str) -> str:
    # Lone surrogates (from bad UTF-8 or JSON escapes) would break any later UTF-8 write.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_repr(raw: Any) -> str:
    if isinstance(raw, DataRowError):
        raw = raw.raw
    if isinstance(raw, bytes | bytearray):
        text = repr(bytes(raw))
    elif isinstance(raw, str):
        text = raw
    else:
        try:
            text = json.dumps(raw, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(raw)
    return _safe_text(text)[:RAW_MAX_CHARS]


def _json_small(value: Any) -> bool:
    try:
        return len(json.dumps(value)) <= EXTRA_MAX_CHARS
    except (TypeError, ValueError):
        return False


def _row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    meta_json = row.get("meta_json")
    if isinstance(meta_json, str):
        try:
            parsed = json.loads(meta_json)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            meta.update(parsed)
    if isinstance(row.get("meta"), Mapping):
        for key, value in row["meta"].items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            meta[str(key)] = value
    reserved = {"prompt", "chosen", "rejected", "meta", "meta_json"}
    if "meta_json" in row:
        # A row written by PreferencePair.to_row: its id and source are derived, not extra data.
        reserved |= {"pair_id", "source"}
    extra = {str(k): v for k, v in row.items() if k not in reserved and v is not None and _json_small(v)}
    if extra and "extra" not in meta:
        meta["extra"] = extra
    return meta


def _check_texts(texts: dict[str, str], max_chars: int) -> Rejection | None:
    for name, text in texts.items():
        if "\x00" in text:
            return Rejection(
                QuarantineReason.NUL_BYTE, f"{name} contains a NUL character at {text.index(chr(0))}"
            )
    for name, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return Rejection(QuarantineReason.MALFORMED, f"{name} is not valid unicode ({exc.reason})")
    for name, text in texts.items():
        if not text.strip():
            return Rejection(QuarantineReason.EMPTY_TEXT, f"{name} is empty or whitespace only")
    for name, text in texts.items():
        if len(text) > max_chars:
            return Rejection(
                QuarantineReason.TOO_LONG, f"{name} has {len(text)} chars > max_chars={max_chars}"
            )
    if texts["chosen"].strip() == texts["rejected"].strip():
        return Rejection(QuarantineReason.CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same text")
    return None


def validate_rows(
    rows: Iterable[tuple[int, Any]],
    *,
    source: str,
    max_chars: int = 20_000,
    chat_template: ChatTemplate | None = None,
) -> LoadResult:
    """Validate raw rows into pairs and quarantined rows; tidpo_core.data.formats lists the formats."""
    pairs: list[PreferencePair] = []
    quarantined: list[QuarantinedRow] = []
    seen: dict[str, int] = {}
    pair_lines: list[int] = []
    skipped: Counter[str] = Counter()
    rows_read = 0
    for line_1based, raw in rows:
        rows_read += 1
        if isinstance(raw, SkippedRow):
            skipped[raw.reason] += 1
            continue
        parsed = parse_row(raw, chat_template)
        if not isinstance(parsed, Rejection):
            prompt, chosen, rejected = parsed
            parsed = _check_texts({"prompt": prompt, "chosen": chosen, "rejected": rejected}, max_chars)
            if parsed is None:
                pair_id = make_pair_id(prompt, chosen, rejected)
                if pair_id in seen:
                    parsed = Rejection(
                        QuarantineReason.DUPLICATE,
                        f"same pair as line {seen[pair_id]} (pair_id {pair_id})",
                    )
                else:
                    seen[pair_id] = line_1based
                    pairs.append(PreferencePair(pair_id, prompt, chosen, rejected, source, _row_meta(raw)))
                    pair_lines.append(line_1based)
                    continue
        quarantined.append(
            QuarantinedRow(
                source=source,
                line_1based=line_1based,
                reason=str(parsed.reason),
                detail=_safe_text(parsed.detail),
                raw=_raw_repr(raw),
            )
        )
    return LoadResult(pairs, quarantined, rows_read, dict(sorted(skipped.items())), pair_lines)
