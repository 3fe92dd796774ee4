"""Honesty evidence: is the eval measuring generalisation, or recall of text the model was trained on?

Two kinds of check:

* **Contamination** (text only, cheap; preflight runs it before any training): eval prompts and answers
  that occur in the SFT rows or the corpus, by exact match and by word n-gram overlap (eval/ngram.py).
* **Near duplicates** (text only): eval rows whose MinHash similarity to an SFT prompt or a corpus passage
  reaches the threshold (eval/neardup.py); they count as contamination like exact matches.
* **Memorisation** (needs the model): canary prefixes drawn from the corpus (and, optionally, random canary
  strings planted into the corpus before base training) are fed to the model; a canary counts as memorised
  when greedy decoding reproduces its continuation token for token.
* **Regurgitation** (needs replies): generated replies that copy a long run of corpus words.

`run_honesty` runs them all; `run tiny`'s honesty stage and `picochat data honesty` call it.

"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from picochat_jax.eval.ngram import MIN_PHRASE_WORDS, preview, tail
from picochat_jax.fileio import save_json, save_text
from picochat_jax.markdown import md_cell


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Any, stop_ids: Sequence[int]) -> list[list[int]]: ...


class TokenCodec(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Canary:
    kind: str  # "corpus" (a passage of the real corpus) or "planted" (a random string added before training)
    source: str
    prefix_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


def corpus_canaries(documents: Sequence[str], labels: Sequence[str], tok: TokenCodec, count: int = 8,
                    prefix_tokens: int = 32, continuation_tokens: int = 16, seed: int = 0) -> list[Canary]:
    """`count` passages drawn from the corpus: a prefix to prompt with, the continuation to expect."""
    rng = np.random.default_rng(seed)
    need = prefix_tokens + continuation_tokens
    order = rng.permutation(len(documents))
    out: list[Canary] = []
    # Round-robin over documents so canaries spread over the corpus; tokenize only what we draw from.
    chosen = order[: max(count, 1) * 2]
    encoded = tok.encode_batch([documents[i] for i in chosen])
    usable = [(int(d), ids) for d, ids in zip(chosen, encoded, strict=True) if len(ids) >= need]
    for k in range(count):
        if not usable:
            break
        doc, ids = usable[k % len(usable)]
        start = int(rng.integers(0, len(ids) - need + 1))
        out.append(Canary("corpus", labels[doc], tuple(ids[start : start + prefix_tokens]),
                          tuple(ids[start + prefix_tokens : start + need])))
    return out


def make_planted_canaries(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prefix, secret) pairs: random strings no model could guess without having memorised them."""
    rng = np.random.default_rng(seed + 7919)
    out = []
    for _ in range(count):
        tag = "".join(rng.choice(list("abcdefghjkmnpqrstuvwxyz"), 6))
        secret = " ".join(str(x) for x in rng.integers(1000, 9999, 3))
        out.append((f"canary {tag}: the access code is", f" {secret}"))
    return out


def plant_canaries(documents: Sequence[str], canaries: Sequence[tuple[str, str]], repeats: int = 1,
                   seed: int = 0) -> list[str]:
    """Documents with each canary line inserted `repeats` times at random line boundaries."""
    rng = np.random.default_rng(seed)
    docs = list(documents)
    for prefix, secret in canaries:
        for _ in range(repeats):
            d = int(rng.integers(len(docs)))
            lines = docs[d].split("\n")
            at = int(rng.integers(len(lines) + 1))
            docs[d] = "\n".join(lines[:at] + [prefix + secret] + lines[at:])
    return docs


def planted_canaries(canaries: Sequence[tuple[str, str]], tok: TokenCodec) -> list[Canary]:
    enc = tok.encode_batch([p for p, _ in canaries] + [p + s for p, s in canaries])
    k = len(canaries)
    out = []
    for i in range(k):
        prefix, full = enc[i], enc[k + i]
        # BPE may merge across the boundary; keep the shared token prefix as the prompt.
        same = [a == b for a, b in zip(prefix, full, strict=False)]
        cut = same.index(False) if False in same else len(same)
        out.append(Canary("planted", canaries[i][0], tuple(full[:cut]), tuple(full[cut:])))
    return out


def memorization_check(engine: Generator, tok: TokenCodec, canaries: Sequence[Canary], sampling: Any,
                       stop_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Greedy-complete each canary prefix; memorised = the continuation reproduced exactly."""
    if not canaries:
        return {"canaries": 0, "memorized": 0, "rate": 0.0, "mean_token_match": 0.0, "examples": []}
    outputs = engine.generate([list(c.prefix_ids) for c in canaries], sampling, list(stop_ids))
    rows, by_kind = [], {}
    for c, got in zip(canaries, outputs, strict=True):
        want = np.asarray(c.continuation_ids)
        got_arr = np.asarray(list(got[: len(want)]) + [-1] * max(0, len(want) - len(got)))
        agree = got_arr == want
        prefix_match = int(len(want) if agree.all() else np.argmin(agree))
        exact = bool(agree.all())
        by_kind.setdefault(c.kind, []).append(exact)
        rows.append({"kind": c.kind, "source": c.source, "memorized": exact, "matched_tokens": prefix_match,
                     "continuation_tokens": len(want), "prefix": tail(tok.decode(list(c.prefix_ids)), 80),
                     "expected": preview(tok.decode(list(c.continuation_ids)), 80),
                     "generated": preview(tok.decode(list(got[: len(want)])), 80)})
    memorized = sum(r["memorized"] for r in rows)
    return {
        "canaries": len(rows), "memorized": memorized, "rate": memorized / len(rows),
        "mean_token_match": float(np.mean([r["matched_tokens"] / max(r["continuation_tokens"], 1) for r in rows])),
        "by_kind": {k: {"canaries": len(v), "memorized": int(sum(v)), "rate": sum(v) / len(v)}
                    for k, v in by_kind.items()},
        "examples": rows,
    }


# --- report -------------------------------------------------------------------------------------------


def honesty_status(contamination: dict[str, Any]) -> str:
    if contamination["counts"]["eval_rows_contaminated"]:
        return "contaminated"
    if any(f["severity"] == "warn" for f in contamination["findings"]):
        return "caution"
    return "clean"


def merge_near_duplicates(contamination: dict[str, Any], near: dict[str, Any]) -> dict[str, Any]:
    """The contamination scan with near-duplicate findings (eval/neardup.py) folded in: a near-duplicated eval
    row counts as found in the SFT rows or the corpus, exactly like an exact or n-gram match."""
    out = {**contamination, "findings": [*contamination["findings"], *near["findings"]], "near_duplicates": {
        k: near[k] for k in ("threshold", "char_ngram", "num_perm", "eval_rows_near_duplicated")}}
    in_sft = set(contamination["eval_lines_in_sft"]) | {f["eval_line"] for f in near["findings"]
                                                         if f["kind"].endswith("_near_sft")}
    in_corpus = set(contamination["eval_lines_in_corpus"]) | {f["eval_line"] for f in near["findings"]
                                                               if f["kind"].endswith("_near_corpus")}
    out["eval_lines_in_sft"], out["eval_lines_in_corpus"] = sorted(in_sft), sorted(in_corpus)
    out["contaminated_eval_lines"] = sorted(in_sft | in_corpus)
    out["counts"] = {**contamination["counts"], "eval_rows_in_sft": len(in_sft),
                     "eval_rows_in_corpus": len(in_corpus), "eval_rows_contaminated": len(in_sft | in_corpus),
                     "eval_rows_near_duplicated": near["eval_rows_near_duplicated"]}
    return out


def write_honesty_report(out_dir: str | Path, contamination: dict[str, Any], memorization: dict[str, Any] | None,
                         inputs: dict[str, Any], regurgitation: dict[str, Any] | None = None) -> dict[str, Any]:
    """honesty_report.json (everything) and honesty_report.md (counts and a few examples of each kind)."""
    out_dir = Path(out_dir)
    report = {"status": honesty_status(contamination), "inputs": inputs, **contamination,
              "memorization": memorization, "regurgitation": regurgitation}
    save_json(out_dir / "honesty_report.json", report)
    save_text(out_dir / "honesty_report.md", honesty_markdown(report))
    return report


def honesty_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        "# Honesty and contamination report", "",
        (f"Status: **{report['status']}**. An eval only measures skill when its rows were never trained on; "
        f"this report looks for them in the SFT rows and the corpus ({report['ngram']}-gram overlap on "
        f"normalised text, or whole-phrase matches for short texts) and checks what the model memorised."), "",
        "| check | count |", "|---|---:|",
        f"| eval rows | {c['eval_rows']} |",
        f"| eval rows found in SFT rows | {c['eval_rows_in_sft']} |",
        f"| eval rows found in the corpus | {c['eval_rows_in_corpus']} |",
        f"| eval prompts in SFT / corpus | {c['eval_prompt_in_sft']} / {c['eval_prompt_in_corpus']} |",
        f"| eval reference answers in SFT / corpus | {c['eval_reference_in_sft']} / {c['eval_reference_in_corpus']} |",
        (f"| must_include phrases (>= {MIN_PHRASE_WORDS} words) in SFT answers / corpus (warning) | "
        f"{c['eval_phrase_in_sft']} / {c['eval_phrase_in_corpus']} |"),
        f"| duplicate eval prompts | {c['duplicate_eval_prompt']} |",
        f"| SFT answers found in the corpus | {c['sft_rows_in_corpus']} of {c['sft_rows']} |",
        (f"| SFT answer {report['ngram']}-grams found in the corpus | "
        f"{100 * report['sft_corpus']['answer_ngram_overlap']:.1f}% |"), "",
    ]
    near = report.get("near_duplicates")
    if near:
        lines += [(f"Near duplicates: {near['eval_rows_near_duplicated']} eval rows have a text at estimated "
                   f"Jaccard >= {near['threshold']} ({near['char_ngram']}-character shingles, MinHash of "
                   f"{near['num_perm']}) among the SFT prompts or corpus passages; they count as found above."), ""]
    reg = report.get("regurgitation")
    if reg:
        lines += ["## Regurgitation", "",
                  (f"{reg['regurgitated']} of {reg['replies']} generated replies contain a run of {reg['run_words']} "
                   f"consecutive corpus words (rate {reg['rate']:.2f})."), ""]
        if reg["examples"]:
            lines += ["| reply | found in | copied share | text |", "|---|---|---:|---|"]
            lines += [f"| {md_cell(e['label'])} | {md_cell(e['where'])} | {e['copied_share']:.2f} | "
                      f"{md_cell(e['text'])} |" for e in reg["examples"][:10]]
            lines.append("")
    mem = report.get("memorization")
    if mem:
        lines += [f"## Memorisation ({mem.get('model', 'model')})", "",
                  (f"{mem['memorized']} of {mem['canaries']} canaries reproduced verbatim "
                  f"(rate {mem['rate']:.2f}; mean matched continuation {100 * mem['mean_token_match']:.0f}%)."), ""]
        for kind, v in mem.get("by_kind", {}).items():
            lines.append(f"- {kind} canaries: {v['memorized']} / {v['canaries']}")
        lines += ["", "| kind | source | memorised | matched | prefix | expected | generated |",
                  "|---|---|---|---:|---|---|---|"]
        for r in mem["examples"][:12]:
            lines.append(f"| {r['kind']} | {md_cell(r['source'])} | {'yes' if r['memorized'] else 'no'} | "
                         f"{r['matched_tokens']}/{r['continuation_tokens']} | {md_cell(r['prefix'])} | "
                         f"{md_cell(r['expected'])} | {md_cell(r['generated'])} |")
        lines.append("")
    else:
        lines += ["## Memorisation", "", "Not measured (no model given).", ""]
    lines += ["## Findings", ""]
    if not report["findings"]:
        lines += ["No eval row, reference or phrase was found in the training data.", ""]
    else:
        lines += ["| severity | kind | eval line | text | found in | overlap |", "|---|---|---:|---|---|---:|"]
        per_kind: Counter = Counter()
        for f in report["findings"]:
            per_kind[f["kind"]] += 1
            if per_kind[f["kind"]] <= 10:
                how = (f"{f['overlap']:.2f} ({f['how']})" if "overlap" in f else
                       f"{f['similarity']:.2f} (MinHash)")
                lines.append(f"| {f['severity']} | {f['kind']} | {f['eval_line']} | {md_cell(f['text'])} | "
                             f"{md_cell(f['where'])} | {how} |")
        hidden = sum(max(0, v - 10) for v in per_kind.values())
        if hidden:
            lines.append(f"\n({hidden} more findings in honesty_report.json)")
        lines.append("")
    return "\n".join(lines)


def run_honesty(out_dir: str | Path, *, eval_rows: Sequence[Any], conversations: Sequence[Any],
                documents: Sequence[str], doc_labels: Sequence[str], inputs: dict[str, Any],
                engine: Any = None, tok: Any = None, model_name: str | None = None,
                replies: Sequence[str] | None = None, reply_labels: Sequence[str] | None = None,
                planted: Sequence[tuple[str, str]] = (), canary_count: int = 8,
                near_threshold: float | None = None, char_ngram: int | None = None) -> dict[str, Any]:
    """Contamination (exact, n-gram, near-duplicate), and with a model its memorisation, and with replies their
    regurgitation -> honesty_report.json|md under out_dir."""
    from picochat_jax.eval.neardup import (
        CHAR_NGRAM,
        NEAR_THRESHOLD,
        REGURGITATION_WORDS,
        regurgitation,
        scan_near_duplicates,
    )
    from picochat_jax.eval.ngram import TextIndex, scan_contamination

    scan = scan_contamination(eval_rows, conversations, documents, doc_labels)
    near = scan_near_duplicates(eval_rows, conversations, documents, doc_labels,
                                NEAR_THRESHOLD if near_threshold is None else near_threshold,
                                CHAR_NGRAM if char_ngram is None else char_ngram)
    scan = merge_near_duplicates(scan, near)
    mem = None
    if engine is not None:
        from picochat_jax.generate import SamplingParams

        cont = 16  # tokens a canary must reproduce; the 32-token prefix shrinks only for tiny contexts
        prefix = min(32, engine.max_len - cont - 1)
        canaries = corpus_canaries(documents, doc_labels, tok, canary_count, prefix, cont)
        canaries += planted_canaries(planted, tok)
        mem = memorization_check(engine, tok, canaries, SamplingParams(max_new_tokens=cont), stop_ids=())
        mem["model"] = model_name
    reg = None
    if replies:
        index = TextIndex.build("corpus", list(documents), list(doc_labels), n=REGURGITATION_WORDS)
        reg = regurgitation(replies, index, REGURGITATION_WORDS, reply_labels)
    return write_honesty_report(out_dir, scan, mem, inputs, reg)
