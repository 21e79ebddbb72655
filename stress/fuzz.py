"""Generated bad input: files of mixed, partly broken preference rows in every supported format, and
files that are not data at all."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path
from typing import Any

WORDS = "the a answer question model cat paris burn water help please why how two".split()


MB_TEXT = "x" * 1_000_000


def _text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.002:
        return MB_TEXT
    if kind < 0.80:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    return rng.choice(["", "   ", "\n\t", "\u3000", "a\x00b", "\ud800x", "ünïcødé ✓ 你好", "\ufeff", "\r\n"])


def _wrong(rng: random.Random) -> Any:
    return rng.choice([None, 3, 2.5, True, [1, 2], {"k": "v"}, []])


def _row(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.55:  # explicit, maybe with missing / wrong / extra keys, maybe chosen == rejected
        row: dict[str, Any] = {}
        for key in ("prompt", "chosen", "rejected"):
            r = rng.random()
            if r < 0.85:
                row[key] = _text(rng)
            elif r < 0.93:
                row[key] = _wrong(rng)
        if rng.random() < 0.08 and "chosen" in row:
            row["rejected"] = row["chosen"]
        for _ in range(rng.randint(0, 2)):
            row[rng.choice(["id", "score", "meta", "lang", "extra"])] = rng.choice(
                [1, "x", [1, 2], {"a": 1}, None]
            )
        return row
    if kind < 0.75:  # conversational
        shared = [{"role": "user", "content": _text(rng)}]
        row = {
            "chosen": shared + [{"role": "assistant", "content": _text(rng)}],
            "rejected": shared
            + [{"role": rng.choice(["assistant", "user"]), "content": rng.choice([_text(rng), 5])}],
        }
        if rng.random() < 0.3:
            row["prompt"] = rng.choice([_text(rng), shared])
        return row
    if kind < 0.9:  # Anthropic HH transcripts
        human = _text(rng)
        return {
            "chosen": f"\n\nHuman: {human}\n\nAssistant: {_text(rng)}",
            "rejected": f"\n\nHuman: {rng.choice([human, 'other'])}\n\nAssistant: {_text(rng)}",
        }
    return rng.choice([42, "a string", [1, 2], None])


def _line(rng: random.Random, row: Any) -> bytes:
    data = json.dumps(row, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.06 and len(data) > 2:
        return data[: rng.randint(1, len(data) - 1)]  # truncated
    if r < 0.10 and len(data) > 2:
        at = rng.randint(1, len(data) - 1)
        return data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x00"]) + data[at:]
    return data


def fuzz_file(rng: random.Random, directory: Path, index: int) -> tuple[Path, int]:
    """A file of mixed, partly broken rows; returns it and the number of rows it holds."""
    fmt = rng.choice(["jsonl", "jsonl", "jsonl.gz", "json", "csv"])
    rows = [_row(rng) for _ in range(rng.randint(5, 80))]
    if rows and rng.random() < 0.5:
        rows += rng.sample(rows, k=min(len(rows), rng.randint(1, 5)))  # duplicated pairs
    path = directory / f"fuzz_{index:04d}.{fmt}"
    if fmt == "json":
        clean = [r for r in rows if not _has_surrogate(r)]
        path.write_text(json.dumps(clean))
        return path, len(clean)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["prompt", "chosen", "rejected"])
        records = []
        for row in rows:
            if isinstance(row, dict):
                record = [
                    row.get(k) if isinstance(row.get(k), str) else json.dumps(row.get(k))
                    for k in ("prompt", "chosen", "rejected")
                ]
            else:
                record = [json.dumps(row)]
            records.append(record)
        writer.writerows(records)
        path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
        return path, len(records)
    lines = [_line(rng, row) for row in rows]
    if rng.random() < 0.2:
        lines.insert(rng.randint(0, len(lines)), b"   ")
    body = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)
    return path, sum(1 for line in lines if line.strip())


def _has_surrogate(value: Any) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in json.dumps(value, ensure_ascii=False))


def junk_files(directory: Path) -> list[Path]:
    """Files named like data that are not: binary, truncated or fake gzip, an image, UTF-16, broken parquet."""
    rng = random.Random(7)
    files = {
        "binary.jsonl": bytes(rng.randrange(256) for _ in range(4096)) + b"\x00" * 64,
        "truncated.jsonl.gz": gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 500)[:80],
        "not_gzip.jsonl.gz": b"plain text named like gzip",
        "image.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(512)),
        "utf16.csv": "prompt,chosen,rejected\np,a,b\n".encode("utf-16"),
        "broken.parquet": b"PAR1" + bytes(rng.randrange(256) for _ in range(256)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return [directory / name for name in files]
