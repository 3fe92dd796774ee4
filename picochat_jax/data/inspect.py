"""Starting and sizing up a dataset pack: `picochat data init-pack DIR` writes a valid skeleton pack to edit,
`picochat data inspect PACK` reports per-source figures and the pack's readiness for a scale (the preflight
checks: tokens per parameter against the scale's plan, eval/SFT overlap, context fit) without training."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

from picochat_jax.data.pack import Corpus, load_corpus, load_pack
from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl, read_preference_jsonl
from picochat_jax.fileio import save_text
from picochat_jax.markdown import md_cell, number
from picochat_jax.outdir import OutDirError

_SKELETON: dict[str, str] = {
    "dataset_pack.json": json.dumps({
        "name": "my-pack", "description": "What this pack teaches, and where its text comes from.",
        "corpus": {"recipe": "corpus_recipe.json"}, "chat": "chat.jsonl", "eval": "eval.jsonl"}, indent=2) + "\n",
    "corpus_recipe.json": json.dumps({
        "exclude": ["**/.DS_Store", "**/draft-*"],
        "sources": [{"path": "corpus", "label": "prose"}]}, indent=2) + "\n",
    "corpus/example.md": (
        "# Replace this file\n\nPut the text the base model should learn from in this folder: .txt, .md, .text, .py,\n"
        ".csv (a text column), .jsonl (a text field), .parquet, .docx or .pdf files. Every file is one or more\n"
        "documents; the corpus manifest records each with its checksum. A real run wants millions of tokens,\n"
        "not a page: `picochat data inspect dataset_pack.json` says how far this pack is from a scale's plan.\n"),
    "chat.jsonl": "".join(json.dumps(r) + "\n" for r in [
        {"user": "What is this pack for?", "assistant": "It is a skeleton: replace these rows with your own.",
         "category": "about"},
        {"system": "Answer in one sentence.", "user": "What does SFT teach?",
         "assistant": "It teaches the model to answer in the style of these rows.", "category": "about"},
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "Say goodbye."}, {"role": "assistant", "content": "Goodbye!"}],
         "category": "greeting"},
    ]),
    "eval.jsonl": "".join(json.dumps(r) + "\n" for r in [
        {"user": "Please greet me.", "must_include_any": [["hello", "hi"]], "category": "greeting"},
        {"user": "What is the capital of a country that does not exist?", "answerable": False,
         "must_not_include": ["the capital is"], "category": "honesty"},
    ]),
    "README.md": (
        "# A picochat dataset pack\n\n"
        "- `dataset_pack.json` binds the files below (paths relative to it).\n"
        "- `corpus_recipe.json` lists the corpus sources (folders or files, with labels and exclude globs).\n"
        "- `corpus/` is the pretraining text.\n"
        "- `chat.jsonl` holds the SFT rows: `user`/`assistant` (plus optional `system`), or `messages`.\n"
        "- `eval.jsonl` holds held-out prompts with `must_include`, `must_include_any`, `must_not_include` rules;\n"
        "  keep them out of `chat.jsonl` and the corpus, or the release gate blocks the run.\n\n"
        "Check it with `picochat data validate dataset_pack.json`, size it with `picochat data inspect\n"
        "dataset_pack.json --scale pico`, train with `picochat run tiny --dataset-pack dataset_pack.json\n"
        "--out-dir runs/mine`. docs/data.md describes every format.\n"),
}


def init_pack(folder: Path | str) -> list[Path]:
    """Write the skeleton pack into a new or empty folder (never into one with files: they would be the user's
    edits). Returns the files written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutDirError(f"{folder} is a file, not a folder; choose a new or empty folder for the pack")
    if folder.exists() and any(folder.iterdir()):
        raise OutDirError(f"{folder} is not empty; init-pack writes only into a new or empty folder")
    written = []
    for name, text in _SKELETON.items():
        save_text(folder / name, text)
        written.append(folder / name)
    return written


_WORD = re.compile(r"[A-Za-z]+")
_COMMON_ENGLISH = frozenset(("the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "as", "with", "was",
                            "on", "be", "by", "this", "are", "or", "from", "at"))


def _source_figures(texts: list[str], bytes_per_token: float) -> dict[str, Any]:
    """Documents, bytes, estimated tokens, duplicates and two cheap text heuristics for one source."""
    sizes = [len(t.encode("utf-8")) for t in texts]
    words = [w.lower() for t in texts for w in _WORD.findall(t)]
    chars = sum(len(t) for t in texts)
    return {
        "documents": len(texts), "bytes": sum(sizes), "estimated_tokens": round(sum(sizes) / bytes_per_token),
        "duplicate_documents": len(texts) - len(set(texts)),
        "short_documents": sum(1 for s in sizes if s < 200),
        "non_ascii_fraction": round(sum(1 for t in texts for ch in t if ord(ch) > 127) / max(chars, 1), 4),
        # The share of the most common English words: near 0 for code, tables or another language.
        "english_function_words": round(sum(w in _COMMON_ENGLISH for w in words) / max(len(words), 1), 4),
    }


def inspect_pack(pack_path: Path | str, scale_name: str = "pico", sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-source figures and readiness for `scale_name` (the preflight report), without writing anything."""
    from picochat_jax.config import load_scale
    from picochat_jax.eval.preflight import bytes_per_token, run_preflight

    scale = load_scale(scale_name, sets)
    pack = load_pack(pack_path)
    corpus: Corpus = load_corpus(pack)
    bpt = bytes_per_token(scale.tokenizer.kind, scale.tokenizer.vocab_size)
    by_label: dict[str, list[str]] = collections.defaultdict(list)
    for doc, label in zip(corpus.documents, corpus.labels, strict=True):
        by_label[label].append(doc)
    conversations = read_chat_jsonl(pack.chat) if pack.chat else []
    eval_rows = read_eval_jsonl(pack.eval) if pack.eval else None
    preferences = read_preference_jsonl(pack.preferences) if pack.preferences else None
    preflight = run_preflight(pack=pack, corpus=corpus, conversations=conversations, eval_rows=eval_rows,
                              scale=scale, base_cfg=scale.base, sft_cfg=scale.sft, mesh=None,
                              eval_max_new_tokens=scale.eval_max_new_tokens, preferences=preferences)
    return {
        "pack": pack.name, "path": str(pack.path), "scale": scale.name,
        "sources": {label: _source_figures(texts, bpt) for label, texts in by_label.items()},
        "total": _source_figures(corpus.documents, bpt),
        "skipped": collections.Counter(x["reason"] for x in corpus.manifest["skipped"]),
        "chat_rows": len(conversations), "eval_rows": len(eval_rows or []),
        "preference_rows": len(preferences or []),
        "readiness": {"status": preflight["status"], "blocking": preflight["blocking"],
                      "warnings": preflight["warnings"], "estimates": preflight["estimates"],
                      "checks": preflight["checks"]},
    }


def inspect_markdown(report: dict[str, Any]) -> str:
    r = report["readiness"]
    lines = [f"# Pack {report['pack']} for scale {report['scale']}", "",
             "| source | documents | bytes | est. tokens | duplicates | short (<200 B) | non-ASCII | English words |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, f in [*report["sources"].items(), ("**total**", report["total"])]:
        lines.append(f"| {md_cell(label)} | {f['documents']:,} | {f['bytes']:,} | {f['estimated_tokens']:,} | "
                     f"{f['duplicate_documents']} | {f['short_documents']} | "
                     f"{number(f['non_ascii_fraction'], '.1%')} | {number(f['english_function_words'], '.1%')} |")
    skipped = ", ".join(f"{n} {reason}" for reason, n in report["skipped"].items()) or "none"
    lines += ["", f"Files left out: {skipped}. Rows: {report['chat_rows']} chat, {report['eval_rows']} eval, "
              f"{report['preference_rows']} preference.", "",
              f"## Readiness: {r['status'].upper()}", "",
              "| check | level | value | message |", "|---|---|---:|---|"]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {c['level']} | {md_cell(c['value'])} | {md_cell(c['message'], None)} |")
    return "\n".join(lines) + "\n"
