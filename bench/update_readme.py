"""Replace the benchmark table of docs/benchmarks.md (between the bench markers) with the latest figures.

    python -m bench.update_readme [--readme docs/benchmarks.md]

Reads bench/results/<name>.json (never the -quick smoke files). If the target file lacks either marker,
it prints a warning and changes nothing. The module keeps its name (and `--readme`) for the callers
that already use it; the table lives in docs/benchmarks.md, not in the README.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench.readme_rows import (
    Row,
    rows_contention,
    rows_grpo,
    rows_hh,
    rows_importance,
    rows_quality,
    rows_scaling,
    rows_training,
    rows_trl,
    rows_weights,
)
from bench.readme_rows_real import rows_real

# The page that holds the table, unless a caller names another file.
DEFAULT_PATH = Path("docs") / "benchmarks.md"

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def load_results(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    directory = directory or common.results_dir()
    out = {}
    for path in sorted(directory.glob("*.json")):
        if path.stem.endswith("-quick"):
            continue
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


RENDERERS: tuple[tuple[str, Callable[[dict[str, Any]], list[Row]]], ...] = (
    ("trl", rows_trl),
    ("weights", rows_weights),
    ("training", rows_training),
    ("scaling", rows_scaling),
    ("importance", rows_importance),
    ("quality", rows_quality),
    ("hh", rows_hh),
    ("real", rows_real),
    ("grpo", rows_grpo),
    ("contention", rows_contention),
)


def render(results: dict[str, dict[str, Any]]) -> str:
    rows: list[Row] = []
    for name, renderer in RENDERERS:
        if name not in results:
            continue
        try:
            rows += renderer(results[name])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            rows.append((name, "", f"(result file not readable: {type(exc).__name__} {exc})", ""))
    if not rows:
        return "_No benchmark results yet: run `make bench`._"
    lines = ["| Benchmark | Figure | Result | Target |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    # Only the files this table shows: gpu.json (another machine) has its own table in the GPU section.
    shown = [results[name] for name, _ in RENDERERS if name in results]
    machine = shown[0].get("machine", {})
    # Files measured on different days may come from different machines: name every CPU.
    cpus = sorted({d.get("machine", {}).get("cpu_model", "?") for d in shown})
    commits = sorted({d.get("commit", "unknown")[:10] for d in shown})
    dates = sorted(d.get("created_at", "")[:10] for d in shown if d.get("created_at"))
    lines.append("")
    lines.append(
        f"Measured on {' and '.join(cpus)}, {machine.get('usable_cores', '?')} cores, "
        f"{common.THREADS} torch threads, torch {machine.get('torch', '?')}, trl {machine.get('trl', '?')}; "
        f"commit {', '.join(commits)}; {dates[0] if dates else '?'}"
        f"{' to ' + dates[-1] if dates and dates[-1] != dates[0] else ''}. "
        "The machine was shared with other work, so absolute times are noisy: compare within a row "
        "(configurations run in interleaved rounds; a ratio is the median over rounds of the per-round ratio, a time the best round). Full figures and notes: `bench/results/*.json`."
    )
    return "\n".join(lines)


def update(readme: Path | None = None, results_directory: Path | None = None) -> bool:
    """Rewrite the block between the markers of `readme` (default: docs/benchmarks.md); False (with a
    warning) if that file is missing or has no markers."""
    readme = readme or common.ROOT / DEFAULT_PATH
    if not readme.exists():
        print(f"warning: {readme} does not exist; benchmark table not written")
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        print(f"warning: {readme} has no '{START}' ... '{END}' markers; benchmark table not written")
        return False
    table = render(load_results(results_directory))
    new = text[: start + len(START)] + "\n" + table + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    print(f"benchmark table refreshed in {readme}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        metavar="PAGE",
        help=f"the Markdown page whose bench markers receive the table (default: {DEFAULT_PATH})",
    )
    args = parser.parse_args(argv)
    update(args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
