"""Atomic file writes: a crash or SIGTERM never leaves a half-written output behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
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


def discard_temp(path: Path | str) -> None:
    """Remove one of our own hidden temporary siblings (`.NAME.partial`, `.NAME.old`, `.NAME.xxxx`).

    Only hidden names are accepted, so this can never reach a user's folder; user-visible folders are
    deleted only by `outdir.delete_owned`.
    """
    path = Path(path)
    if not path.name.startswith("."):
        raise ValueError(f"refusing to discard {path}: not a hidden temporary folder")
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: Path | str, directory: Path | str) -> None:
    """Move a finished temporary folder into place over `directory` with renames: a crash at any moment
    leaves the old folder or the new one (or the old one under `.NAME.old`), never half of either."""
    tmp, directory = Path(tmp), Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    discard_temp(old)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    discard_temp(old)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (results files), written atomically."""
    save_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_objects(path: Path | str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file we wrote (evidence files); missing file -> [], unreadable lines skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (shards and corpora can be far larger than memory)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
