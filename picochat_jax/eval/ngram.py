"""Contamination by text overlap: eval prompts and answers that occur in the SFT rows or the corpus, by exact
match and by word n-gram overlap on normalised text (case-folded, punctuation stripped, whitespace collapsed).
Preflight runs it before any training; the honesty report after.

N-grams are 64-bit rolling hashes computed with numpy over a whole text at once and looked up with `np.isin`,
so a check costs O(corpus words), never O(eval rows x corpus) Python loops. Texts shorter than one n-gram fall
back to whole-phrase containment on word boundaries (one C-level `str.find` over the joined corpus).

What counts against a release: an eval row whose *prompt* (or full reference answer) is found in the SFT rows or
in the corpus. A single `must_include` phrase found in training text is reported as a warning only: phrases
like "honest" or "learning rate" are what SFT and pretraining are supposed to teach.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picochat_jax.data.records import Conversation, EvalRow
from picochat_jax.eval.text import normalize

NGRAM = 8
NEAR_OVERLAP = 0.5  # fraction of a text's n-grams found elsewhere that counts as "found"
MIN_PHRASE_WORDS = 3  # shorter phrases ("token", "no") are too generic to mean anything
MIN_PROMPT_WORDS = 5  # shorter prompts ("what is a token") occur in ordinary prose by chance

_MULT = np.uint64(0x100000001B3)  # FNV prime: odd, so the rolling hash is a bijection per step


def _word_hash(word: str) -> int:
    # Stable across processes (Python's str hash is salted per process).
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def word_ids(words: Sequence[str], cache: dict[str, int] | None = None) -> np.ndarray:
    cache = {} if cache is None else cache
    # set.difference(dict) walks this text's words only; `set - cache.keys()` walked the whole cache per text,
    # which made a 100 MB corpus cost minutes.
    for w in set(words).difference(cache):
        cache[w] = _word_hash(w)
    return np.fromiter(map(cache.__getitem__, words), np.uint64, count=len(words))


def ngram_hashes(ids: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """64-bit hash of every window of n consecutive word ids (empty when the text is shorter than n)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        for k in range(n):  # n vector ops, not a loop over windows
            h = h * _MULT + ids[k : k + m]
    return h


@dataclass
class TextIndex:
    """N-gram hashes and phrase-searchable text of a collection (SFT prompts, SFT answers, the corpus)."""

    name: str
    hashes: np.ndarray  # sorted n-gram hashes
    owners: np.ndarray  # index of the text each sorted hash came from
    joined: str  # "\n"-separated normalised texts, each padded with spaces (word-boundary search)
    starts: np.ndarray  # offset of each text inside `joined`
    labels: list[str]  # where each text came from (e.g. "chat.jsonl:12" or a corpus file)
    words: int
    n: int

    @classmethod
    def build(cls, name: str, texts: Sequence[str], labels: Sequence[str], n: int = NGRAM,
              cache: dict[str, int] | None = None) -> TextIndex:
        cache = {} if cache is None else cache
        norm = [normalize(t, strip_punctuation=True) for t in texts]
        per_text = [ngram_hashes(word_ids(t.split(), cache), n) for t in norm]
        hashes = np.concatenate(per_text) if per_text else np.zeros(0, np.uint64)
        owners = np.repeat(np.arange(len(per_text)), [len(h) for h in per_text])
        order = np.argsort(hashes, kind="stable")
        padded = [f" {t} " for t in norm]
        starts = np.cumsum([0] + [len(p) + 1 for p in padded[:-1]]) if padded else np.zeros(0, np.int64)
        return cls(name, hashes[order], owners[order], "\n".join(padded), np.asarray(starts), list(labels),
                   sum(len(t.split()) for t in norm), n)

    def find_phrase(self, phrase_norm: str) -> int | None:
        """Index of the first text containing the normalised phrase on word boundaries, or None."""
        at = self.joined.find(f" {phrase_norm} ")
        if at < 0:
            return None
        return int(np.searchsorted(self.starts, at, side="right") - 1)

    def overlap(self, query_hashes: np.ndarray) -> tuple[float, int | None]:
        """(fraction of the query's n-grams present here, the text holding most of them)."""
        if len(query_hashes) == 0 or len(self.hashes) == 0:
            return 0.0, None
        pos = np.searchsorted(self.hashes, query_hashes).clip(0, len(self.hashes) - 1)
        hit = self.hashes[pos] == query_hashes
        if not hit.any():
            return 0.0, None
        owner = Counter(self.owners[pos[hit]].tolist()).most_common(1)[0][0]
        return float(hit.mean()), int(owner)


def _match(text: str, index: TextIndex, min_words: int, cache: dict[str, int]) -> dict[str, Any] | None:
    """Where `text` occurs in `index`: n-gram overlap for long texts, phrase containment for short ones."""
    norm = normalize(text, strip_punctuation=True)
    words = norm.split()
    if len(words) < min_words:
        return None
    if len(words) >= index.n:
        rate, owner = index.overlap(ngram_hashes(word_ids(words, cache), index.n))
        if rate >= NEAR_OVERLAP and owner is not None:
            return {"where": index.labels[owner], "overlap": round(rate, 4), "how": f"{index.n}-gram"}
        return None
    owner = index.find_phrase(norm)
    if owner is None:
        return None
    return {"where": index.labels[owner], "overlap": 1.0, "how": "phrase"}


def preview(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def tail(text: str, width: int) -> str:
    """The end of a prompt: the part the continuation has to follow."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "…" + flat[-(width - 1) :]


def _user_text(messages: Sequence[Any]) -> str:
    return "\n".join(m.content for m in messages if m.role == "user")


def row_label(source: str, line: int) -> str:
    return f"{Path(source).name}:{line}" if source else f"row {line}"


def document_sources(corpus: Any) -> list[str]:
    """A readable source per corpus document ("05_overfitting.txt", "rows.jsonl#12"), from the manifest."""
    names: list[str] = []
    for entry in corpus.manifest.get("files", []):
        n, name = int(entry.get("documents", 0)), Path(entry["path"]).name
        names += [name] if n == 1 else [f"{name}#{k + 1}" for k in range(n)]
    if len(names) != len(corpus.documents):  # documents not loaded by load_corpus: fall back to labels
        return [f"{label}#{i}" for i, label in enumerate(corpus.labels)]
    return names


def scan_contamination(eval_rows: Sequence[EvalRow], conversations: Sequence[Conversation],
                       documents: Sequence[str], doc_labels: Sequence[str] | None = None,
                       n: int = NGRAM) -> dict[str, Any]:
    """Text-only contamination checks: eval vs SFT, eval vs corpus, SFT vs corpus, eval duplicates."""
    cache: dict[str, int] = {}
    conv_labels = [row_label(c.source, c.line) for c in conversations]
    sft_prompts = TextIndex.build("sft_prompts", [_user_text(c.messages) for c in conversations], conv_labels, n,
                                  cache)
    sft_answers = TextIndex.build("sft_answers", [c.target for c in conversations], conv_labels, n, cache)
    corpus = TextIndex.build("corpus", list(documents), list(doc_labels or [f"document {i}" for i in
                                                                            range(len(documents))]), n, cache)
    exact_prompts: dict[str, str] = {}
    for c, label in zip(conversations, conv_labels, strict=True):
        exact_prompts.setdefault(normalize(_user_text(c.messages), strip_punctuation=True), label)

    findings: list[dict[str, Any]] = []
    in_sft: set[int] = set()
    in_corpus: set[int] = set()
    seen: dict[str, int] = {}

    def add(kind: str, severity: str, row: EvalRow, text: str, hit: dict[str, Any]) -> None:
        findings.append({"kind": kind, "severity": severity, "eval_line": row.line, "category": row.category,
                         "text": preview(text), **hit})

    for i, row in enumerate(eval_rows):
        prompt = _user_text(row.prompt)
        norm_prompt = normalize(prompt, strip_punctuation=True)
        if norm_prompt in seen:
            add("duplicate_eval_prompt", "warn", row, prompt, {"where": f"eval line {seen[norm_prompt]}",
                                                               "overlap": 1.0, "how": "exact"})
        seen.setdefault(norm_prompt, row.line)

        # Prompt in SFT: exact (any length) or near (long prompts) -> the eval measures recall of practice.
        if norm_prompt in exact_prompts:
            add("eval_prompt_in_sft", "block", row, prompt, {"where": exact_prompts[norm_prompt], "overlap": 1.0,
                                                             "how": "exact"})
            in_sft.add(i)
        elif (hit := _match(prompt, sft_prompts, MIN_PROMPT_WORDS, cache)) is not None:
            add("eval_prompt_in_sft", "block", row, prompt, hit)
            in_sft.add(i)
        if (hit := _match(prompt, corpus, MIN_PROMPT_WORDS, cache)) is not None:
            add("eval_prompt_in_corpus", "block", row, prompt, hit)
            in_corpus.add(i)

        if row.reference:
            if (hit := _match(row.reference, sft_answers, MIN_PHRASE_WORDS, cache)) is not None:
                add("eval_reference_in_sft", "block", row, row.reference, hit)
                in_sft.add(i)
            if (hit := _match(row.reference, corpus, MIN_PHRASE_WORDS, cache)) is not None:
                add("eval_reference_in_corpus", "block", row, row.reference, hit)
                in_corpus.add(i)
        for phrase in row.must_include:
            if (hit := _match(phrase, sft_answers, MIN_PHRASE_WORDS, cache)) is not None:
                add("eval_phrase_in_sft", "warn", row, phrase, hit)
            if (hit := _match(phrase, corpus, MIN_PHRASE_WORDS, cache)) is not None:
                add("eval_phrase_in_corpus", "warn", row, phrase, hit)

    # SFT answers copied from the corpus are not an eval leak, but they make "SFT fit" look like skill.
    sft_in_corpus = []
    answer_ngrams = total_ngrams = 0
    for c, label in zip(conversations, conv_labels, strict=True):
        hashes = ngram_hashes(word_ids(normalize(c.target, strip_punctuation=True).split(), cache), n)
        rate, owner = corpus.overlap(hashes)
        answer_ngrams += round(rate * len(hashes))
        total_ngrams += len(hashes)
        if owner is not None and rate >= NEAR_OVERLAP:
            sft_in_corpus.append({"sft_row": label, "where": corpus.labels[owner], "overlap": round(rate, 4),
                                  "text": preview(c.target)})

    kinds = Counter(f["kind"] for f in findings)
    counts = {
        "eval_rows": len(eval_rows), "sft_rows": len(conversations), "corpus_documents": len(documents),
        "corpus_words": corpus.words,
        "eval_rows_in_sft": len(in_sft), "eval_rows_in_corpus": len(in_corpus),
        "eval_rows_contaminated": len(in_sft | in_corpus),
        **{k: kinds.get(k, 0) for k in ("eval_prompt_in_sft", "eval_prompt_in_corpus", "eval_reference_in_sft",
                                        "eval_reference_in_corpus", "eval_phrase_in_sft", "eval_phrase_in_corpus",
                                        "duplicate_eval_prompt")},
        "sft_rows_in_corpus": len(sft_in_corpus),
    }
    return {
        "ngram": n, "near_overlap": NEAR_OVERLAP, "counts": counts,
        "contaminated_eval_lines": sorted(eval_rows[i].line for i in in_sft | in_corpus),
        "eval_lines_in_sft": sorted(eval_rows[i].line for i in in_sft),
        "eval_lines_in_corpus": sorted(eval_rows[i].line for i in in_corpus),
        "sft_corpus": {"rows_in_corpus": len(sft_in_corpus), "answer_ngrams": total_ngrams,
                       "answer_ngram_overlap": (answer_ngrams / total_ngrams) if total_ngrams else 0.0,
                       "examples": sft_in_corpus[:20]},
        "findings": findings,
    }


# --- memorisation -------------------------------------------------------------------------------------
