"""`picochat export hf`, `picochat import hf` and `picochat train hf-sft` (Path B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import (
    config_default,
    device_option,
    friendly_errors,
    mesh_option,
    out_dir_flags,
    resolve_flags,
    select_device,
    set_option,
)


@click.group(name="export")
def export() -> None:
    """Export native checkpoints to other ecosystems."""


@export.command(name="hf")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(path_type=Path),
              help="Native model folder (e.g. RUN/sft/checkpoint).")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json (default: the one inside --checkpoint).")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@out_dir_flags(resume=False)
@friendly_errors
def export_hf(checkpoint_dir: Path, tokenizer_path: Path | None, out_dir: Path, overwrite: bool) -> None:
    """Write a folder that stock transformers loads (AutoModelForCausalLM, AutoTokenizer, chat template)."""
    from picochat_jax.hf.export import export_native

    family, path = export_native(checkpoint_dir, tokenizer_path, out_dir, overwrite=overwrite)
    click.echo(f"exported {checkpoint_dir} as {family} -> {path}")


@click.group(name="import")
def import_group() -> None:
    """Import models from other ecosystems."""


@import_group.command(name="hf")
@click.option("--model", required=True, help="HF model folder, or a hub id already in the local HF cache.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path),
              help="Native checkpoint folder to write (params, model_config.json, HF tokenizer files).")
@out_dir_flags(resume=False)
@friendly_errors
def import_hf(model: str, out_dir: Path, overwrite: bool) -> None:
    """Convert an HF causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2 shaped) into a native checkpoint."""
    from picochat_jax.hf.export import save_imported_checkpoint
    from picochat_jax.hf.io import load_hf_model
    from picochat_jax.model.transformer import count_params
    from picochat_jax.outdir import check_out_dir

    plan = check_out_dir(out_dir, "import-hf", overwrite=overwrite, resumable=False,
                         inputs=[Path(model)])
    hf = load_hf_model(model)
    save_imported_checkpoint(hf, plan.path, str(model))
    c = hf.config
    click.echo(f"imported {hf.family} ({c.n_layers} layers, d_model {c.d_model}, {c.n_heads}/{c.n_kv_heads} heads, "
               f"vocab {c.vocab_size}, {count_params(hf.params):,} params) -> {out_dir}")


def _hf_sft_option(name: str, kind: Any, help_text: str = "") -> Any:
    key = name.lstrip("-").replace("-", "_")
    return click.option(name, key, type=kind, default=None, help=f"{help_text} {config_default('hf_sft', key)}".strip())


def hf_train_options(input_help: str, packing: bool) -> Any:
    """The options `train hf-sft` and `train hf-dpo` share (the original picochat's hf-sft flags)."""
    options = [
        click.option("--model", required=True, help="HF model folder, or a hub id already in the local HF cache."),
        click.option("--revision", default=None, help="Branch, tag or commit of a hub id (from the local cache)."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Accepted for compatibility: picochat maps supported families onto its own decoder and "
                          "never runs code shipped with a checkpoint (such models are refused with the reason)."),
        click.option("--eval-input", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Eval JSONL scored with final_model at the end (-> OUT/eval, summarised in the report)."),
        click.option("--input", "input_path", required=True, type=click.Path(path_type=Path), help=input_help),
        click.option("--out-dir", required=True, type=click.Path(path_type=Path)),
        _hf_sft_option("--max-steps", click.IntRange(min=1)),
        _hf_sft_option("--max-length", click.IntRange(min=2),
                       "Tokens per row; longer rows are left-truncated (the target is kept)."),
        device_option,
        click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
                     help="Compute precision (default: bf16 on accelerators, fp32 on CPU)."),
        click.option("--gradient-checkpointing", is_flag=True,
                     help="Recompute blocks in the backward pass (less memory)."),
        _hf_sft_option("--peft", click.Choice(["lora", "none"]), "lora: train adapters only; none: full fine-tuning."),
        click.option("--quantize", type=click.Choice(["none", "4bit"]), default="none", show_default=True,
                     help="4bit: QLoRA, the frozen base's projections stored as NF4 with double-quantised scales "
                          "and expanded layer by layer inside the step (needs --peft lora)."),
        click.option("--done-file", type=click.Path(path_type=Path), default="done.txt", show_default=True,
                     help="JSON status + output paths, written last (also on failure); a bare name goes inside "
                          "--out-dir."),
        click.option("--progress-file", type=click.Path(path_type=Path), default=None,
                     help="JSON status (loading, training: step, loss, lr, done) rewritten at every log step; a bare "
                          "name goes inside --out-dir."),
        out_dir_flags(),
        click.option("--no-progress", is_flag=True, help="No progress bar (logs only)."),
        click.option("--tensorboard-dir", type=click.Path(path_type=Path), default=None,
                     help="Write TensorBoard events here (default: beside metrics.jsonl in --out-dir)."),
        _hf_sft_option("--lora-rank", int),
        _hf_sft_option("--lora-alpha", float),
        _hf_sft_option("--lora-dropout", float, "Only 0 is supported."),
        _hf_sft_option("--lora-targets", str, "Comma-separated projections (q_proj,... or q,k,v,o,gate,up,down)."),
        _hf_sft_option("--learning-rate", float),
        _hf_sft_option("--batch-size", click.IntRange(min=1), "Rows per micro-batch (divisible by the mesh's "
                                                               "data*fsdp)."),
        _hf_sft_option("--grad-accum-steps", click.IntRange(min=1)),
        _hf_sft_option("--val-fraction", float, "Held-out share of the rows; its loss picks best_model/."),
        *([_hf_sft_option("--packing", click.Choice(["bos_bestfit", "none"]),
                          "Pack several chat rows into each training row by best fit (each keeps its own attention "
                          "segment, positions and assistant mask: the same loss as one row each) or one padded row "
                          "each."),
           _hf_sft_option("--ce-chunk-tokens", click.IntRange(min=0),
                          "Cross-entropy in chunks of about N tokens (0: whole batch): the same loss, less memory "
                          "for large vocabularies.")] if packing else []),
        click.option("--lr-warmup-steps", type=click.IntRange(min=0), default=None,
                     help="Warmup steps (default: hf_sft.warmup_fraction of --max-steps)."),
        click.option("--lr-decay", type=click.Choice(["cosine", "linear", "none"]), default=None,
                     help="Decay after warmup. " + config_default("hf_sft", "decay")),
        click.option("--min-lr-ratio", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Final learning rate / peak. " + config_default("hf_sft", "min_lr_ratio")),
        mesh_option, set_option, friendly_errors,
    ]

    def decorate(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorate


def _hf_train(objective: str, model: str, revision: str | None, trust_remote_code: bool, eval_input: Path | None,
              input_path: Path, out_dir: Path, device: str | None, precision: str | None,
              gradient_checkpointing: bool, done_file: Path | None, progress_file: Path | None, overwrite: bool,
              resume: bool, resume_or_start: bool, no_progress: bool, mesh: str | None, sets: tuple[str, ...],
              lr_warmup_steps: int | None, lr_decay: str | None, min_lr_ratio: float | None,
              tensorboard_dir: Path | None, quantize: str, extra: dict[str, Any], **flags: Any) -> dict[str, Any]:
    select_device(device)
    import dataclasses

    import jax

    from picochat_jax.config import load_defaults
    from picochat_jax.hf.sft import HFSFTOptions, run_hf_sft
    from picochat_jax.model.lora import LoraConfig, parse_targets

    cfg = load_defaults(sets).hf_sft
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("warmup_steps", lr_warmup_steps), ("decay", lr_decay),
                                                          ("min_lr_ratio", min_lr_ratio)) if v is not None})
    f = resolve_flags({"packing": None, "ce_chunk_tokens": None, **flags}, cfg)
    precision = precision or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    lora_cfg = LoraConfig()
    if f["peft"] == "lora":
        lora_cfg = LoraConfig(rank=f["lora_rank"], alpha=f["lora_alpha"], dropout=f["lora_dropout"],
                              targets=parse_targets(f["lora_targets"]))
    opts = HFSFTOptions(model=model, input=input_path, out_dir=out_dir, max_steps=f["max_steps"],
                        max_length=f["max_length"], precision=precision, gradient_checkpointing=gradient_checkpointing,
                        peft=f["peft"], lora=lora_cfg, learning_rate=f["learning_rate"], batch_size=f["batch_size"],
                        grad_accum_steps=f["grad_accum_steps"], val_fraction=f["val_fraction"], mesh=mesh,
                        done_file=done_file, progress_file=progress_file, overwrite=overwrite, resume=resume,
                        resume_or_start=resume_or_start, progress=not no_progress, evals_per_run=cfg.evals_per_run,
                        optimizer=cfg, revision=revision, trust_remote_code=trust_remote_code, eval_input=eval_input,
                        packing=f["packing"] if objective == "sft" else "none", objective=objective,
                        tensorboard_dir=tensorboard_dir, quantize=quantize,
                        ce_chunk_tokens=f["ce_chunk_tokens"] if objective == "sft" else 0, **extra)
    report = run_hf_sft(opts)
    if report["status"] != "completed":
        click.echo(f"{report.get('stage', 'hf-' + objective)} interrupted at step {report['step']}; continue with "
                   "--resume", err=True)
        raise SystemExit(3)
    return report


@click.command(name="hf-sft")
@hf_train_options("Chat JSONL.", packing=True)
def hf_sft(**kwargs: Any) -> None:
    """Fine-tune an HF model on chat rows rendered with its own chat template (loss on the final answer)."""
    from picochat_jax.markdown import number

    report = _hf_train("sft", extra={}, **kwargs)
    click.echo(f"hf-sft: held-out loss {number(report['initial_val_loss'], '.4f')} -> best "
               f"{number(report['best_val_loss'], '.4f')} "
               f"(step {report['best_step']}); models in {kwargs['out_dir']}")


@click.command(name="hf-dpo")
@hf_train_options("Preference JSONL (prompt/user or messages, chosen, rejected), as native DPO reads.",
                  packing=False)
@click.option("--beta", type=click.FloatRange(min=0.0, min_open=True), default=0.1, show_default=True,
              help="DPO beta: the pull towards the reference model.")
@click.option("--reference-model", default=None,
              help="Frozen reference (HF folder or cached hub id; default: --model as loaded).")
def hf_dpo(beta: float, reference_model: str | None, **kwargs: Any) -> None:
    """Preference-tune an HF model with DPO (LoRA or full), on its own chat template; the same outputs as
    hf-sft (merged models, PEFT adapters, report, done file) with reward accuracy and margins in the report."""
    report = _hf_train("dpo", extra={"beta": beta, "reference_model": reference_model}, **kwargs)
    d = report["dpo"]
    click.echo(f"hf-dpo: reward accuracy {d['before']['reward_accuracy']:.2f} -> {d['after']['reward_accuracy']:.2f}, "
               f"margin {d['before']['margin']:.3f} -> {d['after']['margin']:.3f}; models in {kwargs['out_dir']}")
