"""Run management: bundles (one checksummed archive of a run's model and evidence), comparison of runs, and a
SQLite registry of released runs.

    bundle_run(RUN, RUN.tgz)          model + tokenizer + evidence + bundle_manifest.json (sha256 of every file)
    inspect_bundle(RUN.tgz)           re-hashes every member against the manifest, returns the release card
    compare_runs([RUN, ...])          one markdown table (with differences to the first run) + loss curves PNG
    Registry(PATH).add/list/show      released runs with their gate verdict and card
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

from picochat_jax.fileio import read_json_object, read_jsonl_objects, save_text, sha256_file
from picochat_jax.markdown import number

BUNDLE_FORMAT = "picochat-bundle/1"
# Evidence a bundle carries (whatever of it exists); resume checkpoints and token shards stay behind.
EVIDENCE_FILES = ("summary.json", "summary.md", "run_config.json", "preflight.json", "preflight.md",
                  "corpus_manifest.json", "corpus_report.md", "report.md", "loss_curves.png", "tokenizer.json",
                  "hf_sft_report.json", "tokens/manifest.json", "tokens/holdout.jsonl")
EVIDENCE_DIRS = ("sft_fit", "eval", "external_eval", "honesty", "release")
STAGES = ("base", "sft", "dpo")


def bundle_files(run_dir: Path) -> list[str]:
    """Relative paths of what a bundle of this run holds: the gated model folder, evidence, stage metrics."""
    gate = read_json_object(run_dir / "release" / "gate.json")
    model = gate.get("model") or read_json_object(run_dir / "summary.json").get("candidate")
    if not model or not (run_dir / model).is_dir():
        raise ValueError(f"{run_dir}: no gated model to bundle (run `picochat gate {run_dir}` first)")
    rels: set[str] = set()
    for base in (model, *EVIDENCE_DIRS):
        for path in (run_dir / base).rglob("*"):
            if path.is_file():
                rels.add(path.relative_to(run_dir).as_posix())
    rels |= {f for f in EVIDENCE_FILES if (run_dir / f).is_file()}
    rels |= {f"{s}/{name}" for s in STAGES for name in ("metrics.jsonl", "summary.json")
             if (run_dir / s / name).is_file()}
    return sorted(rels)


def bundle_run(run_dir: Path | str, out_path: Path | str) -> dict[str, Any]:
    """Write OUT (a .tgz that must not exist yet) with the run's model and evidence and a manifest of sha256s.
    Written to a temp name and renamed, so OUT is either complete or absent."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    if out_path.exists():
        raise ValueError(f"{out_path} already exists; choose a new bundle path (nothing is overwritten)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    rels = bundle_files(run_dir)
    gate = read_json_object(run_dir / "release" / "gate.json")
    manifest = {"format": BUNDLE_FORMAT, "run": run_dir.name, "created": dt.datetime.now(dt.timezone.utc)
                .isoformat(timespec="seconds"), "model": gate.get("model"), "decision": gate.get("decision"),
                "profile": (gate.get("profile") or {}).get("name"),
                "files": [{"path": r, "bytes": (run_dir / r).stat().st_size, "sha256": sha256_file(run_dir / r)}
                          for r in rels]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("bundle_manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for r in rels:
                tar.add(run_dir / r, arcname=f"run/{r}", recursive=False)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def inspect_bundle(path: Path | str) -> dict[str, Any]:
    """Verify every member of a bundle against its manifest (without extracting anything). Returns
    {ok, manifest, problems, card}; a changed, missing or unexpected file is a problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bundle not found: {path}")
    problems: list[str] = []
    card = ""
    with tarfile.open(path, "r:gz") as tar:
        member = tar.getmember("bundle_manifest.json") if "bundle_manifest.json" in tar.getnames() else None
        if member is None:
            raise ValueError(f"{path}: not a picochat bundle (no bundle_manifest.json)")
        manifest = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: unknown bundle format {manifest.get('format')!r}")
        expected = {f["path"]: f for f in manifest["files"]}
        seen = set()
        for m in tar.getmembers():
            if m.name == "bundle_manifest.json":
                continue
            rel = m.name.removeprefix("run/")
            if not m.isfile() or rel not in expected:
                problems.append(f"unexpected member {m.name}")
                continue
            seen.add(rel)
            h = hashlib.sha256()
            fh = tar.extractfile(m)
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):  # type: ignore[union-attr]
                h.update(block)
            if h.hexdigest() != expected[rel]["sha256"]:
                problems.append(f"checksum mismatch: {rel}")
            if rel == "release/release_card.md":
                card = tar.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
        problems += [f"missing file: {rel}" for rel in sorted(set(expected) - seen)]
    return {"ok": not problems, "manifest": manifest, "problems": problems, "card": card}


# --------------------------------------------------------------------------------------------- compare


def run_row(run_dir: Path) -> dict[str, Any]:
    summary = read_json_object(run_dir / "summary.json")
    gate = read_json_object(run_dir / "release" / "gate.json")
    ev = read_json_object(run_dir / "eval" / "eval_report.json")
    base, sft = summary.get("base") or {}, summary.get("sft") or {}
    return {"run": run_dir.name, "scale": summary.get("scale"), "params": summary.get("params"),
            "base_final_loss": base.get("final_loss"), "base_val_bpb": base.get("final_val_bpb"),
            "sft_final_loss": sft.get("final_loss"), "sft_val_loss": sft.get("final_val_loss"),
            "eval_pass_rate": ev.get("pass_rate"), "gate": gate.get("decision"), "wall_sec": summary.get("wall_sec")}


NUMERIC = ("params", "base_final_loss", "base_val_bpb", "sft_final_loss", "sft_val_loss", "eval_pass_rate",
           "wall_sec")


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(markdown table, rows). The first run is the reference: other runs show their difference to it. With
    `out_dir`, also writes compare.md and compare.png (base and SFT loss curves of every run, overlaid)."""
    rows = []
    for d in run_dirs:
        if not (d / "summary.json").exists():
            raise FileNotFoundError(f"{d / 'summary.json'} not found: not a finished `run tiny` folder")
        rows.append(run_row(d))
    ref = rows[0]
    cols = ["run", "scale", *NUMERIC, "gate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("run", "scale", "gate") else "---:"
                                                         for c in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in NUMERIC and r is not ref and isinstance(v, (int, float)) and isinstance(ref.get(c), (int, float)):
                fmt = ",.0f" if c in ("params", "wall_sec") else ".4f"
                cells.append(f"{number(v, fmt)} ({number(v - ref[c], '+' + fmt)})")
            elif c in NUMERIC:
                cells.append(number(v, ",.0f" if c in ("params", "wall_sec") else ".4f"))
            else:
                cells.append(str(v if v is not None else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _curves(run_dirs, out_dir / "compare.png")
        save_text(out_dir / "compare.md", f"# Run comparison\n\nReference: `{ref['run']}` (differences in "
                                          f"parentheses).\n\n{table}\n![loss curves](compare.png)\n")
    return table, rows


def _curves(run_dirs: list[Path], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, ("base", "sft"), strict=True):
        for d in run_dirs:
            rows = read_jsonl_objects(d / stage / "metrics.jsonl")
            train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if train:
                line, = ax.plot(*zip(*train, strict=True), label=f"{d.name} train")
                if val:
                    ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), label=f"{d.name} val")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- registry


def default_registry_path() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "picochat" / "registry.sqlite"


class Registry:
    """Released runs: name, path, kind, gate decision and profile, model, when added, summary and release card."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_registry_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS runs (name TEXT PRIMARY KEY, path TEXT NOT NULL, kind TEXT, "
                        "decision TEXT, profile TEXT, model TEXT, added TEXT, summary TEXT, card TEXT)")

    def close(self) -> None:
        self.db.close()

    def add(self, run_dir: Path | str, name: str | None = None, allow_blocked: bool = False) -> dict[str, Any]:
        run_dir = Path(run_dir).absolute()
        gate = read_json_object(run_dir / "release" / "gate.json")
        if not gate:
            raise ValueError(f"{run_dir}: no release/gate.json; run `picochat gate {run_dir}` first")
        if gate.get("decision") == "blocked" and not allow_blocked:
            raise ValueError(f"{run_dir}: the gate blocked this run ({', '.join(gate.get('blocking', []))}); "
                             "only released runs are registered (--allow-blocked records it anyway)")
        name = name or run_dir.name
        if self.db.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
            raise ValueError(f"the registry already has a run named {name!r}; pass --name")
        card = (run_dir / "release" / "release_card.md").read_text() if (run_dir / "release" /
                                                                           "release_card.md").exists() else ""
        entry = {"name": name, "path": str(run_dir), "kind": gate.get("kind", "run"), "decision": gate.get("decision"),
                 "profile": (gate.get("profile") or {}).get("name"), "model": gate.get("model"),
                 "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "summary": json.dumps(run_row(run_dir) if (run_dir / "summary.json").exists() else
                                       read_json_object(run_dir / "hf_sft_report.json"), default=str),
                 "card": card}
        with self.db:
            self.db.execute("INSERT INTO runs VALUES (:name, :path, :kind, :decision, :profile, :model, :added, "
                            ":summary, :card)", entry)
        return entry

    def list(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT name, path, kind, decision, profile, model, added FROM runs ORDER BY added")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def show(self, name: str) -> dict[str, Any]:
        cur = self.db.execute("SELECT * FROM runs WHERE name = ?", (name,))
        row = cur.fetchone()
        if row is None:
            raise KeyError(f"no run named {name!r} in {self.path}")
        out = dict(zip([c[0] for c in cur.description], row, strict=True))
        out["summary"] = json.loads(out["summary"] or "{}")
        return out
