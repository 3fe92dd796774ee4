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


def read_json_object(path: Path | str) -> dict[str, Any]:
    """A JSON object from disk, or {} when the file is missing, unreadable or not an object (evidence readers
    treat all three as 'no evidence')."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
