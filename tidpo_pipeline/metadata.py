"""How tidpo records things in Dagster's UI and MLflow: markdown tables, lineage tags."""

from typing import Any

import dagster as dg

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


def mlflow_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": context.asset_key.to_user_string(),
        "dagster.job": context.job_name or "",
    }
