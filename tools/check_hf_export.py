"""Export a native checkpoint to a Hugging Face folder and check it in transformers' own model code.

Three checks on the eval prompts of a pack (or any eval JSONL), all in float32:
1. transformers' tokenizer with the exported chat template gives our prompt ids;
2. transformers' logits over each prompt followed by its reference answer (or the prompt alone) equal ours:
   the largest absolute difference and the share of positions with the same argmax;
3. greedy replies: transformers `generate(do_sample=False)` against our decode engine, token for token.

    python tools/check_hf_export.py --checkpoint RUN/sft/checkpoint --eval PACK/eval.jsonl --out-dir CHECK

Writes CHECK/hf/ (the export, by `picochat export hf`'s function) and CHECK/hf_export_check.json; exits 1 when
a check fails (logit difference above --atol, or any greedy reply differs).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _ours_logits(model, params, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model.apply({"params": params}, jnp.asarray([ids], jnp.int32)), np.float32)[0]


def check(checkpoint: Path, eval_path: Path, out_dir: Path, prompts: int, max_new_tokens: int,
          atol: float) -> dict:
    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint
    from picochat_jax.data.records import read_eval_jsonl
    from picochat_jax.fileio import save_json
    from picochat_jax.generate import Engine, NativeChatFormat, SamplingParams
    from picochat_jax.hf.export import export_native
    from picochat_jax.model.transformer import make_model
    from picochat_jax.tokenizer import ChatTokenizer

    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: give a new or empty folder")
    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 on GPU too, not TF32
    started = time.perf_counter()
    family, hf_dir = export_native(checkpoint, None, out_dir / "hf")
    params, cfg, _ = load_model_checkpoint(checkpoint)
    tok = ChatTokenizer.load(checkpoint_tokenizer(checkpoint, None))
    fmt = NativeChatFormat(tok)
    rows = read_eval_jsonl(eval_path)[:prompts]
    messages = [[{"role": m.role, "content": m.content} for m in r.prompt] for r in rows]
    ours_prompts = [fmt.encode_prompt(r.prompt) for r in rows]

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    hf_prompts = [list(hf_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for m in messages]

    model = make_model(cfg, "fp32")
    logit_rows = []
    for row, ids in zip(rows, ours_prompts, strict=True):
        full = ids + (tok.encode(row.reference) if row.reference else [])
        full = full[:cfg.max_seq_len]
        ours = _ours_logits(model, params, full)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([full])).logits[0].float().numpy()
        logit_rows.append({"line": row.line, "tokens": len(full), "max_abs_diff": float(np.abs(ours - theirs).max()),
                           "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean())})

    engine = Engine(params, cfg, precision="fp32", max_batch=max(1, len(rows)))
    ours_replies = engine.generate(ours_prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                                   stop_ids=[tok.end_id])
    replies = []
    for row, ids, ours in zip(rows, hf_prompts, ours_replies, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.end_id,
                                    pad_token_id=tok.pad_id)
        theirs = out[0, len(ids):].tolist()
        if theirs and theirs[-1] == tok.end_id:
            theirs = theirs[:-1]
        replies.append({"line": row.line, "prompt": row.prompt[-1].content, "ours": tok.decode(ours),
                        "transformers": tok.decode(theirs), "same_tokens": list(ours) == theirs})

    import transformers

    report = {
        "checkpoint": str(checkpoint), "hf_dir": str(hf_dir), "family": family,
        "architecture": type(hf_model).__name__, "prompts": len(rows), "max_new_tokens": max_new_tokens,
        "chat_template_ids_equal": sum(a == b for a, b in zip(ours_prompts, hf_prompts, strict=True)),
        "logits": {"atol": atol, "max_abs_diff": max(r["max_abs_diff"] for r in logit_rows),
                   "min_argmax_agree": min(r["argmax_agree"] for r in logit_rows), "rows": logit_rows},
        "greedy_equal": sum(r["same_tokens"] for r in replies), "replies": replies,
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "jax_backend": jax.default_backend()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["passed"] = (report["chat_template_ids_equal"] == len(rows) and report["greedy_equal"] == len(rows)
                        and report["logits"]["max_abs_diff"] <= atol)
    save_json(out_dir / "hf_export_check.json", report)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="native model folder, e.g. RUN/sft/checkpoint")
    parser.add_argument("--eval", type=Path, required=True, help="eval JSONL whose prompts are used")
    parser.add_argument("--out-dir", type=Path, required=True, help="new or empty folder")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--atol", type=float, default=1e-3, help="largest logit difference allowed (fp32)")
    args = parser.parse_args(argv)
    report = check(args.checkpoint, args.eval, args.out_dir, args.prompts, args.max_new_tokens, args.atol)
    print(f"{report['architecture']}: chat template ids {report['chat_template_ids_equal']}/{report['prompts']}, "
          f"max |logit diff| {report['logits']['max_abs_diff']:.2e}, greedy replies equal "
          f"{report['greedy_equal']}/{report['prompts']} -> {'PASS' if report['passed'] else 'FAIL'}")
    if not report["passed"] and argv is None:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
