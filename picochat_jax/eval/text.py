"""The one text normaliser the eval scoring rules and the contamination scan compare in, and word splitting."""

from __future__ import annotations

import re

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
