"""The report of a stress run: results.json and the printed table, assembled from the scenarios' verdicts."""

from __future__ import annotations

from typing import Any

from stress.verdict import Verdict


def table_rows(verdicts: list[Verdict]) -> list[tuple[str, Any]]:
    """Each scenario's lines in the order they ran, then the rows lost over all of them."""
    rows = [row for verdict in verdicts for row in verdict.rows]
    rows.append(("rows lost", rows_lost(verdicts)))
    return rows


def rows_lost(verdicts: list[Verdict]) -> int:
    return sum(verdict.rows_lost for verdict in verdicts)


def passed(verdicts: list[Verdict]) -> bool:
    """Whether every guarantee held: no row lost and every scenario passed."""
    return rows_lost(verdicts) == 0 and all(verdict.passed for verdict in verdicts)


def assemble(verdicts: list[Verdict], seconds: float) -> dict[str, Any]:
    """The results.json document: a section per scenario, then the totals and the table."""
    report: dict[str, Any] = {verdict.name: verdict.detail for verdict in verdicts}
    report["rows_lost"] = rows_lost(verdicts)
    report["seconds"] = round(seconds, 1)
    report["table"] = [[name, value] for name, value in table_rows(verdicts)]
    return report


def print_table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(r[0]) for r in rows)
    print("\n| check" + " " * (width - 5) + " | result |")
    print("|" + "-" * (width + 2) + "|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
