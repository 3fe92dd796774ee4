"""Atomic file writes: a crash or SIGTERM never leaves a half-written output behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path | str, payload: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def save_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
