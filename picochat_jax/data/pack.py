"""Dataset packs, corpus recipes and corpus import (manifest + report).

A pack binds a corpus (a file, a folder, `{"path": ...}` or `{"recipe": ...}`), chat SFT rows, eval rows and
optional preferences. Paths are relative to the file that names them. Unknown keys are kept and reported.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat_jax.data.records import (
    DataError,
    iter_jsonl,
    read_chat_jsonl,
    read_eval_jsonl,
    read_preference_jsonl,
    read_text_file,
)
from picochat_jax.fileio import save_json, save_text

KNOWN_PACK_KEYS = {"name", "description", "corpus", "chat", "eval", "preferences", "external_eval", "sft_eval"}
TEXT_SUFFIXES = {".txt", ".md", ".jsonl", ".parquet"}


@dataclass(frozen=True)
class CorpusSource:
    path: Path
    label: str


@dataclass(frozen=True)
class DatasetPack:
    path: Path
    name: str
    description: str
    sources: tuple[CorpusSource, ...]
    exclude: tuple[str, ...]
    chat: Path | None
    eval: Path | None
    preferences: Path | None
    external_eval: Path | None = None  # benchmark rows in eval JSONL format, scored but never trained on
    extra: dict[str, Any] = field(default_factory=dict)


def _read_json_object(path: Path) -> dict[str, Any]:
    text = read_text_file(path)
    if not text.strip():
        raise DataError(path, None, None, "is empty; expected a JSON object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, None, f"invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(path, None, None, "expected a JSON object at the top level")
    return obj


def _optional_path(obj: dict[str, Any], key: str, root: Path, pack_path: Path) -> Path | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(pack_path, None, key, "must be a path string")
    path = root / value
    if not path.exists():
        raise DataError(pack_path, None, key, f"points to a missing file: {path}")
    return path


def load_recipe(path: Path) -> tuple[list[CorpusSource], list[str]]:
    recipe = _read_json_object(path)
    sources = recipe.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataError(path, None, "sources", "must be a non-empty list")
    out = []
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or not isinstance(src.get("path"), str):
            raise DataError(path, None, f"sources[{i}].path", "is missing or not a string")
        full = path.parent / src["path"]
        if not full.exists():
            raise DataError(path, None, f"sources[{i}].path", f"points to a missing file or folder: {full}")
        out.append(CorpusSource(full, str(src.get("label", Path(src["path"]).stem))))
    exclude = recipe.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise DataError(path, None, "exclude", "must be a list of glob strings")
    return out, exclude


def load_pack(path: str | Path) -> DatasetPack:
    path = Path(path)
    obj = _read_json_object(path)
    root = path.parent
    corpus = obj.get("corpus")
    exclude: list[str] = []
    if corpus is None:
        raise DataError(path, None, "corpus", "is missing")
    if isinstance(corpus, str):
        corpus = {"path": corpus}
    if not isinstance(corpus, dict):
        raise DataError(path, None, "corpus", "must be a path string or an object with 'recipe' or 'path'")
    if "recipe" in corpus:
        recipe_path = root / str(corpus["recipe"])
        if not recipe_path.exists():
            raise DataError(path, None, "corpus.recipe", f"points to a missing file: {recipe_path}")
        sources, exclude = load_recipe(recipe_path)
    elif "path" in corpus:
        full = root / str(corpus["path"])
        if not full.exists():
            raise DataError(path, None, "corpus.path", f"points to a missing file or folder: {full}")
        sources = [CorpusSource(full, str(corpus.get("label", full.stem)))]
    else:
        raise DataError(path, None, "corpus", "needs a 'recipe' or a 'path'")
    return DatasetPack(
        path=path,
        name=str(obj.get("name", path.stem)),
        description=str(obj.get("description", "")),
        sources=tuple(sources),
        exclude=tuple(exclude),
        chat=_optional_path(obj, "chat", root, path),
        eval=_optional_path(obj, "eval", root, path),
        preferences=_optional_path(obj, "preferences", root, path),
        external_eval=_optional_path(obj, "external_eval", root, path),
        extra={k: v for k, v in obj.items() if k not in KNOWN_PACK_KEYS},
    )


def _excluded(path: Path, base: Path, patterns: tuple[str, ...]) -> bool:
    rel = path.relative_to(base).as_posix() if path != base else path.name
    # "**/x" should also match "x" at the top of the walked folder.
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch("./" + rel, p) or fnmatch.fnmatch(path.name, p.split("/")[-1])
               for p in patterns)


def source_files(pack: DatasetPack) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Files to import (sorted, per source) and the files the exclude globs removed."""
    files, skipped = [], []
    for src in pack.sources:
        if src.path.is_dir():
            for f in sorted(p for p in src.path.rglob("*") if p.is_file()):
                if _excluded(f, src.path, pack.exclude) or f.suffix not in TEXT_SUFFIXES:
                    skipped.append(f)
                else:
                    files.append((f, src.label))
        else:
            files.append((src.path, src.label))
    return files, skipped


def read_documents(path: Path) -> list[str]:
    """A .txt/.md file is one document; .jsonl rows give their `text`; .parquet rows their `text` column."""
    if path.suffix in (".txt", ".md"):
        return [read_text_file(path)]
    if path.suffix == ".jsonl":
        docs = []
        for line, obj in iter_jsonl(path, max_row_bytes=None):  # documents may be long; they are windowed
            text = obj.get("text")
            if not isinstance(text, str):
                raise DataError(path, line, "text", "is missing or not a string")
            docs.append(text)
        return docs
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=["text"])
        return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    raise DataError(path, None, None, f"unsupported corpus file type {path.suffix!r} (use .txt, .md, .jsonl, .parquet)")


@dataclass
class Corpus:
    documents: list[str]
    labels: list[str]
    manifest: dict[str, Any]


def load_corpus(pack: DatasetPack) -> Corpus:
    files, skipped = source_files(pack)
    if not files:
        raise DataError(pack.path, None, "corpus", "no corpus files found after applying exclude globs")
    docs, labels, entries = [], [], []
    for f, label in files:
        raw = f.read_bytes()
        file_docs = [d for d in read_documents(f) if d.strip()]
        if not file_docs:
            raise DataError(f, None, None, "is empty: a corpus file needs some text (remove it or exclude it)")
        docs.extend(file_docs)
        labels.extend([label] * len(file_docs))
        entries.append({"path": str(f), "label": label, "bytes": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest(), "documents": len(file_docs)})
    manifest = {
        "pack": pack.name,
        "files": entries,
        "excluded": [str(p) for p in skipped],
        "exclude_globs": list(pack.exclude),
        "total_files": len(entries),
        "total_bytes": sum(e["bytes"] for e in entries),
        "total_documents": len(docs),
        "labels": dict(collections.Counter(labels)),
    }
    return Corpus(docs, labels, manifest)


def corpus_stats(corpus: Corpus) -> dict[str, Any]:
    text_bytes = [len(d.encode("utf-8")) for d in corpus.documents]
    words = [w.lower() for d in corpus.documents for w in re.findall(r"[A-Za-z']+", d)]
    counts = collections.Counter(words)
    non_ascii = sum(sum(1 for ch in d if ord(ch) > 127) for d in corpus.documents)
    total_chars = sum(len(d) for d in corpus.documents)
    dupes = len(corpus.documents) - len(set(corpus.documents))
    return {
        "documents": len(corpus.documents),
        "bytes": sum(text_bytes),
        "chars": total_chars,
        "words": len(words),
        "unique_words": len(counts),
        "mean_document_bytes": (sum(text_bytes) / len(text_bytes)) if text_bytes else 0,
        "duplicate_documents": dupes,
        "non_ascii_fraction": non_ascii / max(1, total_chars),
        "top_words": counts.most_common(20),
    }


def pack_inputs(pack: DatasetPack) -> list[Path]:
    """Every file and folder a pack reads: what `--overwrite` must never delete."""
    return [pack.path, *(s.path for s in pack.sources),
            *(p for p in (pack.chat, pack.eval, pack.preferences, pack.external_eval) if p is not None)]


def import_corpus(pack: DatasetPack, out_dir: Path) -> Corpus:
    """Write corpus_manifest.json and corpus_report.md under out_dir; return the documents."""
    corpus = load_corpus(pack)
    write_corpus_report(corpus, pack, out_dir)
    return corpus


def write_corpus_report(corpus: Corpus, pack: DatasetPack, out_dir: Path) -> None:
    """corpus_manifest.json and corpus_report.md for a loaded corpus."""
    stats = corpus_stats(corpus)
    corpus.manifest["stats"] = {k: v for k, v in stats.items() if k != "top_words"}
    save_json(out_dir / "corpus_manifest.json", corpus.manifest)
    lines = [
        f"# Corpus report: {pack.name}",
        "",
        f"- files: {corpus.manifest['total_files']} ({len(corpus.manifest['excluded'])} excluded by globs)",
        f"- documents: {stats['documents']} ({stats['duplicate_documents']} exact duplicates)",
        (f"- bytes: {stats['bytes']:,}  chars: {stats['chars']:,}  words: {stats['words']:,}"
        f"  unique words: {stats['unique_words']:,}"),
        (f"- mean document size: {stats['mean_document_bytes']:.0f} bytes; non-ASCII chars: "
        f"{100 * stats['non_ascii_fraction']:.2f}%"),
        "",
        "| file | label | bytes | documents | sha256 |",
        "|---|---|---:|---:|---|",
        *[f"| {Path(e['path']).name} | {e['label']} | {e['bytes']:,} | {e['documents']} | {e['sha256'][:12]} |"
          for e in corpus.manifest["files"]],
        "",
        "Most frequent words: " + ", ".join(f"{w} ({c})" for w, c in stats["top_words"]),
        "",
    ]
    save_text(out_dir / "corpus_report.md", "\n".join(lines))


ERRORS_PER_FILE = 20  # `data validate` lists this many errors of one file, then counts the rest


def _listed(errors: list[DataError]) -> list[str]:
    """Every error, at most ERRORS_PER_FILE per file, each file's overflow as one counted line."""
    by_file: dict[str, list[DataError]] = collections.defaultdict(list)
    for e in errors:
        by_file[e.path].append(e)
    out = []
    for path, errs in by_file.items():
        out += [str(e) for e in errs[:ERRORS_PER_FILE]]
        if len(errs) > ERRORS_PER_FILE:
            out.append(f"{path}: ... and {len(errs) - ERRORS_PER_FILE} more errors in this file")
    return out


def validate_pack(path: str | Path, max_row_bytes: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read every file of a pack and report every error (file, line, field), not just the first of each file.
    Returns (summary, errors)."""
    errors: list[str] = []
    summary: dict[str, Any] = {}
    try:
        pack = load_pack(path)
    except (DataError, FileNotFoundError) as exc:
        return summary, [str(exc)]
    summary["name"] = pack.name
    if pack.extra:
        summary["unknown_keys"] = sorted(pack.extra)
    try:
        corpus = load_corpus(pack)
        summary["corpus"] = {"files": corpus.manifest["total_files"], "bytes": corpus.manifest["total_bytes"],
                             "documents": corpus.manifest["total_documents"],
                             "excluded": len(corpus.manifest["excluded"])}
    except (DataError, FileNotFoundError, RuntimeError) as exc:
        errors.append(str(exc))
    if pack.chat is None:
        errors.append(f"{pack.path}: field 'chat' is missing (SFT rows are required)")
    for key, reader in (("chat", read_chat_jsonl), ("eval", read_eval_jsonl), ("preferences", read_preference_jsonl),
                        ("external_eval", read_eval_jsonl)):
        file = getattr(pack, key)
        if file is None:
            continue
        row_errors: list[DataError] = []
        try:
            rows = reader(file, max_row_bytes, row_errors)
        except (DataError, FileNotFoundError) as exc:
            errors.append(str(exc))
            continue
        errors += _listed(row_errors)
        if row_errors:
            continue
        if key == "chat":
            summary["chat"] = {
                "rows": len(rows),
                "multi_turn": sum(1 for r in rows if sum(m.role == "assistant" for m in r.messages) > 1),
                "with_system": sum(1 for r in rows if r.messages[0].role == "system"),
                "categories": dict(collections.Counter(r.category for r in rows)),
            }
        elif key == "preferences":
            summary["preferences"] = {"rows": len(rows)}
        else:
            summary[key] = {"rows": len(rows), "categories": dict(collections.Counter(r.category for r in rows))}
    return summary, errors
