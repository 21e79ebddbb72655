"""Reading the benchmarks' local data files (CSV, JSON, JSONL, optionally gzipped) into the rows the
lm-eval task configs use, and the small samples shipped in tidpo_core/evaluation/benchmark_data."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A data file given as "builtin" is the small sample shipped in tidpo_core/evaluation/benchmark_data (see its README).
BUILTIN = "builtin"
BUILTIN_DATA: dict[str, str] = {"truthfulqa": "truthfulqa_sample.csv", "ifeval": "ifeval_sample.jsonl"}


def data_file(key: str, configured: str) -> str:
    """The file a benchmark reads: the configured path, or for "builtin" the packaged sample ("" if none)."""
    if configured.strip().lower() != BUILTIN:
        return configured
    name = BUILTIN_DATA.get(key)
    return str(Path(__file__).parent / "benchmark_data" / name) if name else ""


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _read_json_rows(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from json.loads(stripped)
        return
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)


def _split_answers(cell: str) -> list[str]:
    return [a.strip() for a in (cell or "").split(";") if a.strip()]


def load_truthfulqa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows {question, mc1_targets, mc2_targets} from the TruthfulQA CSV or the hub's MC layout in JSON."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.name.endswith((".csv", ".csv.gz")):
        with _open_text(path) as handle:
            for record in csv.DictReader(handle):
                best = (record.get("Best Answer") or "").strip()
                incorrect = _split_answers(record.get("Incorrect Answers", ""))
                correct = _split_answers(record.get("Correct Answers", ""))
                if best and best not in correct:
                    correct.insert(0, best)
                if not (record.get("Question") and best and incorrect):
                    continue
                rows.append(
                    {
                        "question": record["Question"].strip(),
                        "mc1_targets": {"choices": [best, *incorrect], "labels": [1] + [0] * len(incorrect)},
                        "mc2_targets": {
                            "choices": [*correct, *incorrect],
                            "labels": [1] * len(correct) + [0] * len(incorrect),
                        },
                    }
                )
    else:
        for record in _read_json_rows(path):
            rows.append(
                {
                    "question": record["question"],
                    "mc1_targets": {
                        "choices": list(record["mc1_targets"]["choices"]),
                        "labels": list(record["mc1_targets"]["labels"]),
                    },
                    "mc2_targets": {
                        "choices": list(record["mc2_targets"]["choices"]),
                        "labels": list(record["mc2_targets"]["labels"]),
                    },
                }
            )
    if not rows:
        raise ValueError(f"no TruthfulQA questions read from {path}")
    return rows


def load_ifeval(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows {key, prompt, instruction_id_list, kwargs_json} (kwargs as JSON: their types vary per row)."""
    rows = [
        {
            "key": int(r["key"]),
            "prompt": r["prompt"],
            "instruction_id_list": list(r["instruction_id_list"]),
            "kwargs_json": json.dumps(r.get("kwargs") or [{} for _ in r["instruction_id_list"]]),
        }
        for r in _read_json_rows(Path(path))
    ]
    if not rows:
        raise ValueError(f"no IFEval prompts read from {path}")
    return rows


def load_humaneval(path: str | os.PathLike) -> list[dict[str, Any]]:
    keys = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    rows = [{k: str(r.get(k, "")) for k in keys} for r in _read_json_rows(Path(path))]
    if not rows:
        raise ValueError(f"no HumanEval problems read from {path}")
    return rows
