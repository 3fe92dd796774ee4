"""Text helpers every evaluation shares: the one normaliser the scoring rules and the contamination scan compare
in, word splitting, markdown table cells and JSONL results."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picochat_jax.fileio import save_text

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_NON_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)


def normalize(text: str, strip_punctuation: bool = False) -> str:
    """Case-fold, straighten quotes, collapse whitespace: the form the scoring rules compare in. With
    `strip_punctuation` punctuation becomes spaces too, so formatting changes do not hide a copied passage
    (the contamination scan's form)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.casefold()
    if strip_punctuation:
        text = _NON_WORD.sub(" ", text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def percent(v: float | None) -> str:
    return number(v, ".1%")


def number(v: Any, spec: str = ".3f") -> str:
    """A figure for a report: formatted with `spec`, or "n/a" when missing (None or NaN)."""
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def md_cell(text: Any, limit: int | None = 120) -> str:
    """A markdown table cell: one line, pipes escaped, cut to `limit` characters (None: whole)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "\u2026"


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    save_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
