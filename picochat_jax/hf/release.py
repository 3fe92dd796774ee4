"""Release evidence for a `train hf-sft` out-dir, through the full HF bridge: the fine-tuned model
(`final_model/`, merged) answers the eval rows, scores an external benchmark, and its eval rows are checked for
contamination against the SFT input it was trained on. `picochat gate OUT` then judges those files.

    OUT/eval/eval_report.json             eval chat on final_model (HF chat template)
    OUT/external_eval/...                 eval external (multiple choice) or eval chat rows
    OUT/honesty/honesty_report.json       eval rows vs the SFT input: exact, n-gram, near duplicates,
                                          and regurgitation of SFT answers in the replies
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hf_sft_report(out_dir: Path) -> dict[str, Any]:
    from picochat_jax.eval.gate import hf_report

    report = hf_report(out_dir)
    if not report:
        raise FileNotFoundError(f"{out_dir}: no hf_sft_report.json or hf_dpo_report.json: not a finished "
                                "`train hf-sft` or `train hf-dpo` folder")
    return report


def build_hf_evidence(out_dir: Path, eval_input: Path | None, external_input: Path | None = None,
                      max_new_tokens: int = 64, batch_size: int = 16, precision: str = "fp32") -> dict[str, Any]:
    """Write whatever evidence is missing under `out_dir` (never rewriting what is there). Returns what ran."""
    from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl
    from picochat_jax.eval.chat import evaluate_chat
    from picochat_jax.eval.honesty import run_honesty
    from picochat_jax.generate import SamplingParams
    from picochat_jax.hf.chat_format import load_hf_chat

    report = hf_sft_report(out_dir)
    model_dir = out_dir / "final_model"
    ran: dict[str, Any] = {}
    need_eval = eval_input is not None and not (out_dir / "eval" / "eval_report.json").exists()
    need_external = external_input is not None and not (out_dir / "external_eval").exists()
    if not (need_eval or need_external):
        return ran
    eval_rows = read_eval_jsonl(eval_input) if eval_input is not None else []
    engine, fmt = load_hf_chat(model_dir, precision=precision)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    if need_eval:
        ev = evaluate_chat(engine, fmt, eval_rows, out_dir / "eval", sampling, batch_size, str(eval_input))
        ran["eval"] = {"rows": ev["rows"], "pass_rate": ev["pass_rate"]}
        sft_input = Path(report["input"])
        if report.get("stage") == "hf-dpo":  # preference pairs: their prompts and chosen replies were trained on
            from picochat_jax.data.chat import preference_conversations
            from picochat_jax.data.records import read_preference_jsonl

            conversations = preference_conversations(read_preference_jsonl(sft_input), "chosen")
        else:
            conversations = read_chat_jsonl(sft_input) if sft_input.is_file() else []
        from picochat_jax.fileio import read_jsonl_objects

        replies = read_jsonl_objects(out_dir / "eval" / "eval_results.jsonl")
        answers = [c.target for c in conversations]  # no corpus: the SFT answers are the training text
        hon = run_honesty(out_dir / "honesty", eval_rows=eval_rows, conversations=conversations,
                          documents=answers, doc_labels=[f"{sft_input.name}:{c.line}" for c in conversations],
                          inputs={"sft_input": str(sft_input), "eval": str(eval_input), "model": str(model_dir)},
                          replies=[r["reply"] for r in replies],
                          reply_labels=[f"eval line {r['line']}" for r in replies])
        ran["honesty"] = hon["status"]
    if need_external:
        from picochat_jax.eval.external import evaluate_external, is_choice_file, read_choice_questions

        if is_choice_file(external_input):
            ext = evaluate_external(engine, fmt, read_choice_questions(external_input), out_dir / "external_eval",
                                    str(external_input), str(model_dir))
            ran["external_eval"] = {"questions": ext["questions"], "acc": ext["acc"]}
        else:
            ext = evaluate_chat(engine, fmt, read_eval_jsonl(external_input), out_dir / "external_eval", sampling,
                                batch_size, str(external_input))
            ran["external_eval"] = {"rows": ext["rows"], "pass_rate": ext["pass_rate"]}
    return ran
