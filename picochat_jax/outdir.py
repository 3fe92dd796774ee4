"""The one out-dir policy: which folders a command may write into, and the one function that deletes.

A folder is *ours* only when it holds the marker file a picochat command wrote there (`picochat_output.json`,
naming the kind of output). Every command that writes a folder asks `check_out_dir` first — before it writes
its first byte — and only then `claim_out_dir`:

* a new path, or an existing empty folder, is used;
* an existing folder of ours of the same kind needs `--resume` (continue it) or `--overwrite` (replace it);
* a folder that is not ours (no marker, or another kind) is refused, even with `--overwrite`, naming a file in
  it; a regular file is refused;
* `--overwrite` is refused when any input of the command (checkpoint, tokenizer, pack, model) lies inside the
  folder it would empty.

`delete_owned` is the only place that removes a user-visible folder's contents, and it refuses to touch a
folder without our marker.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "picochat_output.json"


class OutDirError(ValueError):
    """An out-dir this command may not use (or not in this way); the message says what to do instead."""


class OutDirInUse(OutDirError):
    """The out-dir holds an earlier output of this command: pass --resume or --overwrite."""


@dataclass(frozen=True)
class OutDirPlan:
    path: Path
    kind: str
    state: str  # "new" | "empty" | "ours"
    action: str  # "create" | "resume" | "overwrite"


def read_marker(folder: Path | str) -> dict[str, Any] | None:
    """The marker of a folder we wrote, or None (no marker, unreadable, or not one of ours)."""
    path = Path(folder) / MARKER
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("kind"), str) else None


def _a_file_in(folder: Path) -> str:
    """The first file (sorted, depth-first) under a folder, to show the user whose folder it is."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if files:
            return str((Path(root) / sorted(files)[0]).relative_to(folder))
    return next((p.name + "/" for p in sorted(folder.iterdir())), "?")


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_out_dir(path: Path | str, kind: str, *, resume: bool = False, overwrite: bool = False,
                  resume_or_start: bool = False, inputs: Iterable[Path | str | None] = (),
                  resumable: bool = True) -> OutDirPlan:
    """Decide what a command may do with `path`, writing nothing. Raises OutDirError with the reason.
    `resumable` says whether the command has a --resume flag (it shapes the advice in the message)."""
    path = Path(path)
    flag_resume = resume or resume_or_start
    if flag_resume and overwrite:
        raise OutDirError("--resume and --overwrite contradict each other; pass one")
    if path.exists() and not path.is_dir():
        raise OutDirError(f"--out-dir {path} is a file, not a folder; choose a new or empty folder")
    if not path.exists() or not any(path.iterdir()):
        state = "new" if not path.exists() else "empty"
        if resume and not resume_or_start:
            why = "it does not exist" if state == "new" else "it is empty"
            raise OutDirError(f"--resume: nothing to resume in {path} ({why}); drop --resume to start, or pass "
                              "--resume-or-start")
        return OutDirPlan(path, kind, state, "create")
    marker = read_marker(path)
    if marker is None:
        raise OutDirError(f"--out-dir {path} is not a picochat output folder (it holds '{_a_file_in(path)}' and no "
                          f"{MARKER}); refusing to write into it, even with --overwrite. Choose a new or empty folder.")
    if marker["kind"] != kind:
        raise OutDirError(f"--out-dir {path} holds a picochat '{marker['kind']}' output, not '{kind}'; refusing to "
                          "write into it, even with --overwrite. Choose a new or empty folder.")
    if overwrite:
        for item in inputs:
            if item is not None and Path(item).exists() and _inside(Path(item), path):
                raise OutDirError(f"--overwrite would delete {item}, an input of this command, which lies inside "
                                  f"{path}; write to another --out-dir")
        return OutDirPlan(path, kind, "ours", "overwrite")
    if flag_resume:
        return OutDirPlan(path, kind, "ours", "resume")
    advice = "pass --resume to continue it or --overwrite to replace it" if resumable else \
        "pass --overwrite to replace it"
    raise OutDirInUse(f"{path} already holds an earlier '{kind}' output; {advice} (or choose another --out-dir)")


def marker_payload(kind: str, **extra: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("picochat-jax")
    except PackageNotFoundError:
        ours = "unknown"
    return {"kind": kind, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "picochat_version": ours, **extra}


def write_marker(folder: Path | str, kind: str, **extra: Any) -> None:
    from picochat_jax.fileio import save_json

    save_json(Path(folder) / MARKER, marker_payload(kind, **extra))


def claim_out_dir(plan: OutDirPlan, **marker_extra: Any) -> Path:
    """Carry out a checked plan: empty an owned folder for --overwrite, create the folder, write the marker."""
    if plan.action == "overwrite":
        delete_owned(plan.path)
    plan.path.mkdir(parents=True, exist_ok=True)
    if plan.action != "resume" or read_marker(plan.path) is None:
        write_marker(plan.path, plan.kind, **marker_extra)
    return plan.path


def delete_owned(folder: Path | str, *, keep_folder: bool = True) -> None:
    """Remove everything in a folder that carries our marker (and the folder itself unless keep_folder).

    The only function that deletes a user-visible folder; it refuses one without our marker, so a bug or a
    wrong path can never take a user's files with it.
    """
    folder = Path(folder)
    if read_marker(folder) is None:
        raise OutDirError(f"refusing to delete {folder}: it holds no {MARKER}, so picochat did not create it")
    for child in sorted(folder.iterdir()):
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if not keep_folder:
        (folder / MARKER).unlink()
        folder.rmdir()


