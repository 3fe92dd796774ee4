"""`picochat export hf`, `picochat import hf` and `picochat train hf-sft` (Path B)."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import device_option, friendly_errors, mesh_option, out_dir_flags, select_device

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


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
    from picochat_jax.hf.convert import export_native

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
    from picochat_jax.hf.convert import load_hf_model, save_imported_checkpoint
    from picochat_jax.model.transformer import count_params
    from picochat_jax.outdir import check_out_dir

    plan = check_out_dir(out_dir, "import-hf", overwrite=overwrite, resumable=False,
                         inputs=[Path(model)])
    hf = load_hf_model(model)
    save_imported_checkpoint(hf, plan.path, str(model))
    c = hf.config
    click.echo(f"imported {hf.family} ({c.n_layers} layers, d_model {c.d_model}, {c.n_heads}/{c.n_kv_heads} heads, "
               f"vocab {c.vocab_size}, {count_params(hf.params):,} params) -> {out_dir}")


@click.command(name="hf-sft")
@click.option("--model", required=True, help="HF model folder, or a hub id already in the local HF cache.")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path), help="Chat JSONL.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--max-steps", type=int, default=200, show_default=True)
@click.option("--max-length", type=int, default=1024, show_default=True,
              help="Tokens per row; longer rows are left-truncated (the target is kept).")
@device_option
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
              help="Compute precision (default: bf16 on accelerators, fp32 on CPU).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute blocks in the backward pass (less memory).")
@click.option("--peft", type=click.Choice(["lora", "none"]), default="lora", show_default=True,
              help="lora: train adapters only; none: full fine-tuning.")
@click.option("--done-file", type=click.Path(path_type=Path), default=None,
              help="JSON status + output paths, written last (also on failure).")
@out_dir_flags(resume=False)
@click.option("--lora-rank", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=32.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Only 0 is supported.")
@click.option("--lora-targets", default=DEFAULT_TARGETS, show_default=True,
              help="Comma-separated projections (q_proj,... or q,k,v,o,gate,up,down).")
@click.option("--learning-rate", type=float, default=2e-5, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Rows per micro-batch (divisible by the mesh's data*fsdp).")
@click.option("--grad-accum-steps", type=int, default=1, show_default=True)
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Held-out share of the rows; its loss picks best_model/.")
@mesh_option
@friendly_errors
def hf_sft(model: str, input_path: Path, out_dir: Path, max_steps: int, max_length: int, device: str | None,
           precision: str | None, gradient_checkpointing: bool, peft: str, done_file: Path | None, overwrite: bool,
           lora_rank: int,
           lora_alpha: float, lora_dropout: float, lora_targets: str, learning_rate: float, batch_size: int,
           grad_accum_steps: int, val_fraction: float, mesh: str | None) -> None:
    """Fine-tune an HF model on chat rows rendered with its own chat template (loss on the final answer)."""
    select_device(device)
    import jax

    from picochat_jax.hf.sft import HFSFTOptions, run_hf_sft
    from picochat_jax.model.lora import LoraConfig, parse_targets

    precision = precision or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    lora_cfg = LoraConfig()
    if peft == "lora":
        lora_cfg = LoraConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                              targets=parse_targets(lora_targets))
    opts = HFSFTOptions(model=model, input=input_path, out_dir=out_dir, max_steps=max_steps, max_length=max_length,
                        precision=precision, gradient_checkpointing=gradient_checkpointing, peft=peft, lora=lora_cfg,
                        learning_rate=learning_rate, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                        val_fraction=val_fraction, mesh=mesh, done_file=done_file, overwrite=overwrite)
    report = run_hf_sft(opts)
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(f"hf-sft: held-out loss {fmt(report['initial_val_loss'])} -> best {fmt(report['best_val_loss'])} "
               f"(step {report['best_step']}); models in {out_dir}")
