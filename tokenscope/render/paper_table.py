"""A table for a paper, before it is written in any format: what every table of render/ builds
(render/tables.py writes it as Markdown, LaTeX or CSV)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PaperTable:
    """Column headers (with units), rows of formatted cells, notes printed under the table."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    wide: bool = False
    """LaTeX: a `table*` spanning both columns of a two-column paper."""
