"""Preference data: loading, format detection and validation.

Every loader funnels its rows through :func:`validate_rows`, which turns each raw row into either a
:class:`PreferencePair` or a :class:`QuarantinedRow`, or (blank lines only) counts it as skipped with a
reason. Nothing is silently dropped: the ``accepted + quarantined + skipped == rows_read`` invariant is
checked when a :class:`LoadResult` is built, so a bad row always shows up in the quarantine report
instead of vanishing. Rows are numbered from 1 as an editor counts lines (``line_1based``): the line a
row starts on in JSON lines and CSV files, the row's position in JSON arrays, Parquet and data sets.

Supported row formats (detected per row, so mixed files work):

* explicit: ``prompt``, ``chosen``, ``rejected`` strings;
* TRL conversational: ``chosen``/``rejected`` (and optionally ``prompt``) as lists of
  ``{"role", "content"}`` messages, with an explicit or an implicit (shared-prefix) prompt;
* Anthropic HH: ``chosen``/``rejected`` full transcripts and no ``prompt``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from tidpo_core.runtime.errors import UserInputError

__all__ = [
    "DataFileError",
    "DataRowError",
    "LoadResult",
    "PreferencePair",
    "QuarantineReason",
    "QuarantinedRow",
    "assign_split",
    "chat_template_renderer",
    "load_preferences",
    "make_pair_id",
    "split_hh_dialogue",
    "validate_rows",
]

ChatTemplate = Callable[[list[dict]], str]

HH_ASSISTANT = "\n\nAssistant:"
RAW_MAX_CHARS = 2_000
# Extra columns are kept only when small: large ones (full conversations, embeddings) would bloat
# every stored row for no benefit to training.
EXTRA_MAX_CHARS = 1_000
# Above this share of undecodable lines (and with no line parsed) a file is junk, not data.
JUNK_LINE_SHARE = 0.3
# A CSV whose header line (within these first bytes) is not UTF-8 text is binary, not data.
BINARY_SNIFF_BYTES = 4096

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_ROLE_LABELS = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


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
    """One row that could not be decoded; handed to :func:`validate_rows` so it gets quarantined."""

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


def split_hh_dialogue(chosen_transcript: str, rejected_transcript: str) -> tuple[str, str, str]:
    """Split two Anthropic HH transcripts into (prompt, chosen, rejected).

    The prompt runs up to and including the last "\n\nAssistant:" of the chosen transcript, so
    ``prompt + chosen == chosen_transcript``. The rejected transcript must reach its own last
    Assistant turn through exactly the same text; when it does not (HH has a few transcripts with a
    stray turn glued into a response), the split is ambiguous and a ValueError says so rather than
    guessing.
    """
    cut = chosen_transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("chosen transcript has no '\\n\\nAssistant:' turn")
    rcut = rejected_transcript.rfind(HH_ASSISTANT)
    if rcut < 0:
        raise ValueError("rejected transcript has no '\\n\\nAssistant:' turn")
    prompt = chosen_transcript[: cut + len(HH_ASSISTANT)]
    if rejected_transcript[: rcut + len(HH_ASSISTANT)] != prompt:
        raise ValueError("chosen and rejected transcripts differ before their last '\\n\\nAssistant:' turn")
    return prompt, chosen_transcript[len(prompt) :], rejected_transcript[len(prompt) :]


def chat_template_renderer(tokenizer: Any) -> ChatTemplate | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Validation core
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reject:
    reason: QuarantineReason
    detail: str


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


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    # Multimodal-style content: a list of {"type": "text", "text": ...} parts.
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _normalize_messages(name: str, messages: list[Any]) -> list[dict[str, str]] | _Reject:
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or "content" not in msg:
            return _Reject(
                QuarantineReason.UNRECOGNIZED_FORMAT,
                f"{name}[{i}] is not a {{'role', 'content'}} message",
            )
        text = _message_text(msg["content"])
        if text is None:
            return _Reject(
                QuarantineReason.NOT_TEXT,
                f"{name}[{i}].content is {type(msg['content']).__name__}, expected str",
            )
        out.append({"role": msg["role"], "content": text})
    return out


def _render_plain(messages: list[dict[str, str]]) -> str:
    turns = "".join(
        f"\n\n{_ROLE_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages
    )
    return turns + HH_ASSISTANT


def _completion_text(name: str, messages: list[dict[str, str]]) -> str | _Reject:
    if not messages:
        return _Reject(QuarantineReason.MISSING_FIELD, f"{name} has no assistant message after the prompt")
    roles = sorted({m["role"] for m in messages} - {"assistant"})
    if roles:
        return _Reject(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            f"{name} response contains non-assistant messages ({', '.join(roles)}): "
            "the conversations diverge before the last assistant turn",
        )
    return "\n\n".join(m["content"] for m in messages)


def _shared_prefix_len(a: list[dict[str, str]], b: list[dict[str, str]]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    # The prompt ends at a non-assistant turn; a shared assistant turn belongs to the responses.
    while k > 0 and a[k - 1]["role"] == "assistant":
        k -= 1
    return k


def _parse_conversational(
    prompt: Any, chosen: list[Any], rejected: list[Any], chat_template: ChatTemplate | None
) -> tuple[str, str, str] | _Reject:
    c_msgs = _normalize_messages("chosen", chosen)
    if isinstance(c_msgs, _Reject):
        return c_msgs
    r_msgs = _normalize_messages("rejected", rejected)
    if isinstance(r_msgs, _Reject):
        return r_msgs

    if isinstance(prompt, list):
        p_msgs = _normalize_messages("prompt", prompt)
        if isinstance(p_msgs, _Reject):
            return p_msgs
        # Some datasets repeat the prompt inside chosen/rejected; strip it so only the reply remains.
        if c_msgs[: len(p_msgs)] == p_msgs:
            c_msgs = c_msgs[len(p_msgs) :]
        if r_msgs[: len(p_msgs)] == p_msgs:
            r_msgs = r_msgs[len(p_msgs) :]
    else:
        k = _shared_prefix_len(c_msgs, r_msgs)
        if k:
            p_msgs, c_msgs, r_msgs = c_msgs[:k], c_msgs[k:], r_msgs[k:]
        elif isinstance(prompt, str):
            # Completion-only conversations with a plain-text prompt (e.g. UltraFeedback variants).
            p_msgs = [{"role": "user", "content": prompt}]
        else:
            return _Reject(
                QuarantineReason.MISSING_FIELD,
                "prompt: no 'prompt' key and chosen/rejected share no leading messages",
            )
    if not p_msgs:
        return _Reject(QuarantineReason.EMPTY_TEXT, "prompt has no messages")

    chosen_text = _completion_text("chosen", c_msgs)
    if isinstance(chosen_text, _Reject):
        return chosen_text
    rejected_text = _completion_text("rejected", r_msgs)
    if isinstance(rejected_text, _Reject):
        return rejected_text

    if chat_template is None:
        return _render_plain(p_msgs), " " + chosen_text, " " + rejected_text
    try:
        prompt_text = chat_template(p_msgs)
    except Exception as exc:  # templates raise anything (jinja errors, role-order checks)
        return _Reject(QuarantineReason.UNRECOGNIZED_FORMAT, f"chat template failed: {exc}")
    if not isinstance(prompt_text, str):
        return _Reject(QuarantineReason.NOT_TEXT, "chat template did not return a string")
    return prompt_text, chosen_text, rejected_text


def _parse_row(raw: Any, chat_template: ChatTemplate | None) -> tuple[str, str, str] | _Reject:
    if isinstance(raw, DataRowError):
        return _Reject(QuarantineReason.MALFORMED, raw.detail)
    if isinstance(raw, bytes | bytearray | str):
        return _Reject(QuarantineReason.MALFORMED, "row could not be decoded as a JSON object")
    if not isinstance(raw, Mapping):
        return _Reject(QuarantineReason.MALFORMED, f"row is a JSON {type(raw).__name__}, not an object")

    # None means "absent": datasets/parquet fill missing keys of mixed-schema files with nulls.
    prompt, chosen, rejected = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
    if chosen is None and rejected is None:
        if prompt is None:
            keys = ", ".join(sorted(map(str, raw.keys()))[:10]) or "none"
            return _Reject(
                QuarantineReason.UNRECOGNIZED_FORMAT,
                f"no prompt/chosen/rejected fields (keys: {keys})",
            )
        return _Reject(QuarantineReason.MISSING_FIELD, "chosen and rejected are missing")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return _Reject(QuarantineReason.MISSING_FIELD, f"{name} is missing")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, str | list):
            return _Reject(
                QuarantineReason.NOT_TEXT,
                f"{name} is {type(value).__name__}, expected str or list of messages",
            )

    if isinstance(chosen, list) and isinstance(rejected, list):
        return _parse_conversational(prompt, chosen, rejected, chat_template)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return _Reject(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "one of chosen/rejected is text and the other a message list",
        )
    if isinstance(prompt, str):
        return prompt, chosen, rejected
    if isinstance(prompt, list):
        return _Reject(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "prompt is a message list but chosen/rejected are plain text",
        )
    has_turn = (HH_ASSISTANT in chosen, HH_ASSISTANT in rejected)
    if all(has_turn):
        try:
            return split_hh_dialogue(chosen, rejected)
        except ValueError as exc:
            return _Reject(QuarantineReason.UNRECOGNIZED_FORMAT, f"HH transcript: {exc}")
    if any(has_turn):
        return _Reject(
            QuarantineReason.UNRECOGNIZED_FORMAT,
            "only one of chosen/rejected is an HH transcript with an Assistant turn",
        )
    return _Reject(
        QuarantineReason.MISSING_FIELD,
        "prompt is missing and chosen/rejected are not HH transcripts",
    )


def _check_texts(texts: dict[str, str], max_chars: int) -> _Reject | None:
    for name, text in texts.items():
        if "\x00" in text:
            return _Reject(
                QuarantineReason.NUL_BYTE, f"{name} contains a NUL character at {text.index(chr(0))}"
            )
    for name, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return _Reject(QuarantineReason.MALFORMED, f"{name} is not valid unicode ({exc.reason})")
    for name, text in texts.items():
        if not text.strip():
            return _Reject(QuarantineReason.EMPTY_TEXT, f"{name} is empty or whitespace only")
    for name, text in texts.items():
        if len(text) > max_chars:
            return _Reject(QuarantineReason.TOO_LONG, f"{name} has {len(text)} chars > max_chars={max_chars}")
    if texts["chosen"].strip() == texts["rejected"].strip():
        return _Reject(QuarantineReason.CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same text")
    return None


def validate_rows(
    rows: Iterable[tuple[int, Any]],
    *,
    source: str,
    max_chars: int = 20_000,
    chat_template: ChatTemplate | None = None,
) -> LoadResult:
    """Validate raw rows into pairs and quarantined rows; see the module docstring for formats."""
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
        parsed = _parse_row(raw, chat_template)
        if not isinstance(parsed, _Reject):
            prompt, chosen, rejected = parsed
            parsed = _check_texts({"prompt": prompt, "chosen": chosen, "rejected": rejected}, max_chars)
            if parsed is None:
                pair_id = make_pair_id(prompt, chosen, rejected)
                if pair_id in seen:
                    parsed = _Reject(
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


# ---------------------------------------------------------------------------------------------
# File readers: each yields (line_1based, raw) and leaves judging the rows to validate_rows.
# ---------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            # Decompress fully up front: a truncated archive must fail the file, not yield half of it.
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(
            f"{path.name}: cannot read compressed data ({type(exc).__name__}: {exc})"
        ) from exc


def _decode_json_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataRowError(f"invalid UTF-8 at byte {exc.start}", line)
    try:
        return json.loads(text)
    except ValueError as exc:
        return DataRowError(f"invalid JSON: {exc}", line)


def _json_rows(path: Path) -> list[tuple[int, Any]]:
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.lstrip().startswith(b"["):
        # A whole-file JSON array; on failure fall through to lines, which localises the damage.
        try:
            whole = json.loads(data.decode("utf-8"))
        except ValueError:
            whole = None
        if isinstance(whole, list):
            return list(enumerate(whole, start=1))

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line starts no line of its own
    rows = [(i, _decode_json_line(line) if line.strip() else BLANK_LINE) for i, line in enumerate(lines, start=1)]
    failures = [raw for _, raw in rows if isinstance(raw, DataRowError)]
    data_lines = sum(1 for _, raw in rows if raw is not BLANK_LINE)
    undecodable = sum(1 for err in failures if err.detail.startswith("invalid UTF-8"))
    if data_lines and len(failures) == data_lines and (undecodable > JUNK_LINE_SHARE * data_lines or b"\x00" in data):
        raise DataFileError(
            f"{path.name}: not a JSON lines file ({undecodable} of {data_lines} lines are not UTF-8 text "
            "and no line parses as JSON)"
        )
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataFileError(f"{path.name}: unreadable parquet file ({type(exc).__name__}: {exc})") from exc
    return list(enumerate(table.to_pylist(), start=1))


_MESSAGE_COLUMNS = ("prompt", "chosen", "rejected")


def _csv_cell(column: str, value: str) -> Any:
    stripped = value.lstrip()
    if column in _MESSAGE_COLUMNS and stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            if stripped.startswith("[{"):
                raise DataRowError(
                    f"{column} looks like a JSON message list but does not parse", value
                ) from None
            return value
        return parsed if isinstance(parsed, list) else value
    if column in ("meta",) and stripped.startswith("{"):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def _header_is_text(data: bytes) -> bool:
    """Whether a CSV's first line is text: no NUL, valid UTF-8 (a BOM is fine).

    Binary files (images, archives, UTF-16 text) fail here. A NUL or a non-UTF-8 byte further down is
    one bad row for validate_rows to quarantine, not a reason to refuse the file.
    """
    header = data[:BINARY_SNIFF_BYTES].split(b"\n", 1)[0]
    if b"\x00" in header:
        return False
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A header longer than the sniffed bytes may end inside a multi-byte character.
        return len(header) == BINARY_SNIFF_BYTES and exc.start >= BINARY_SNIFF_BYTES - 3
    return True


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = _read_bytes(path)
    if not _header_is_text(data):
        raise DataFileError(f"{path.name}: not a CSV text file (its header line holds NUL bytes or bytes that are not UTF-8)")
    # surrogateescape keeps a bad byte local to its row; validate_rows then quarantines that row.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long texts are judged by max_chars, not by the csv module
    # (first line of the record, record): a quoted field may span lines, so a record starts on the line
    # after the one its predecessor ended on.
    records: list[tuple[int, list[str]]] = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        ended = 0
        for record in reader:
            records.append((ended + 1, record))
            ended = reader.line_num
    except csv.Error as exc:
        raise DataFileError(f"{path.name}: unreadable CSV ({exc})") from exc
    finally:
        csv.field_size_limit(old_limit)
    header_at = next((i for i, (_, record) in enumerate(records) if record), None)
    if header_at is None:
        yield from ((line, BLANK_LINE) for line, _ in records)
        return
    header = records[header_at][1]
    if any("\udc80" <= ch <= "\udcff" for name in header for ch in name):
        raise DataFileError(f"{path.name}: CSV header is not UTF-8 text")
    for line, _record in records[:header_at]:
        yield line, BLANK_LINE
    for line, record in records[header_at + 1 :]:
        if not record:
            yield line, BLANK_LINE
        elif len(record) != len(header):
            yield line, DataRowError(f"expected {len(header)} fields, got {len(record)}", ",".join(record))
        else:
            try:
                yield line, {col: _csv_cell(col, val) for col, val in zip(header, record, strict=True)}
            except DataRowError as exc:
                yield line, exc


def _looks_like_hub_id(source: str) -> bool:
    lowered = source.lower()
    return bool(_HUB_ID.match(source)) and not lowered.endswith((*JSON_SUFFIXES, ".parquet", ".csv"))


def _dataset_rows(source: str, split: str, *, local: bool) -> list[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:
        if not local:
            raise  # hub errors (offline, not found, gated) already say what went wrong
        raise DataFileError(
            f"{Path(source).name}: datasets.load_dataset failed ({type(exc).__name__}: {exc})"
        ) from exc
    return list(enumerate(ds, start=1))


def load_preferences(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    max_chars: int = 20_000,
    chat_template: ChatTemplate | None = None,
    source_name: str | None = None,
) -> LoadResult:
    """Load preference pairs from a file, a local dataset folder or a Hugging Face hub id."""
    path = Path(source)
    lowered = path.name.lower()
    rows: Iterable[tuple[int, Any]]
    if path.is_file():
        name = source_name or path.name
        if lowered.endswith(JSON_SUFFIXES):
            rows = _json_rows(path)
        elif lowered.endswith(".parquet"):
            rows = _parquet_rows(path)
        elif lowered.endswith(".csv"):
            rows = _csv_rows(path)
        else:
            raise DataFileError(
                f"{path.name}: unsupported file type; expected one of "
                f"{', '.join((*JSON_SUFFIXES, '.parquet', '.csv'))} or a dataset folder"
            )
    elif path.is_dir():
        name = source_name or path.name
        rows = _dataset_rows(str(path), split, local=True)
    elif _looks_like_hub_id(str(source)):
        name = source_name or str(source)
        rows = _dataset_rows(str(source), split, local=False)
    else:
        raise FileNotFoundError(
            f"preference data not found: {os.fspath(source)!r} is not an existing path or a hub id"
        )
    return validate_rows(rows, source=name, max_chars=max_chars, chat_template=chat_template)
