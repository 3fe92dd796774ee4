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
from collections.abc import Iterator
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

KNOWN_PACK_KEYS = {"name", "description", "corpus", "chat", "eval", "preferences", "external_eval", "sft_eval",
                   "chat_input", "eval_input"}
PLAIN_TEXT_SUFFIXES = {".txt", ".md", ".text", ".py"}  # one document per file
DOCUMENT_SUFFIXES = {".docx", ".pdf"}  # through python-docx / pypdf (the `documents` extra)
CORPUS_SUFFIXES = PLAIN_TEXT_SUFFIXES | DOCUMENT_SUFFIXES | {".jsonl", ".csv", ".parquet"}
DOCUMENTS_EXTRA = "pip install 'picochat-jax[documents]'"


@dataclass(frozen=True)
class CorpusSource:
    """One corpus source of a pack or recipe: a file or folder, with the original picochat's per-source fields."""

    path: Path
    label: str
    include: bool = True  # false: every file is recorded as skipped, with `reason`
    exclude: tuple[str, ...] = ()  # globs for this source only (the recipe's own apply to every source)
    reason: str = "recipe_excluded"
    base: Path | None = None  # the recipe's folder: globs also match paths relative to it


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


def _optional_path(obj: dict[str, Any], key: str, root: Path, pack_path: Path,
                   alias: str | None = None) -> Path | None:
    """A pack path field (or its original-picochat alias, e.g. chat_input), resolved against the pack's folder."""
    if key not in obj and alias is not None and alias in obj:
        key = alias
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(pack_path, None, key, "must be a non-empty path string")
    path = root / value
    if not path.exists():
        raise DataError(pack_path, None, key, f"points to a missing file: {path}")
    return path


def _recipe_source(src: Any, i: int, path: Path) -> CorpusSource:
    """A recipe source: a path string, or {"path", "label"?, "include"?, "exclude"?, "reason"?}."""
    where = f"sources[{i}]"
    if isinstance(src, str):
        src = {"path": src}
    if not isinstance(src, dict) or not isinstance(src.get("path"), str) or not src["path"].strip():
        raise DataError(path, None, f"{where}.path", "is missing or not a path string")
    label = src.get("label", Path(src["path"]).stem)
    include = src.get("include", True)
    exclude = src.get("exclude", [])
    reason = src.get("reason", "recipe_excluded")
    if not isinstance(label, str):
        raise DataError(path, None, f"{where}.label", "must be a string")
    if not isinstance(include, bool):
        raise DataError(path, None, f"{where}.include", "must be true or false")
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise DataError(path, None, f"{where}.exclude", "must be a list of glob strings")
    if not isinstance(reason, str) or not reason.strip():
        raise DataError(path, None, f"{where}.reason", "must be a non-empty string")
    return CorpusSource(path.parent / src["path"], label, include, tuple(exclude), reason, path.parent)


def load_recipe(path: Path) -> tuple[list[CorpusSource], list[str]]:
    """A corpus recipe (the original picochat's format): its sources and its global exclude globs. A source
    that does not exist is kept and reported as skipped (`missing_source`), as the original does."""
    recipe = _read_json_object(path)
    sources = recipe.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataError(path, None, "sources", "must be a non-empty list")
    out = [_recipe_source(src, i, path) for i, src in enumerate(sources)]
    exclude = recipe.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise DataError(path, None, "exclude", "must be a list of glob strings")
    return out, exclude


def _corpus_sources(corpus: Any, root: Path, path: Path) -> tuple[list[CorpusSource], list[str]]:
    """The pack's `corpus`: a path string, or exactly one of {"recipe"}, {"input"} (the original's) or {"path"}."""
    if isinstance(corpus, str):
        corpus = {"path": corpus}
    if not isinstance(corpus, dict):
        raise DataError(path, None, "corpus", "must be a path string or an object with 'recipe', 'input' or 'path'")
    given = [k for k in ("recipe", "input", "path") if k in corpus]
    if len(given) != 1:
        raise DataError(path, None, "corpus", "needs exactly one of 'recipe', 'input' or 'path'"
                        + (f" (got {', '.join(given)})" if given else ""))
    key = given[0]
    value = corpus[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, None, f"corpus.{key}", "must be a non-empty path string")
    full = root / value
    if not full.exists():
        raise DataError(path, None, f"corpus.{key}", f"points to a missing file or folder: {full}")
    if key == "recipe":
        return load_recipe(full)
    return [CorpusSource(full, str(corpus.get("label", full.stem)))], []


def load_pack(path: str | Path) -> DatasetPack:
    """A dataset pack (ours, or the original picochat's: `corpus.input`, `chat_input`, `eval_input` too), with
    every path resolved against the pack's folder."""
    path = Path(path)
    obj = _read_json_object(path)
    root = path.parent
    corpus = obj.get("corpus")
    if corpus is None:
        raise DataError(path, None, "corpus", "is missing")
    sources, exclude = _corpus_sources(corpus, root, path)
    return DatasetPack(
        path=path,
        name=str(obj.get("name") or path.stem),
        description=str(obj.get("description", "")),
        sources=tuple(sources),
        exclude=tuple(exclude),
        chat=_optional_path(obj, "chat", root, path, alias="chat_input"),
        eval=_optional_path(obj, "eval", root, path, alias="eval_input"),
        preferences=_optional_path(obj, "preferences", root, path),
        external_eval=_optional_path(obj, "external_eval", root, path),
        extra={k: v for k, v in obj.items() if k not in KNOWN_PACK_KEYS},
    )


def _excluded(path: Path, source: CorpusSource, patterns: tuple[str, ...]) -> bool:
    """Whether a glob matches the file: relative to the source folder or the recipe's folder, or its name."""
    rels = [path.relative_to(source.path).as_posix() if path != source.path else path.name]
    if source.base is not None and source.base in path.parents:
        rels.append(path.relative_to(source.base).as_posix())
    # "**/x" should also match "x" at the top of the walked folder.
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch("./" + rel, p) for rel in rels for p in patterns) or \
        any(fnmatch.fnmatch(path.name, p.split("/")[-1]) for p in patterns)


def source_files(pack: DatasetPack) -> tuple[list[tuple[Path, str]], list[dict[str, str]]]:
    """Files to import (sorted, per source) and every file left out, with its label and why (a recipe's
    `include: false` reason, `recipe_excluded`, `missing_source`, `unsupported_extension`)."""
    files: list[tuple[Path, str]] = []
    skipped: list[dict[str, str]] = []

    def skip(f: Path, src: CorpusSource, reason: str) -> None:
        skipped.append({"path": str(f), "label": src.label, "reason": reason})

    for src in pack.sources:
        if not src.path.exists():
            skip(src.path, src, "missing_source")
            continue
        walked = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else [src.path]
        for f in walked:
            if not src.include:
                skip(f, src, src.reason)
            elif src.path.is_dir() and _excluded(f, src, (*pack.exclude, *src.exclude)):
                skip(f, src, "recipe_excluded")
            elif f.suffix.lower() not in CORPUS_SUFFIXES:
                skip(f, src, "unsupported_extension")
            else:
                files.append((f, src.label))
    return files, skipped


def _jsonl_documents(path: Path) -> list[str]:
    """Rows' `text`; a file whose rows have no `text` at all is one raw-text document (the original's reading)."""
    rows = list(iter_jsonl(path, max_row_bytes=None))  # documents may be long; they are windowed
    if rows and not any("text" in obj for _, obj in rows):
        return [read_text_file(path)]
    docs = []
    for line, obj in rows:
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataError(path, line, "text", "is missing or not a string")
        docs.append(text)
    return docs


def _csv_documents(path: Path) -> list[str]:
    """A `text` column's rows; a CSV without one is one raw-text document (the original's reading)."""
    import csv
    import io

    text = read_text_file(path)
    reader = csv.DictReader(io.StringIO(text))
    if "text" not in (reader.fieldnames or []):
        return [text]
    docs = []
    for row in reader:
        value = row.get("text")
        if value is None:
            raise DataError(path, reader.line_num, "text", "is missing in this row")
        docs.append(value)
    return docs


def _docx_text(path: Path) -> str:
    try:
        import docx
    except ImportError:
        raise DataError(path, None, None, f"reading .docx needs python-docx: {DOCUMENTS_EXTRA}") from None
    try:
        document = docx.Document(str(path))
    except Exception as exc:  # python-docx raises several types for a broken file
        raise DataError(path, None, None, f"is not a readable .docx ({type(exc).__name__}: {exc})") from None
    parts = [p.text.strip() for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells if c.text.strip()]
            if cells:
                parts.append(" | ".join(cells))
    return "\n".join(parts)


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise DataError(path, None, None, f"reading .pdf needs pypdf: {DOCUMENTS_EXTRA}") from None
    try:
        pages = [(page.extract_text() or "").strip() for page in PdfReader(str(path)).pages]
    except Exception as exc:  # pypdf raises several types for a broken file
        raise DataError(path, None, None, f"is not a readable .pdf ({type(exc).__name__}: {exc})") from None
    return "\n\n".join(p for p in pages if p)


def read_documents(path: Path) -> list[str]:
    """Documents of one corpus file: .txt/.md/.text/.py whole; .jsonl rows' `text`; .csv a `text` column;
    .parquet a `text` column; .docx paragraphs and tables; .pdf page text."""
    suffix = path.suffix.lower()
    if suffix in PLAIN_TEXT_SUFFIXES:
        return [read_text_file(path)]
    if suffix == ".jsonl":
        return _jsonl_documents(path)
    if suffix == ".csv":
        return _csv_documents(path)
    if suffix == ".docx":
        return [_docx_text(path)]
    if suffix == ".pdf":
        return [_pdf_text(path)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(path, None, None, "reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=["text"])
        return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    raise DataError(path, None, None, f"unsupported corpus file type {path.suffix!r} "
                    f"(use {', '.join(sorted(CORPUS_SUFFIXES))})")


def text_pack(path: Path | str) -> DatasetPack:
    """A pack of corpus text alone (a file or folder), for commands that take text instead of a pack."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file or folder not found: {path}")
    return DatasetPack(path=path, name=path.stem, description="", sources=(CorpusSource(path, path.stem),),
                       exclude=(), chat=None, eval=None, preferences=None)


def load_pack_or_text(path: Path | str) -> DatasetPack:
    """A dataset pack (a .json file), or a corpus file or folder taken as a pack of text alone."""
    path = Path(path)
    return load_pack(path) if path.suffix == ".json" and path.is_file() else text_pack(path)


def iter_documents(pack: DatasetPack) -> Iterator[tuple[str, str]]:
    """(document, label) one file at a time, so a caller can stream a corpus larger than memory."""
    files, _ = source_files(pack)
    for f, label in files:
        for doc in read_documents(f):
            if doc.strip():
                yield doc, label


def corpus_bytes(pack: DatasetPack) -> int:
    """The corpus files' total size on disk, without reading them."""
    return sum(f.stat().st_size for f, _ in source_files(pack)[0])


@dataclass
class Corpus:
    documents: list[str]
    labels: list[str]
    manifest: dict[str, Any]


def load_corpus(pack: DatasetPack) -> Corpus:
    files, skipped = source_files(pack)
    if not files:
        reasons = collections.Counter(x["reason"] for x in skipped)
        raise DataError(pack.path, None, "corpus", "no corpus files to read"
                        + (f" (skipped: {', '.join(f'{n} {r}' for r, n in reasons.items())})" if reasons else ""))
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
        "excluded": [x["path"] for x in skipped],
        "skipped": skipped,  # every file left out, with its label and reason
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
        f"- files: {corpus.manifest['total_files']} ({len(corpus.manifest['excluded'])} left out: "
        + (", ".join(f"{n} {r}" for r, n in
                     collections.Counter(x["reason"] for x in corpus.manifest["skipped"]).items()) or "none") + ")",
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
        if key == "external_eval":
            from picochat_jax.eval.external import is_choice_file, read_choice_questions

            if file.is_file() and is_choice_file(file):
                try:
                    summary[key] = {"file": str(file), "questions": len(read_choice_questions(file))}
                except (DataError, FileNotFoundError, ValueError) as exc:
                    errors.append(str(exc))
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
