"""How well the model fits its own SFT rows: replayed generations and teacher-forced loss.

`sft_fit_report` is the practice score next to the eval scoreboard: every SFT row's prompt (all messages
but the last) goes through the engine and the reply is compared with the trained target, exactly (after
case and whitespace normalisation) and by word-overlap F1. A model that cannot reproduce rows it was
trained on is under-fitted; one that reproduces them all but fails the held-out eval has memorised.

`assistant_loss` is the teacher-forced view of the same rows: mean cross-entropy and bits per byte over the
assistant-target tokens only, computed with the training step's own loss pieces.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax.config import ModelConfig
from picochat_jax.data.records import Conversation
from picochat_jax.eval.text import normalize, words
from picochat_jax.fileio import save_json, save_text, write_jsonl
from picochat_jax.generate import ChatFormat, Engine, SamplingParams
from picochat_jax.markdown import md_cell, percent
from picochat_jax.model.transformer import make_model
from picochat_jax.tokenizer import ChatTokenizer


def token_f1(reply: str, target: str) -> float:
    """SQuAD-style F1 over lower-cased words (multiset overlap)."""
    r, t = words(reply), words(target)
    if not r or not t:
        return float(r == t)
    common = sum((Counter(r) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(r), common / len(t)
    return 2 * precision * recall / (precision + recall)


def _fit_group(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    reproduced = sum(r["reproduced"] for r in rows)
    return {"rows": n, "reproduced": reproduced, "reproduced_rate": reproduced / n if n else None,
            "mean_f1": float(np.mean([r["f1"] for r in rows])) if n else None}


def fit_markdown(report: dict[str, Any], results: Sequence[dict[str, Any]], max_misses: int = 20) -> str:
    lines = ["# SFT fit report", "",
             f"- input: `{report['input']}`",
             f"- rows replayed: {report['rows']} of {report['total_rows']}",
             f"- reproduced exactly: {report['reproduced']} (**{percent(report['reproduced_rate'])}**), "
             f"mean word F1 {report['mean_f1']:.3f}",
             f"- max_new_tokens: {report['sampling']['max_new_tokens']}, "
             f"temperature {report['sampling']['temperature']}",
             "", "| category | rows | reproduced | rate | mean F1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c} | {g['rows']} | {g['reproduced']} | {percent(g['reproduced_rate'])} | {g['mean_f1']:.3f} |"
              for c, g in report["by_category"].items()]
    misses = sorted((r for r in results if not r["reproduced"]), key=lambda r: r["f1"])
    if misses:
        lines += ["", f"## Lowest-F1 misses (first {min(len(misses), max_misses)} of {len(misses)})", "",
                  "| line | F1 | prompt | target | reply |", "|---:|---:|---|---|---|"]
        lines += [f"| {r['line']} | {r['f1']:.2f} | {md_cell(r['prompt'], 80)} | {md_cell(r['target'], 80)} | "
                  f"{md_cell(r['reply'], 80)} |" for r in misses[:max_misses]]
    return "\n".join(lines) + "\n"


def sft_fit_report(engine: Engine, fmt: ChatFormat, conversations: list[Conversation], out_dir: Path,
                   sampling: SamplingParams, batch_size: int = 16, max_rows: int | None = None) -> dict:
    """Replay SFT rows; writes fit_results.jsonl, fit_report.json and fit_report.md under out_dir.

    `max_rows` keeps the first rows of the file (a fixed, reproducible subset). The token budget is raised
    to the longest target (+1 for the stop token, at most half the context) so a long target is never
    counted as a miss only because generation was cut short.
    """
    if not conversations:
        raise ValueError("no SFT rows to replay")
    out_dir = Path(out_dir)
    rows = conversations[:max_rows] if max_rows else list(conversations)
    longest = max(len(fmt.encode_text(c.target)) for c in rows) + 1
    budget = max(sampling.max_new_tokens, min(longest, engine.max_len // 2))
    sampling = replace(sampling, max_new_tokens=budget)
    t0 = time.perf_counter()
    replies = engine.generate([fmt.encode_prompt(c.prompt_messages) for c in rows], sampling, fmt.stop_ids,
                              batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    results = []
    for i, (conv, ids) in enumerate(zip(rows, replies, strict=True)):
        reply = fmt.decode(ids)
        results.append({"index": i, "line": conv.line, "category": conv.category, "prompt": conv.last_user,
                        "target": conv.target, "reply": reply,
                        "reproduced": bool(normalize(reply)) and normalize(reply) == normalize(conv.target),
                        "f1": token_f1(reply, conv.target)})
    categories = sorted({r["category"] for r in results})
    report = {
        **_fit_group(results),
        "total_rows": len(conversations),
        "by_category": {c: _fit_group([r for r in results if r["category"] == c]) for c in categories},
        "input": conversations[0].source,
        "sampling": asdict(sampling),
        "generate_sec": elapsed,
    }
    write_jsonl(out_dir / "fit_results.jsonl", results)
    save_json(out_dir / "fit_report.json", report)
    save_text(out_dir / "fit_report.md", fit_markdown(report, results))
    return report


def assistant_loss(params: Any, model_cfg: ModelConfig, tok: ChatTokenizer, conversations: list[Conversation],
                   batch_size: int = 16, precision: str = "fp32", all_assistant_turns: bool = False) -> dict:
    """Teacher-forced mean loss and bits per byte over the assistant-target tokens of chat rows."""
    from picochat_jax.data.chat import sft_examples
    from picochat_jax.model.loss import loss_sums

    if not conversations:
        raise ValueError("no chat rows to score")
    examples, truncated = sft_examples(conversations, tok, model_cfg.max_seq_len, all_assistant_turns)
    model = make_model(model_cfg, precision)
    token_bytes = jnp.asarray(tok.token_byte_lengths(), jnp.float32)
    sums_fn = jax.jit(lambda p, b: loss_sums(model, p, b, token_bytes))
    n = len(examples["inputs"])
    batch_size = min(batch_size, n)
    totals = np.zeros(3)
    for start in range(0, n, batch_size):
        # Wrap the last batch to full size (one compiled shape) and zero the wrapped rows' mask.
        idx = np.arange(start, start + batch_size) % n
        batch = {k: v[idx] for k, v in examples.items()}
        batch["loss_mask"] = batch["loss_mask"] * (np.arange(start, start + batch_size) < n)[:, None]
        totals += np.array(jax.device_get(sums_fn(params, batch)), np.float64)
    ce, tokens, nbytes = totals
    return {"rows": n, "tokens": int(tokens), "loss": ce / max(tokens, 1.0),
            "bpb": ce / (math.log(2) * max(nbytes, 1.0)), "truncated_rows": truncated,
            "input": conversations[0].source}
