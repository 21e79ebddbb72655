"""The result of one stress scenario, from which the runner assembles the report and the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """What one scenario found.

    `name` is its section of stress/results.json and `detail` that section's figures; `rows` are its lines
    of the printed table; `passed` says whether every guarantee it checks held; `rows_lost` counts stored
    rows that a crash or a concurrent run lost (the table's last line sums them over the scenarios).
    """

    name: str
    passed: bool
    detail: dict[str, Any]
    rows: list[tuple[str, Any]] = field(default_factory=list)
    rows_lost: int = 0
