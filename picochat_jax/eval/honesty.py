"""Honesty evidence: is the eval measuring generalisation, or recall of text the model was trained on?

Two kinds of check:

* **Contamination** (text only, cheap; preflight runs it before any training): eval prompts and answers
  that occur in the SFT rows or the corpus, by exact match and by word n-gram overlap (eval/ngram.py).
* **Memorisation** (needs the model): canary prefixes drawn from the corpus (and, optionally, random canary
  strings planted into the corpus before base training) are fed to the model; a canary counts as memorised
  when greedy decoding reproduces its continuation token for token.

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


def write_honesty_report(out_dir: str | Path, contamination: dict[str, Any], memorization: dict[str, Any] | None,
                         inputs: dict[str, Any]) -> dict[str, Any]:
    """honesty_report.json (everything) and honesty_report.md (counts and a few examples of each kind)."""
    out_dir = Path(out_dir)
    report = {"status": honesty_status(contamination), "inputs": inputs, **contamination,
              "memorization": memorization}
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
                lines.append(f"| {f['severity']} | {f['kind']} | {f['eval_line']} | {md_cell(f['text'])} | "
                             f"{md_cell(f['where'])} | {f['overlap']:.2f} ({f['how']}) |")
        hidden = sum(max(0, v - 10) for v in per_kind.values())
        if hidden:
            lines.append(f"\n({hidden} more findings in honesty_report.json)")
        lines.append("")
    return "\n".join(lines)
