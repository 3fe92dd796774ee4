"""External multiple-choice benchmarks (ARC/MMLU style), scored by log-likelihood as evaluation harnesses do.

Rows come from JSONL, JSON (a list, or `{"data": [...]}`) or CSV, in any of these shapes:

* generic: `question`, `choices` (a list of strings), `answer` (0-based index or letter);
* ARC: `question`, `choices: {"label": [...], "text": [...]}` (or a list of `{label, text}`), `answerKey`;
* MMLU: `question`, `A`..`D`, `answer` (letter or index); a CSV without a header is question,A,B,C,D,answer.

`subject` (or `category`) groups the accuracy. Each choice is scored as the continuation `" " + choice` of the
context `"Question: {question}\\nAnswer:"`: its summed token log-probability (`acc`), and that sum divided by the
choice's length in UTF-8 bytes (`acc_norm`, lm-evaluation-harness's normalisation). All (question, choice)
sequences go through `Engine.score`, one jitted batched forward pass per batch. Accuracies carry 95% bootstrap
intervals (questions resampled with replacement, seeded).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picochat_jax.data.records import DataError
from picochat_jax.fileio import save_json, save_text, write_jsonl

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceQuestion:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str
    id: str
    line: int


def _answer_index(value: Any, labels: list[str], path: Path, line: int) -> int:
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    if text.upper() in LETTERS[:len(labels)]:
        return LETTERS.index(text.upper())
    if text.isdigit() and 0 <= int(text) < len(labels):
        return int(text)
    raise DataError(path, line, "answer", f"{value!r} is not one of the choices' labels {labels} or an index")


def _question(row: dict[str, Any], path: Path, line: int) -> ChoiceQuestion:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, line, "question", "must be a non-empty string")
    raw = row.get("choices")
    if isinstance(raw, dict):
        labels, texts = [str(x) for x in raw.get("label", [])], [str(x) for x in raw.get("text", [])]
    elif isinstance(raw, list) and raw and all(isinstance(c, dict) for c in raw):
        labels = [str(c.get("label", LETTERS[i])) for i, c in enumerate(raw)]
        texts = [str(c.get("text", "")) for c in raw]
    elif isinstance(raw, list):
        texts = [str(c) for c in raw]
        labels = list(LETTERS[:len(texts)])
    elif all(k in row for k in "ABCD"):
        labels = [k for k in LETTERS if k in row]
        texts = [str(row[k]) for k in labels]
    else:
        raise DataError(path, line, "choices", "give `choices` (a list, or ARC's {label, text}) or columns A..D")
    if len(texts) < 2 or len(labels) != len(texts) or any(not t.strip() for t in texts):
        raise DataError(path, line, "choices", "need two or more non-empty choices, one label each")
    answer = row.get("answer", row.get("answerKey", row.get("target")))
    if answer is None:
        raise DataError(path, line, "answer", "missing (answer, answerKey or target)")
    subject = str(row.get("subject") or row.get("category") or "all")
    return ChoiceQuestion(question.strip(), tuple(t.strip() for t in texts), _answer_index(answer, labels, path, line),
                          subject, str(row.get("id") or f"{path.stem}-{line}"), line)


def read_choice_questions(path: Path | str) -> list[ChoiceQuestion]:
    """Multiple-choice rows from .jsonl, .json or .csv; a bad row names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"external eval file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, Any]]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(path, n, None, f"is not valid JSON ({exc.msg})") from None
    elif suffix == ".json":
        data = json.loads(text)
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise DataError(path, None, None, "must hold a list of questions (or {\"data\": [...]})")
        rows = list(enumerate(data, start=1))
    elif suffix == ".csv":
        lines = text.splitlines()
        header = {c.strip().lower() for c in (lines[0].split(",") if lines else [])}
        if {"question", "answer"} & header:
            rows = [(n, dict(r)) for n, r in enumerate(csv.DictReader(lines), start=2)]
        else:  # MMLU's own CSVs: question, A, B, C, D, answer
            rows = [(n, {"question": r[0], "A": r[1], "B": r[2], "C": r[3], "D": r[4], "answer": r[5]})
                    for n, r in enumerate(csv.reader(lines), start=1) if len(r) >= 6]
    else:
        raise DataError(path, None, None, "external eval input must be .jsonl, .json or .csv")
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(path, n, None, "each question must be an object")
        out.append(_question(row, path, n))
    if not out:
        raise DataError(path, None, None, "holds no questions")
    return out


def is_choice_file(path: Path | str) -> bool:
    """Whether an eval file holds multiple-choice questions (JSON, CSV, or JSONL rows with choices) rather than
    chat eval rows: `run tiny` scores a pack's `external_eval` by log-likelihood when it does."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".csv"):
        return True
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("choices" in row or "answerKey" in row or "A" in row)
    return False


def context_text(q: ChoiceQuestion) -> str:
    return f"Question: {q.question}\nAnswer:"


def score_questions(engine: Any, fmt: Any, questions: list[ChoiceQuestion]) -> list[dict[str, Any]]:
    """Per question: each choice's summed log-likelihood and byte-normalised log-likelihood, the picks."""
    sequences, spans = [], []
    for q in questions:
        context = fmt.encode_text(context_text(q))
        for choice in q.choices:
            whole = fmt.encode_text(context_text(q) + " " + choice)
            # The choice's tokens start where the whole sequence stops agreeing with the context alone (a BPE
            # merge across the seam moves it back); a sequence over the context loses its oldest tokens.
            start = next((i for i, (a, b) in enumerate(zip(whole, context, strict=False)) if a != b),
                         min(len(whole), len(context)))
            sequences.append(whole[-engine.max_len:])
            spans.append(start - (len(whole) - len(sequences[-1])))
    scored = engine.score(sequences)
    results, k = [], 0
    for q in questions:
        ll, norm = [], []
        for choice in q.choices:
            s = scored[k]
            total = float(sum(lp for lp in s.logprobs[max(spans[k], 1):] if lp is not None))
            ll.append(total)
            norm.append(total / max(1, len((" " + choice).encode("utf-8"))))
            k += 1
        pick, pick_norm = int(np.argmax(ll)), int(np.argmax(norm))
        results.append({"id": q.id, "subject": q.subject, "question": q.question, "choices": list(q.choices),
                        "answer": q.answer, "loglikelihood": ll, "loglikelihood_norm": norm, "pick": pick,
                        "pick_norm": pick_norm, "correct": pick == q.answer, "correct_norm": pick_norm == q.answer})
    return results


def bootstrap_interval(values: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the values with replacement."""
    if len(values) == 0 or samples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(results: list[dict[str, Any]], samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    def block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        acc = np.asarray([r["correct"] for r in rows], float)
        norm = np.asarray([r["correct_norm"] for r in rows], float)
        chance = float(np.mean([1 / len(r["choices"]) for r in rows]))
        return {"questions": len(rows), "acc": float(acc.mean()), "acc_ci95": bootstrap_interval(acc, samples, seed),
                "acc_norm": float(norm.mean()), "acc_norm_ci95": bootstrap_interval(norm, samples, seed),
                "chance": chance}

    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_subject[r["subject"]].append(r)
    return {**block(results), "bootstrap_samples": samples, "seed": seed,
            "subjects": {s: block(rows) for s, rows in sorted(by_subject.items())}}


def report_markdown(summary: dict[str, Any], source: str, model: str) -> str:
    def row(name: str, b: dict[str, Any]) -> str:
        lo, hi = b["acc_ci95"]
        nlo, nhi = b["acc_norm_ci95"]
        return (f"| {name} | {b['questions']} | {b['acc']:.1%} ({lo:.1%}–{hi:.1%}) | "
                f"{b['acc_norm']:.1%} ({nlo:.1%}–{nhi:.1%}) | {b['chance']:.1%} |")

    lines = [f"# External multiple-choice eval: {source}", "", f"- model: `{model}`",
             f"- scoring: log-likelihood of each choice after `Question: ...\\nAnswer:`; acc_norm divides by the "
             f"choice's UTF-8 bytes; 95% bootstrap intervals over {summary['bootstrap_samples']} resamples", "",
             "| subject | questions | acc (95% CI) | acc_norm (95% CI) | chance |", "|---|---:|---:|---:|---:|",
             row("**all**", summary)]
    lines += [row(name, b) for name, b in summary["subjects"].items()]
    return "\n".join(lines) + "\n"


def evaluate_external(engine: Any, fmt: Any, questions: list[ChoiceQuestion], out_dir: Path, source: str,
                      model: str, bootstrap_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score, summarise and write external_results.jsonl, external_summary.json, external_report.md."""
    results = score_questions(engine, fmt, questions)
    summary = {"source": source, "model": model, **summarize(results, bootstrap_samples, seed)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "external_results.jsonl", results)
    save_json(out_dir / "external_summary.json", summary)
    save_text(out_dir / "external_report.md", report_markdown(summary, source, model))
    return summary
