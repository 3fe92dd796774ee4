"""`picochat eval chat|fit|loss`: score a native checkpoint on eval rows, its SFT rows, or chat loss."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import (
    device_option,
    friendly_errors,
    input_or_pack_file,
    out_dir_flags,
    plain_warnings,
    select_device,
)
from picochat_jax.outdir import check_out_dir, claim_out_dir


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate a checkpoint: held-out chat scoreboard, SFT fit, teacher-forced loss."""


def sampling_options(max_new_default: int = 64) -> Any:
    """Generation flags shared by `eval chat`, `eval fit` and `picochat chat`."""

    def decorate(fn: Any) -> Any:
        for opt in reversed([
            click.option("--max-new-tokens", type=click.IntRange(min=1), default=max_new_default, show_default=True),
            click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                         help="0 = greedy."),
            click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
            click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0,
                         show_default=True),
            click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        ]):
            fn = opt(fn)
        return fn

    return decorate


def sampling_from(opts: dict[str, Any]) -> Any:
    from picochat_jax.generate import SamplingParams

    return SamplingParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"],
                          top_k=opts["top_k"], top_p=opts["top_p"], seed=opts["seed"])


precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
                                show_default=True, help="Compute precision for generation.")


def model_options(fn: Any, allow_hf: bool = False) -> Any:
    hf_option = [click.option("--hf-model", default=None,
                              help="Instead of --checkpoint: an HF model folder or a hub id in the local HF cache "
                                   "(prompts use its own chat template).")]
    for opt in reversed([
        click.option("--checkpoint", "checkpoint_dir", required=not allow_hf,
                     type=click.Path(path_type=Path, file_okay=False),
                     help="Model folder, e.g. RUN/sft/checkpoint."),
        click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
                     help="tokenizer.json (default: the copy inside --checkpoint)."),
        *(hf_option if allow_hf else []),
        device_option, precision_option,
    ]):
        fn = opt(fn)
    return fn


def _load_engine(checkpoint_dir: Path | None, tokenizer_path: Path | None, hf_model: str | None,
                 precision: str) -> Any:
    """(Engine, ChatFormat) for exactly one of --checkpoint or --hf-model."""
    if (checkpoint_dir is None) == (hf_model is None):
        raise click.UsageError("give exactly one of --checkpoint or --hf-model")
    if hf_model is not None:
        if tokenizer_path is not None:
            raise click.UsageError("--tokenizer goes with --checkpoint; --hf-model uses the model's own tokenizer")
        from picochat_jax.hf.chat_format import load_hf_chat

        return load_hf_chat(hf_model, precision=precision)
    from picochat_jax.generate import load_native

    return load_native(checkpoint_dir, tokenizer_path, precision=precision)


input_options = [
    click.option("--input", "input_path", default=None, type=click.Path(path_type=Path)),
    click.option("--dataset-pack", "pack_path", default=None, type=click.Path(path_type=Path),
                 help="Read the pack's file instead of --input."),
]


def _with(options: list[Any]) -> Any:
    def decorate(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorate


@eval_group.command()
@functools.partial(model_options, allow_hf=True)
@_with(input_options)
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@out_dir_flags(resume=False)
@sampling_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@friendly_errors
def chat(checkpoint_dir: Path | None, tokenizer_path: Path | None, hf_model: str | None, device: str | None,
         precision: str, input_path: Path | None, pack_path: Path | None, out_dir: Path, overwrite: bool,
         batch_size: int, **opts: Any) -> None:
    """Answer every eval row and score it (must_include / must_include_any / must_not_include)."""
    select_device(device)
    from picochat_jax.data.records import read_eval_jsonl
    from picochat_jax.eval.chat import evaluate_chat

    path = input_or_pack_file(input_path, pack_path, "eval")
    rows = read_eval_jsonl(path)
    plan = check_out_dir(out_dir, "eval-chat", overwrite=overwrite, resumable=False,
                         inputs=[checkpoint_dir, tokenizer_path, hf_model and Path(hf_model), path, pack_path])
    engine, fmt = _load_engine(checkpoint_dir, tokenizer_path, hf_model, precision)
    claim_out_dir(plan)
    with plain_warnings():
        report = evaluate_chat(engine, fmt, rows, out_dir, sampling_from(opts), batch_size=batch_size,
                               input_name=str(path))
    click.echo(f"eval: {report['passed']}/{report['rows']} passed ({report['pass_rate']:.1%}); "
               f"prompt echo {report['prompt_echo_rate']:.1%}, refusals {report['refusal_rate']:.1%}")
    for cat, g in report["by_category"].items():
        click.echo(f"  {cat}: {g['passed']}/{g['rows']}")
    click.echo(f"report -> {out_dir / 'eval_report.md'}")


@eval_group.command()
@model_options
@_with(input_options)
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@out_dir_flags(resume=False)
@sampling_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Replay only the first N rows.")
@friendly_errors
def fit(checkpoint_dir: Path, tokenizer_path: Path | None, device: str | None, precision: str,
        input_path: Path | None, pack_path: Path | None, out_dir: Path, overwrite: bool, batch_size: int,
        max_rows: int | None, **opts: Any) -> None:
    """Replay SFT rows through the model: how many trained answers does it reproduce?"""
    select_device(device)
    from picochat_jax.data.records import read_chat_jsonl
    from picochat_jax.eval.fit import sft_fit_report
    from picochat_jax.generate import load_native

    chat_path = input_or_pack_file(input_path, pack_path, "chat")
    conversations = read_chat_jsonl(chat_path)
    plan = check_out_dir(out_dir, "eval-fit", overwrite=overwrite, resumable=False,
                         inputs=[checkpoint_dir, tokenizer_path, chat_path, pack_path])
    engine, fmt = load_native(checkpoint_dir, tokenizer_path, precision=precision)
    claim_out_dir(plan)
    with plain_warnings():
        report = sft_fit_report(engine, fmt, conversations, out_dir, sampling_from(opts), batch_size=batch_size,
                                max_rows=max_rows)
    click.echo(f"sft fit: {report['reproduced']}/{report['rows']} reproduced ({report['reproduced_rate']:.1%}), "
               f"mean F1 {report['mean_f1']:.3f}; report -> {out_dir / 'fit_report.md'}")


@eval_group.command()
@model_options
@_with(input_options)
@click.option("--out-dir", default=None, type=click.Path(path_type=Path),
              help="Also write loss_report.json here.")
@out_dir_flags(resume=False)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--all-assistant-turns", is_flag=True, help="Score every assistant turn, not only the last.")
@friendly_errors
def loss(checkpoint_dir: Path, tokenizer_path: Path | None, device: str | None, precision: str,
         input_path: Path | None, pack_path: Path | None, out_dir: Path | None, overwrite: bool, batch_size: int,
         all_assistant_turns: bool) -> None:
    """Teacher-forced loss and bits per byte on the assistant targets of chat JSONL."""
    select_device(device)
    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint
    from picochat_jax.data.records import read_chat_jsonl
    from picochat_jax.eval.fit import assistant_loss
    from picochat_jax.fileio import save_json
    from picochat_jax.tokenizer import ChatTokenizer

    chat_path = input_or_pack_file(input_path, pack_path, "chat")
    conversations = read_chat_jsonl(chat_path)
    plan = None if out_dir is None else check_out_dir(out_dir, "eval-loss", overwrite=overwrite, resumable=False,
                                                      inputs=[checkpoint_dir, tokenizer_path, chat_path, pack_path])
    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    tok = ChatTokenizer.load(tokenizer_path)
    params, model_cfg, _ = load_model_checkpoint(checkpoint_dir)
    result = assistant_loss(params, model_cfg, tok, conversations, batch_size, precision,
                            all_assistant_turns)
    click.echo(f"loss {result['loss']:.4f}, bpb {result['bpb']:.4f} over {result['tokens']:,} target tokens "
               f"in {result['rows']} rows" + (f" ({result['truncated_rows']} left-truncated)"
                                               if result["truncated_rows"] else ""))
    if plan is not None:
        claim_out_dir(plan)
        save_json(Path(out_dir) / "loss_report.json", result)


@eval_group.command()
@functools.partial(model_options, allow_hf=True)
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Multiple-choice questions: .jsonl, .json or .csv (generic, ARC or MMLU shapes).")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@out_dir_flags(resume=False)
@click.option("--bootstrap-samples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Resamples for the 95% confidence intervals (0 = none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@friendly_errors
def external(checkpoint_dir: Path | None, tokenizer_path: Path | None, hf_model: str | None, device: str | None,
             precision: str, input_path: Path, out_dir: Path, overwrite: bool, bootstrap_samples: int,
             seed: int) -> None:
    """Score ARC/MMLU-style multiple choice by log-likelihood (raw and byte-normalised), per subject, with
    bootstrap confidence intervals."""
    select_device(device)
    from picochat_jax.eval.external import evaluate_external, read_choice_questions

    questions = read_choice_questions(input_path)
    plan = check_out_dir(out_dir, "eval-external", overwrite=overwrite, resumable=False,
                         inputs=[checkpoint_dir, tokenizer_path, hf_model and Path(hf_model), input_path])
    engine, fmt = _load_engine(checkpoint_dir, tokenizer_path, hf_model, precision)
    claim_out_dir(plan)
    summary = evaluate_external(engine, fmt, questions, out_dir, str(input_path),
                                str(checkpoint_dir or hf_model), bootstrap_samples, seed)
    lo, hi = summary["acc_ci95"]
    click.echo(f"external: acc {summary['acc']:.1%} (95% CI {lo:.1%}-{hi:.1%}), acc_norm {summary['acc_norm']:.1%} "
               f"on {summary['questions']} questions (chance {summary['chance']:.1%})")
    for name, b in summary["subjects"].items():
        click.echo(f"  {name}: acc {b['acc']:.1%}, acc_norm {b['acc_norm']:.1%} ({b['questions']})")
    click.echo(f"report -> {out_dir / 'external_report.md'}")
