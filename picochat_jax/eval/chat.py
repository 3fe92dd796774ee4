"""The chat scoreboard: generate a reply for every eval row and score it with the spec's string rules.

A row passes when every `must_include` string occurs in the reply, every `must_include_any` group has at
least one of its strings, and no `must_not_include` string occurs. Matching ignores case and treats any
run of whitespace as one space, so a reply that wraps "LLM factory" over two lines still matches. An empty
reply fails whatever the rules say: a row with only `must_not_include` must not pass by silence.

Two flags ride along for the release gate and the report: prompt echo (the reply repeats the question
instead of answering it, the classic failure of an under-trained chat model) and refusal (the reply says
it cannot or does not know, which is right for unanswerable rows and wrong for answerable ones).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from picochat_jax.data.records import EvalRow
from picochat_jax.eval.text import normalize, words
from picochat_jax.fileio import save_json, save_text, write_jsonl
from picochat_jax.generate import ChatFormat, Engine, SamplingParams
from picochat_jax.markdown import md_cell, percent

# First-person phrases a model uses to decline or admit ignorance, matched on normalised text (lower case,
# straight apostrophes, single spaces). Deliberately specific: "If you do not know, say so" is advice, not
# a refusal, and must not count.
REFUSAL_PATTERNS = (
    r"\bi (?:do not|don't|dont) know\b",
    r"\bi(?: am|'m) not (?:sure|certain|able)\b",
    r"\bi(?: am|'m) unable\b",
    r"\bi (?:cannot|can't|can not|could not|couldn't) (?:answer|help|say|tell|provide|know|find|determine|"
    r"assist|verify|confirm)\b",
    r"\bi (?:do not|don't) have (?:enough |any |the |reliable |that )?(?:information|data|details|context|"
    r"knowledge|access)\b",
    r"\bnot enough (?:information|data|context)\b",
    r"\bi (?:will not|won't) (?:answer|help|provide)\b",
    r"\bi (?:have no|lack) (?:information|knowledge|data)\b",
    r"\bi(?:'m| am) sorry,? but\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS))


def score_reply(row: EvalRow, reply: str) -> tuple[bool, list[str]]:
    """(passed, reasons it failed); the spec's rules, case-insensitive."""
    text = normalize(reply)
    reasons = []
    if not text:
        reasons.append("empty reply")
    reasons += [f"missing {s!r}" for s in row.must_include if normalize(s) not in text]
    reasons += [f"none of {list(group)!r}" for group in row.must_include_any
                if not any(normalize(s) in text for s in group)]
    reasons += [f"contains forbidden {s!r}" for s in row.must_not_include if normalize(s) and normalize(s) in text]
    return not reasons, reasons


def _contains(seq: Sequence[str], sub: Sequence[str]) -> int:
    """Start index of the first occurrence of sub in seq, or -1."""
    n = len(sub)
    return next((i for i in range(len(seq) - n + 1) if list(seq[i : i + n]) == list(sub)), -1)


def is_prompt_echo(prompt: str, reply: str) -> bool:
    """Does the reply parrot the prompt instead of answering it?

    Yes when the reply's words equal the prompt's, or when a prompt of three or more words reappears word
    for word and either opens the reply or makes up at least half of it. Short prompts ("Hello") are only
    an echo when the reply is nothing else, since repeating one word is often a fine answer.
    """
    p, r = words(prompt), words(reply)
    if not p or not r:
        return False
    if p == r:
        return True
    if len(p) < 3:
        return False
    at = _contains(r, p)
    return at == 0 or (at > 0 and len(p) >= len(r) / 2)


def is_refusal(reply: str) -> bool:
    """Does the reply decline or admit it does not know?"""
    return bool(_REFUSAL.search(normalize(reply)))


def _rate(rows: Sequence[dict[str, Any]], key: str = "pass") -> float | None:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else None


def _group(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": len(rows), "passed": sum(r["pass"] for r in rows), "pass_rate": _rate(rows)}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall, per-category, per-split, non-choice and answerable/unanswerable pass rates, echo and refusal rates,
    and the unsupported-claim rate (unanswerable rows answered instead of refused, over all rows)."""
    categories = sorted({r["category"] for r in results})
    splits = sorted({r.get("split", "default") for r in results})
    answerable = [r for r in results if r["answerable"]]
    unanswerable = [r for r in results if not r["answerable"]]
    claims = sum(1 for r in unanswerable if not r["refusal"])
    return {
        **_group(results),
        "by_category": {c: _group([r for r in results if r["category"] == c]) for c in categories},
        "by_split": {s: _group([r for r in results if r.get("split", "default") == s]) for s in splits},
        "non_choice": _group([r for r in results if not r.get("choice")]),
        "unsupported_claim_rate": claims / len(results) if results else None,
        "prompt_echo_rate": _rate(results, "prompt_echo"),
        "refusal_rate": _rate(results, "refusal"),
        "answerable": {**_group(answerable), "refusal_rate": _rate(answerable, "refusal")},
        "unanswerable": {**_group(unanswerable), "refusal_rate": _rate(unanswerable, "refusal")},
    }


def report_markdown(report: dict[str, Any], results: Sequence[dict[str, Any]], max_failures: int = 20) -> str:
    s = report["sampling"]
    lines = [
        "# Chat eval report", "",
        f"- input: `{report['input']}`",
        f"- rows: {report['rows']}, passed: {report['passed']} (**{percent(report['pass_rate'])}**)",
        f"- answerable: {report['answerable']['passed']}/{report['answerable']['rows']} "
        f"({percent(report['answerable']['pass_rate'])}); unanswerable: {report['unanswerable']['passed']}/"
        f"{report['unanswerable']['rows']} ({percent(report['unanswerable']['pass_rate'])})",
        f"- prompt echo: {percent(report['prompt_echo_rate'])}; refusals: {percent(report['refusal_rate'])} "
        f"(answerable {percent(report['answerable']['refusal_rate'])}, "
        f"unanswerable {percent(report['unanswerable']['refusal_rate'])})",
        f"- sampling: max_new_tokens {s['max_new_tokens']}, temperature {s['temperature']}, top_k {s['top_k']}, "
        f"top_p {s['top_p']}, seed {s['seed']}",
        "", "| category | rows | passed | pass rate |", "|---|---:|---:|---:|",
    ]
    lines += [f"| {c} | {g['rows']} | {g['passed']} | {percent(g['pass_rate'])} |"
              for c, g in report["by_category"].items()]
    if len(report.get("by_split", {})) > 1:
        lines += ["", "| split | rows | passed | pass rate |", "|---|---:|---:|---:|"]
        lines += [f"| {sp} | {g['rows']} | {g['passed']} | {percent(g['pass_rate'])} |"
                  for sp, g in report["by_split"].items()]
    failed = [r for r in results if not r["pass"]]
    if failed:
        lines += ["", f"## Failures (first {min(len(failed), max_failures)} of {len(failed)})", "",
                  "| line | category | prompt | reply | reasons |", "|---:|---|---|---|---|"]
        lines += [f"| {r['line']} | {r['category']} | {md_cell(r['prompt'])} | {md_cell(r['reply'])} | "
                  f"{md_cell('; '.join(r['reasons']))} |" for r in failed[:max_failures]]
    return "\n".join(lines) + "\n"


def evaluate_chat(engine: Engine, fmt: ChatFormat, rows: list[EvalRow], out_dir: Path,
                  sampling: SamplingParams, batch_size: int = 16, input_name: str | None = None) -> dict:
    """Generate, score, and write eval_results.jsonl, eval_report.json and eval_report.md under out_dir."""
    if not rows:
        raise ValueError("no eval rows to score")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    replies_ids = engine.generate([fmt.encode_prompt(r.prompt) for r in rows], sampling, fmt.stop_ids,
                                  batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    results = []
    for i, (row, ids) in enumerate(zip(rows, replies_ids, strict=True)):
        reply = fmt.decode(ids)
        passed, reasons = score_reply(row, reply)
        echo = is_prompt_echo(row.user, reply)
        if echo:  # parroting the question is never an answer, whatever words it happens to contain
            passed, reasons = False, [*reasons, "echoes the prompt"]
        results.append({
            "index": i, "line": row.line, "category": row.category, "answerable": row.answerable,
            "split": row.split, "choice": row.choice, "prompt": row.user,
            **({"messages": [asdict(m) for m in row.prompt]} if len(row.prompt) > 1 else {}),
            "reply": reply, "pass": passed, "reasons": reasons,
            "prompt_echo": echo, "refusal": is_refusal(reply),
            "reply_tokens": len(ids),
        })
    generated = sum(len(ids) for ids in replies_ids)
    report = {
        **summarize(results),
        "input": input_name if input_name is not None else rows[0].source,
        "sampling": asdict(sampling),
        "generated_tokens": generated,
        "generate_sec": elapsed,
        "tokens_per_sec": generated / elapsed if elapsed > 0 else None,
    }
    write_jsonl(out_dir / "eval_results.jsonl", results)
    save_json(out_dir / "eval_report.json", report)
    save_text(out_dir / "eval_report.md", report_markdown(report, results))
    return report
