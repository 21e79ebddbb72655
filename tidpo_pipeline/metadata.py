"""How tidpo records things in Dagster's UI and MLflow: markdown tables, lineage tags."""

from pathlib import Path
from typing import Any

import dagster as dg

from tidpo_core.batching.chat import readable_prompt
from tidpo_core.evaluation.plots import png_markdown

GROUP = "tidpo"


def markdown_table(rows: list[dict[str, Any]], limit: int = 200) -> str:
    if not rows:
        return "_empty_"
    columns = list(rows[0])

    def cell(value: Any) -> str:
        text = str(value).replace("\n", "⏎").replace("|", "\\|")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def where_they_differ(first: str, second: str, context: int = 30) -> tuple[str, str]:
    """The part of each text that differs from the other, with `context` characters either side: chosen
    and rejected answers often share their first 80 characters, so a plain cut shows them identical."""
    prefix = 0
    while prefix < min(len(first), len(second)) and first[prefix] == second[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(first), len(second)) - prefix and first[-1 - suffix] == second[-1 - suffix]:
        suffix += 1
    start = max(0, prefix - context)

    def excerpt(text: str) -> str:
        end = min(len(text), len(text) - suffix + context)
        return ("…" if start > 0 else "") + text[start:end] + ("…" if end < len(text) else "")

    return excerpt(first), excerpt(second)


def mlflow_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": context.asset_key.to_user_string(),
        "dagster.job": context.job_name or "",
    }


def prompt_cell(prompt: str, limit: int = 120) -> str:
    """A stored prompt (an HH transcript or plain text) as its turns on one line, for a table cell:
    "user: ... / assistant: ... / user: ...". A longer one keeps its end, the turn the answers reply to."""
    text = readable_prompt(prompt).replace("\n", " / ")
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def pairs_preview(rows: list[tuple[str, str, str, str, str]]) -> str:
    """(pair_id, split, prompt, chosen, rejected) rows as a table that shows the prompt's turns and where
    the answers differ."""
    table = []
    for pair_id, split, prompt, chosen, rejected in rows:
        chosen_part, rejected_part = where_they_differ(chosen, rejected)
        table.append(
            {
                "pair_id": pair_id,
                "split": split,
                "prompt": prompt_cell(prompt, 120),
                "chosen (where it differs)": chosen_part,
                "rejected (where it differs)": rejected_part,
            }
        )
    return markdown_table(table, 120)


def quarantine_preview(rows: list[tuple[str, int, str, str]]) -> str:
    return markdown_table(
        [dict(zip(["source", "line (from 1)", "reason", "detail"], r, strict=True)) for r in rows]
    )


def anchors_preview(rows: list[tuple[str, str, str]]) -> str:
    return markdown_table(
        [
            {"pair_id": pair_id, "prompt": prompt_cell(prompt, 80), "anchor": anchor}
            for pair_id, prompt, anchor in rows
        ],
        80,
    )


def picture_metadata(pictures: dict[str, Path]) -> dict[str, dg.MetadataValue]:
    """A PNG shown inline (markdown) plus its path under `<name>_png`; another file (HTML) as a path."""
    out: dict[str, dg.MetadataValue] = {}
    for name, path in pictures.items():
        if path.suffix == ".png":
            out[name] = dg.MetadataValue.md(png_markdown(path, name.replace("_", " ")))
            out[f"{name}_png"] = dg.MetadataValue.path(str(path))
        else:
            out[name] = dg.MetadataValue.path(str(path))
    return out
