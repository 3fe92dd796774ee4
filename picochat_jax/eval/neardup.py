"""Near-duplicate contamination and regurgitation.

* Near duplicates: character n-gram shingles of normalised text, 128-permutation MinHash signatures, and LSH
  banding (32 bands of 4) to find candidate pairs without comparing every eval row with every training text;
  a pair whose estimated Jaccard similarity reaches `threshold` (default 0.86) is a near duplicate. This catches
  a reworded or re-punctuated eval prompt that the exact and word n-gram checks (eval/ngram.py) miss. Long
  corpus documents are compared as overlapping passages about the length of the eval text.
* Regurgitation: a generated reply that contains a run of `run_words` (default 16) consecutive words found in
  the corpus reproduces training text verbatim instead of answering.

Everything is numpy over whole arrays; no per-character Python loops.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from picochat_jax.eval.ngram import TextIndex, ngram_hashes, preview, row_label, word_ids
from picochat_jax.eval.text import normalize

NEAR_THRESHOLD = 0.86
CHAR_NGRAM = 5
NUM_PERM = 128
BANDS = 32  # x 4 rows: pairs above about 0.42 Jaccard share a bucket with high probability
REGURGITATION_WORDS = 16
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_SALTS = _mix(np.arange(1, NUM_PERM + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def shingles(text: str, n: int = CHAR_NGRAM) -> np.ndarray:
    """Distinct hashes of the character n-grams of the normalised text (the whole text when shorter)."""
    raw = np.frombuffer(normalize(text, strip_punctuation=True).encode("utf-8"), np.uint8).astype(np.uint64)
    if len(raw) == 0:
        return np.zeros(0, np.uint64)
    return np.unique(ngram_hashes(raw + np.uint64(1), min(n, len(raw))))


def signature(hashes: np.ndarray) -> np.ndarray:
    """MinHash signature (NUM_PERM,) of a shingle set; all-max for an empty set (similar to nothing)."""
    if len(hashes) == 0:
        return np.full(NUM_PERM, _MASK, np.uint64)
    out = np.empty(NUM_PERM, np.uint64)
    for lo in range(0, NUM_PERM, 32):  # bounded memory for long texts
        out[lo:lo + 32] = _mix(hashes[None, :] ^ _SALTS[lo:lo + 32, None]).min(axis=1)
    return out


def signatures(texts: Sequence[str], n: int = CHAR_NGRAM) -> np.ndarray:
    return np.stack([signature(shingles(t, n)) for t in texts]) if texts else np.zeros((0, NUM_PERM), np.uint64)


def passages(text: str, words: int, stride: int) -> list[str]:
    """Overlapping word windows of a long text (the text itself when short)."""
    w = text.split()
    if len(w) <= words:
        return [text]
    return [" ".join(w[i:i + words]) for i in range(0, len(w) - words + stride, stride)]


def min_shingles(hashes: np.ndarray) -> np.ndarray:
    """For each of the NUM_PERM permutations, the shingle whose permuted value is the signature's minimum."""
    out = np.empty(NUM_PERM, np.uint64)
    for lo in range(0, NUM_PERM, 32):
        out[lo:lo + 32] = hashes[_mix(hashes[None, :] ^ _SALTS[lo:lo + 32, None]).argmin(axis=1)]
    return out


def could_match(queries: Sequence[str], documents: Sequence[str], threshold: float,
                n: int = CHAR_NGRAM) -> np.ndarray:
    """Which documents can hold a passage whose MinHash similarity to some query reaches `threshold`.

    Exact, not a heuristic: the permuted-hash map is a bijection, so a passage agrees with a query on
    permutation k only when it contains the query's minimising shingle for k, and a passage's shingles are a
    subset of its document's (normalisation is word-local, so a passage's normal form is a substring of the
    document's). A document holding fewer than threshold x NUM_PERM of a query's minimising shingles cannot
    reach the threshold anywhere. One sort per document instead of a signature per passage: what lets the
    corpus scan run over 100 MB corpora. Queries shorter than one shingle disable the filter (all True)."""
    sets = [shingles(q, n) for q in queries if normalize(q, strip_punctuation=True)]
    if not sets or any(len(normalize(q, strip_punctuation=True).encode()) < n for q in queries if q.strip()):
        return np.ones(len(documents), bool)
    mins = np.stack([min_shingles(h) for h in sets])  # (queries, NUM_PERM)
    pool, owner = np.unique(mins, return_inverse=True)
    owner = owner.reshape(mins.shape)
    need = threshold * NUM_PERM - 1e-9
    keep = np.zeros(len(documents), bool)
    for i, doc in enumerate(documents):
        norm = normalize(doc, strip_punctuation=True).encode("utf-8")
        if len(norm) < 2 * n:  # a passage this short is hashed whole (shingles): compare it the slow way
            keep[i] = True
            continue
        present = np.isin(pool, ngram_hashes(np.frombuffer(norm, np.uint8).astype(np.uint64) + np.uint64(1), n))
        keep[i] = bool((present[owner].sum(axis=1) >= need).any())
    return keep


def near_duplicates(queries: Sequence[str], targets: Sequence[str], target_labels: Sequence[str],
                    threshold: float = NEAR_THRESHOLD, n: int = CHAR_NGRAM) -> list[dict[str, Any]]:
    """For each query with a target at estimated Jaccard >= threshold: {query, where, similarity}, best first."""
    if not queries or not targets:
        return []
    q_sig, t_sig = signatures(queries, n), signatures(targets, n)
    rows = NUM_PERM // BANDS
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for j, sig in enumerate(t_sig):
        for b in range(BANDS):
            buckets[(b, sig[b * rows:(b + 1) * rows].tobytes())].append(j)
    found = []
    for i, sig in enumerate(q_sig):
        candidates = {j for b in range(BANDS) for j in buckets.get((b, sig[b * rows:(b + 1) * rows].tobytes()), ())}
        if not candidates:
            continue
        cand = np.fromiter(candidates, np.int64)
        sims = (t_sig[cand] == sig[None, :]).mean(axis=1)
        best = int(np.argmax(sims))
        if sims[best] >= threshold:
            found.append({"query": i, "where": target_labels[cand[best]], "similarity": round(float(sims[best]), 4)})
    return found


def regurgitation(replies: Sequence[str], corpus_index: TextIndex, run_words: int = REGURGITATION_WORDS,
                  labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Replies containing `run_words` consecutive corpus words. `corpus_index` must be built with n=run_words."""
    if corpus_index.n != run_words:
        raise ValueError(f"the corpus index holds {corpus_index.n}-grams; regurgitation needs {run_words}")
    cache: dict[str, int] = {}
    hits = []
    for i, reply in enumerate(replies):
        words = normalize(reply, strip_punctuation=True).split()
        rate, owner = corpus_index.overlap(ngram_hashes(word_ids(words, cache), run_words))
        if owner is not None and rate > 0:
            hits.append({"reply": i, "label": labels[i] if labels else str(i), "where": corpus_index.labels[owner],
                         "copied_share": round(rate, 4), "text": preview(reply)})
    return {"replies": len(replies), "regurgitated": len(hits),
            "rate": len(hits) / len(replies) if replies else 0.0, "run_words": run_words, "examples": hits[:20]}


def scan_near_duplicates(eval_rows: Sequence[Any], conversations: Sequence[Any], documents: Sequence[str],
                         doc_labels: Sequence[str], threshold: float = NEAR_THRESHOLD,
                         n: int = CHAR_NGRAM) -> dict[str, Any]:
    """Eval prompts near-duplicated in SFT prompts, and eval prompts/references near-duplicated in corpus
    passages. Each finding names the eval line, where it was found and the similarity."""
    prompts = ["\n".join(m.content for m in r.prompt if m.role == "user") for r in eval_rows]
    sft_prompts = ["\n".join(m.content for m in c.messages if m.role == "user") for c in conversations]
    sft_labels = [row_label(c.source, c.line) for c in conversations]
    findings = []
    for hit in near_duplicates(prompts, sft_prompts, sft_labels, threshold, n):
        row = eval_rows[hit["query"]]
        findings.append({"kind": "eval_prompt_near_sft", "severity": "block", "eval_line": row.line,
                         "text": preview(prompts[hit["query"]]), "where": hit["where"],
                         "similarity": hit["similarity"]})
    longest = max((len(p.split()) for p in prompts), default=0)
    window = max(16, 2 * longest)
    texts = prompts + [r.reference or "" for r in eval_rows]
    candidates = could_match(texts, documents, threshold, n)
    corpus_passages, corpus_labels = [], []
    for doc, label, candidate in zip(documents, doc_labels, candidates, strict=True):
        if not candidate:
            continue
        for k, passage in enumerate(passages(doc, window, window // 2)):
            corpus_passages.append(passage)
            corpus_labels.append(f"{label}@{k * (window // 2)}w")
    for hit in near_duplicates(texts, corpus_passages, corpus_labels, threshold, n):
        i = hit["query"] % len(eval_rows)
        what = "prompt" if hit["query"] < len(eval_rows) else "reference"
        if what == "reference" and not eval_rows[i].reference:
            continue
        findings.append({"kind": f"eval_{what}_near_corpus", "severity": "block", "eval_line": eval_rows[i].line,
                         "text": preview(texts[hit["query"]]), "where": hit["where"],
                         "similarity": hit["similarity"]})
    lines = sorted({f["eval_line"] for f in findings})
    return {"threshold": threshold, "char_ngram": n, "num_perm": NUM_PERM, "findings": findings,
            "eval_lines": lines, "eval_rows_near_duplicated": len(lines)}
