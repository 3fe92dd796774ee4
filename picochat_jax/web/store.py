"""What the workbench shows, read from the runs' and packs' own files: pure functions over two roots.

Every path a request names goes through `inside`, which resolves it (symlinks included) and refuses anything
that lands outside its root, so `..`, absolute paths and links out of the root never reach a file read.

    runs = list_runs(Path("runs"))                 # one row per run folder (run tiny, hf-sft, hf-dpo)
    detail = run_detail(Path("runs"), "tiny")      # stages, curves, preflight, fit, eval, honesty, gate, files
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from picochat_jax.fileio import read_json_object, read_jsonl_objects
from picochat_jax.outdir import MARKER

RUN_KINDS = ("run", "hf-sft", "hf-dpo")
RUN_STAGES = ("base", "sft", "dpo")
STATUS_FILE = "run_status.json"  # written by `run tiny` (pipeline.py): running / completed / failed / interrupted
CURVE_KEYS = ("loss", "val_loss", "bpb", "val_bpb", "lr", "tokens_per_sec", "mfu", "grad_norm")
MAX_EVIDENCE_BYTES = 8 << 20  # larger files are listed but not served inline
STALE_SEC = 600.0  # a run whose files have not moved for this long, with no live process known, is not running


class NotFound(LookupError):
    """A run, pack, file or model the request names does not exist (or is outside the roots)."""


def inside(root: Path, rel: str) -> Path:
    """`root / rel` resolved, or NotFound when it escapes `root` (`..`, absolute paths, symlinks out)."""
    if not rel or "\x00" in rel or rel.startswith(("/", "\\")):
        raise NotFound(rel)
    base = root.resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise NotFound(rel)
    return path


def _json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return {}


def read_metrics(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Rows of a metrics.jsonl from byte `start` (whole lines only) and the offset to continue from: a run
    still writing its last line leaves it for the next read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return [], start
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({k: v for k, v in row.items() if k == "step" or k in CURVE_KEYS or k.startswith("val_")})
    return rows, start + end


def run_kind(run_dir: Path) -> str | None:
    kind = _json(run_dir / MARKER).get("kind")
    return kind if kind in RUN_KINDS else None


def discover_runs(root: Path) -> list[Path]:
    """Run folders (a picochat marker of a run kind) directly under `root` or one folder deeper."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if run_kind(child):
            found.append(child)
            continue
        for grandchild in sorted(child.iterdir()) if os.access(child, os.R_OK) else []:
            if grandchild.is_dir() and run_kind(grandchild):
                found.append(grandchild)
    return found


def metric_files(run_dir: Path) -> dict[str, Path]:
    """Stage name -> metrics.jsonl of that stage."""
    if run_kind(run_dir) == "run":
        return {s: run_dir / s / "metrics.jsonl" for s in RUN_STAGES if (run_dir / s / "metrics.jsonl").is_file()}
    return {"train": run_dir / "metrics.jsonl"} if (run_dir / "metrics.jsonl").is_file() else {}


def _pid_alive(pid: Any, host: Any) -> bool | None:
    """Whether `pid` on `host` is alive; None when it cannot be known from here (another host)."""
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_write(run_dir: Path) -> float:
    files = [run_dir / MARKER, *metric_files(run_dir).values(), run_dir / STATUS_FILE]
    return max((p.stat().st_mtime for p in files if p.exists()), default=0.0)


def run_status(run_dir: Path) -> str:
    """running / finished / failed / interrupted, from the run's own files."""
    kind = run_kind(run_dir)
    if kind == "run":
        if _json(run_dir / "summary.json").get("status") == "completed":
            return "finished"
        status = _json(run_dir / STATUS_FILE)
        state = status.get("status")
        if state in ("failed", "interrupted"):
            return state
        if state == "running":
            alive = _pid_alive(status.get("pid"), status.get("host"))
            if alive is False:
                return "failed"  # the process is gone without saying how it ended
            if alive or time.time() - _last_write(run_dir) < STALE_SEC:
                return "running"
            return "failed"
    else:
        report = _json(run_dir / f"{kind.replace('-', '_')}_report.json")
        if report.get("status") == "completed":
            return "finished"
        for name in ("done.txt", "progress.json"):
            state = _json(run_dir / name).get("status")
            if state in ("failed", "interrupted"):
                return state
    return "running" if time.time() - _last_write(run_dir) < STALE_SEC else "interrupted"


def _stage_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    summary = _json(run_dir / "summary.json")
    out = {}
    for stage, path in metric_files(run_dir).items():
        info = dict(summary.get(stage) or {}) if stage in RUN_STAGES else {}
        if not info:
            info = _json(run_dir / stage / "summary.json") if stage in RUN_STAGES else {}
        if not info.get("final_loss"):
            rows, _ = read_metrics(path)
            losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
            info.setdefault("final_loss", losses[-1] if losses else None)
            info.setdefault("steps", rows[-1]["step"] if rows else 0)
        out[stage] = info
    return out


def run_row(root: Path, run_dir: Path) -> dict[str, Any]:
    """One line of the runs table."""
    kind = run_kind(run_dir) or "?"
    summary = _json(run_dir / "summary.json")
    config = _json(run_dir / "run_config.json")
    gate = _json(run_dir / "release" / "gate.json")
    stages = _stage_rows(run_dir)
    report = _json(run_dir / f"{kind.replace('-', '_')}_report.json") if kind != "run" else {}
    tokens = sum(int(s.get("tokens_seen") or 0) for s in stages.values())
    scale = summary.get("scale") or (config.get("config") or {}).get("name") or report.get("family")
    return {
        "name": run_dir.relative_to(root.resolve()).as_posix() if run_dir.is_absolute() else run_dir.name,
        "kind": kind, "scale": scale, "status": run_status(run_dir),
        "verdict": gate.get("decision"),
        "wall_sec": summary.get("wall_sec") or report.get("wall_sec"),
        "tokens": tokens or None,
        "base_loss": (stages.get("base") or {}).get("final_loss"),
        "sft_loss": (stages.get("sft") or {}).get("final_loss") or report.get("final_train_loss"),
        "val_loss": (stages.get("sft") or {}).get("final_val_loss") or report.get("best_val_loss"),
        "started": _json(run_dir / MARKER).get("created"),
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    base = root.resolve()
    return [run_row(base, d.resolve()) for d in discover_runs(base)]


def resolve_run(root: Path, name: str) -> Path:
    run_dir = inside(root, name)
    if not run_dir.is_dir() or run_kind(run_dir) is None:
        raise NotFound(name)
    return run_dir


def evidence_files(run_dir: Path) -> list[dict[str, Any]]:
    """Every evidence file of a run (checkpoints, resume state and token shards left out)."""
    skip = ("checkpoint", "best_checkpoint", "resume_checkpoint", "tokens", "final_model", "best_model",
            "final_adapter", "best_adapter")
    out = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and not any(part in skip for part in rel.parts[:-1]) and not path.is_symlink():
            out.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
    return out


def run_detail(root: Path, name: str) -> dict[str, Any]:
    """Everything the run page shows."""
    run_dir = resolve_run(root, name)
    kind = run_kind(run_dir)
    eval_rows = read_jsonl_objects(run_dir / "eval" / "eval_results.jsonl")
    summary = _json(run_dir / "summary.json")
    card = run_dir / "release" / "release_card.md"
    return {
        "row": run_row(root.resolve(), run_dir), "kind": kind,
        "stage_sec": summary.get("stage_sec") or {},
        "stages": _stage_rows(run_dir),
        "curves": {stage: read_metrics(path)[0] for stage, path in metric_files(run_dir).items()},
        "preflight": _json(run_dir / "preflight.json"),
        "fit": _json(run_dir / "sft_fit" / "fit_report.json"),
        "fit_heldout": _json(run_dir / "sft_fit" / "heldout" / "fit_report.json"),
        "eval": _json(run_dir / "eval" / "eval_report.json"), "eval_rows": eval_rows,
        "honesty": _json(run_dir / "honesty" / "honesty_report.json"),
        "gate": _json(run_dir / "release" / "gate.json"),
        "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None,
        "report": _json(run_dir / f"{kind.replace('-', '_')}_report.json") if kind != "run" else {},
        "files": evidence_files(run_dir),
    }


# ------------------------------------------------------------------------------------------------ models


def list_models(root: Path) -> list[dict[str, str]]:
    """Chat-able models under the runs root: native checkpoints (with the run's tokenizer) and HF folders."""
    out = []
    for run_dir in discover_runs(root.resolve()):
        rel = run_dir.relative_to(root.resolve()).as_posix()
        if run_kind(run_dir) == "run":
            for stage in ("dpo", "sft", "base"):
                if (run_dir / stage / "checkpoint").is_dir() and (run_dir / "tokenizer.json").is_file():
                    out.append({"id": f"{rel}/{stage}", "kind": "native", "label": f"{rel} · {stage} checkpoint"})
        else:
            for folder in ("best_model", "final_model"):
                if (run_dir / folder / "config.json").is_file():
                    out.append({"id": f"{rel}/{folder}", "kind": "hf", "label": f"{rel} · {folder}"})
    return out


def model_source(root: Path, model_id: str) -> dict[str, Path]:
    """load_backend arguments for a model id of `list_models` (anything else is NotFound)."""
    known = {m["id"]: m for m in list_models(root)}
    if model_id not in known:
        raise NotFound(model_id)
    run_rel, _, leaf = model_id.rpartition("/")
    run_dir = inside(root, run_rel)
    if known[model_id]["kind"] == "native":
        return {"checkpoint": run_dir / leaf / "checkpoint", "tokenizer": run_dir / "tokenizer.json"}
    return {"hf_model": run_dir / leaf}


# ------------------------------------------------------------------------------------------------- packs


def list_packs(root: Path) -> list[dict[str, Any]]:
    """Dataset packs under `root` (at most three folders deep): files named dataset_pack.json or, as the
    original picochat names them, *_dataset_pack.json."""
    base = root.resolve()
    out = []
    if not base.is_dir():
        return out
    found = []
    for folder, dirs, files in os.walk(base):
        depth = len(Path(folder).relative_to(base).parts)
        # Hidden folders (.venv, .git) and anything deeper than three levels are never walked into.
        dirs[:] = [] if depth >= 3 else sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files if f == "dataset_pack.json" or f.endswith("_dataset_pack.json")]
    for path in sorted(found):
        rel = path.relative_to(base)
        meta = _json(path)
        out.append({"path": rel.as_posix(), "name": meta.get("name") or rel.parent.name,
                    "description": meta.get("description")})
    return out


def is_pack_file(path: Path) -> bool:
    return path.is_file() and (path.name == "dataset_pack.json" or path.name.endswith("_dataset_pack.json"))


def pack_detail(root: Path, rel: str, scale: str = "pico", preview_rows: int = 5) -> dict[str, Any]:
    """Files, counts, validation errors (file:line), readiness and a preview of a pack's rows."""
    from picochat_jax.data.inspect import inspect_pack
    from picochat_jax.data.pack import load_pack, validate_pack

    path = inside(root, rel)
    if not is_pack_file(path):
        raise NotFound(rel)
    summary, errors = validate_pack(path)
    detail: dict[str, Any] = {"path": rel, "summary": summary, "errors": errors, "files": [], "preview": {},
                              "inspect": None, "inspect_error": None}
    try:
        pack = load_pack(path)
    except Exception as exc:  # shown on the page: the pack is what is being checked
        detail["inspect_error"] = str(exc)
        return detail
    for key in ("chat", "eval", "preferences", "external_eval"):
        file = getattr(pack, key, None)
        if file is not None and Path(file).is_file():
            detail["files"].append({"role": key, "path": str(Path(file).relative_to(path.parent))
                                    if path.parent in Path(file).resolve().parents else str(file),
                                    "bytes": Path(file).stat().st_size})
            with open(file, encoding="utf-8", errors="replace") as fh:
                detail["preview"][key] = [line.rstrip("\n") for _, line in zip(range(preview_rows), fh, strict=False)]
    try:
        detail["inspect"] = inspect_pack(path, scale)
    except Exception as exc:  # a pack that cannot be read still shows its validation errors
        detail["inspect_error"] = str(exc)
    return detail
