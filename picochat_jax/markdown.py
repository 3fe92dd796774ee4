"""Figures and table cells for the markdown reports every stage writes (one formatter, so "n/a", percentages
and escaped cells read the same in each report)."""

from __future__ import annotations

from typing import Any


def number(v: Any, spec: str = ".3f") -> str:
    """A figure for a report: formatted with `spec`, or "n/a" when missing (None or NaN)."""
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def percent(v: float | None) -> str:
    return number(v, ".1%")


def md_cell(text: Any, limit: int | None = 120) -> str:
    """A markdown table cell: one line, pipes escaped, cut to `limit` characters (None: whole)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "\u2026"
