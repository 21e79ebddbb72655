"""Reading preference data: JSON lines, JSON arrays, Parquet, CSV, local dataset folders and hub ids.

Each reader yields ``(line_1based, raw)`` and leaves judging the rows to
tidpo_core.data.validation.validate_rows, so a bad row is quarantined where it stands. Only a file that
is not data at all (binary junk, a truncated gzip, unreadable Parquet) fails as a whole, with
DataFileError.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tidpo_core.data.formats import ChatTemplate
from tidpo_core.data.pairs import BLANK_LINE, DataFileError, DataRowError, LoadResult
from tidpo_core.data.validation import validate_rows

__all__ = ["DATA_SUFFIXES", "is_data_file", "load_preferences"]

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DATA_SUFFIXES = (*JSON_SUFFIXES, ".parquet", ".csv")
# Above this share of undecodable lines (and with no line parsed) a file is junk, not data.
JUNK_LINE_SHARE = 0.3
# A CSV whose header line (within these first bytes) is not UTF-8 text is binary, not data.
BINARY_SNIFF_BYTES = 4096
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_data_file(path: Path) -> bool:
    """Whether `path` is a visible file of a type load_preferences reads (how the inbox picks its files)."""
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(DATA_SUFFIXES)


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
    rows = [
        (i, _decode_json_line(line) if line.strip() else BLANK_LINE) for i, line in enumerate(lines, start=1)
    ]
    failures = [raw for _, raw in rows if isinstance(raw, DataRowError)]
    data_lines = sum(1 for _, raw in rows if raw is not BLANK_LINE)
    undecodable = sum(1 for err in failures if err.detail.startswith("invalid UTF-8"))
    if (
        data_lines
        and len(failures) == data_lines
        and (undecodable > JUNK_LINE_SHARE * data_lines or b"\x00" in data)
    ):
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
        raise DataFileError(
            f"{path.name}: not a CSV text file (its header line holds NUL bytes or bytes that are not UTF-8)"
        )
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
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(DATA_SUFFIXES)


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
                f"{', '.join(DATA_SUFFIXES)} or a dataset folder"
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
