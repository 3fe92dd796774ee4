"""`picochat train base|sft` (native models). Path B's `train hf-sft` registers here too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import (
    device_option,
    friendly_errors,
    input_or_pack_file,
    mesh_option,
    out_dir_flags,
    precision_option,
    scale_option,
    select_device,
    set_option,
)


@click.group()
def train() -> None:
    """Training stages, one at a time."""


def train_flags(fn: Any) -> Any:
    """Flags that override the scale's TrainConfig for either stage."""
    for opt in reversed([
        scale_option("Training defaults (and the architecture, for base):"),
        set_option,
        click.option("--steps", type=int, default=None),
        click.option("--batch-size", type=int, default=None, help="Global batch (rows per micro-batch)."),
        click.option("--grad-accum-steps", type=int, default=None),
        click.option("--learning-rate", type=float, default=None),
        click.option("--warmup-steps", type=int, default=None),
        click.option("--seq-len", type=int, default=None),
        click.option("--remat", type=click.Choice(["auto", "none", "full", "dots"]), default=None,
                     help="Rematerialise blocks in the backward pass to save memory."),
        click.option("--seed", type=int, default=None),
        mesh_option, device_option, precision_option,
        click.option("--no-progress", is_flag=True),
        click.option("--tensorboard-dir", type=click.Path(path_type=Path), default=None,
                     help="Write TensorBoard events here (default: beside metrics.jsonl in --out-dir)."),
    ]):
        fn = opt(fn)
    return out_dir_flags()(fn)


def claim_stage_dir(out_dir: Path, stage: str, opts: dict[str, Any], inputs: list[Path | None]) -> dict[str, Any]:
    """Apply the out-dir policy for `train STAGE` (after every input is read, before anything is written);
    returns the keyword arguments the training loop takes for resuming."""
    from picochat_jax.outdir import check_out_dir, claim_out_dir

    plan = check_out_dir(out_dir, f"train-{stage}", resume=opts["resume"], overwrite=opts["overwrite"],
                         resume_or_start=opts["resume_or_start"], inputs=inputs)
    claim_out_dir(plan)
    return {"resume": plan.action == "resume", "resume_or_start": opts["resume_or_start"]}


def perf_kwargs(scale: Any) -> dict[str, Any]:
    """The config tree's `perf:` knobs as the training loop's keyword arguments."""
    return {"attention_impl": scale.perf.attention, "ce_chunk_tokens": scale.perf.ce_chunk_tokens}


def train_cfg_from_flags(stage_cfg: Any, opts: dict[str, Any]) -> Any:
    from picochat_jax.config import with_overrides

    return with_overrides(stage_cfg, steps=opts["steps"], batch_size=opts["batch_size"],
                          grad_accum_steps=opts["grad_accum_steps"], learning_rate=opts["learning_rate"],
                          warmup_steps=opts["warmup_steps"], seq_len=opts["seq_len"], remat=opts["remat"],
                          seed=opts["seed"], precision=opts["precision"])


@train.command()
@click.option("--dataset-pack", "pack_path", default=None, type=click.Path(path_type=Path),
              help="Tokenize the pack's corpus into OUT_DIR/tokens first (continued on --resume).")
@click.option("--shards", "shards_dir", default=None, type=click.Path(path_type=Path),
              help="Token shards made by `picochat data tokenize` (instead of --dataset-pack).")
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@train_flags
@friendly_errors
def base(pack_path: Path | None, shards_dir: Path | None, tokenizer_path: Path, out_dir: Path, **opts: Any) -> None:
    """Pretrain a native model on token shards: BOS-aligned best-fit rows streamed from disk, validated on the
    held-out documents."""
    if (pack_path is None) == (shards_dir is None):
        raise click.UsageError("give exactly one of --dataset-pack or --shards")
    select_device(opts["device"])
    from picochat_jax.config import load_scale
    from picochat_jax.data.pack import corpus_bytes, iter_documents, load_pack, pack_inputs
    from picochat_jax.data.shards import read_manifest
    from picochat_jax.parallel import parse_mesh
    from picochat_jax.pipeline import base_stage, tokenize_stage
    from picochat_jax.tokenizer import ChatTokenizer

    scale = load_scale(opts["scale"], opts["sets"])
    cfg = train_cfg_from_flags(scale.base, opts)
    tok = ChatTokenizer.load(tokenizer_path)
    mesh_shape = parse_mesh(opts["mesh"])
    if shards_dir is not None:
        read_manifest(shards_dir)  # a missing or foreign folder fails before anything is written
        inputs: list[Path | None] = [tokenizer_path, shards_dir]
    else:
        pack = load_pack(pack_path)
        inputs = [tokenizer_path, *pack_inputs(pack)]
    resume = claim_stage_dir(out_dir, "base", opts, inputs)
    if shards_dir is None:
        shards_dir = out_dir / "tokens"
        count = sum(1 for _ in iter_documents(pack))
        tokenize_stage(lambda: iter_documents(pack), count, tok, tokenizer_path, shards_dir, cfg,
                       progress=not opts["no_progress"], total_bytes=corpus_bytes(pack))
    result = base_stage(scale, cfg, tok, tokenizer_path, shards_dir, out_dir, mesh_shape,
                        progress=not opts["no_progress"], tensorboard_dir=opts["tensorboard_dir"], **resume,
                        **perf_kwargs(scale))
    _report(result, out_dir)


@train.command()
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(path_type=Path),
              help="Base model folder (e.g. RUN/base/checkpoint).")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json (default: the one inside --checkpoint).")
@click.option("--input", "input_path", default=None, type=click.Path(path_type=Path), help="Chat JSONL.")
@click.option("--dataset-pack", "pack_path", default=None, type=click.Path(path_type=Path),
              help="Use the pack's chat file instead of --input.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--all-assistant-turns", is_flag=True, help="Train on every assistant turn, not only the last.")
@click.option("--sampling", type=click.Choice(["uniform", "balanced", "sqrt"]), default=None,
              help="Rows per category in each epoch: as given, equal per category, or by sqrt of its size "
                   "(default: the scale's sft.sampling).")
@click.option("--packing", type=click.Choice(["none", "bos_bestfit"]), default=None,
              help="Pack several chat examples into each row by best fit (segment-aware attention, per-example "
                   "positions and assistant masks) instead of one padded example per row (default: the scale's "
                   "sft.packing).")
@train_flags
@friendly_errors
def sft(checkpoint_dir: Path, tokenizer_path: Path | None, input_path: Path | None, pack_path: Path | None,
        out_dir: Path, all_assistant_turns: bool, sampling: str | None, packing: str | None, **opts: Any) -> None:
    """Chat SFT of a native checkpoint; loss on the final assistant message only."""
    select_device(opts["device"])
    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint
    from picochat_jax.config import load_scale, with_overrides
    from picochat_jax.data.records import read_chat_jsonl
    from picochat_jax.parallel import parse_mesh
    from picochat_jax.pipeline import sft_stage
    from picochat_jax.tokenizer import ChatTokenizer

    chat_path = input_or_pack_file(input_path, pack_path, "chat")
    conversations = read_chat_jsonl(chat_path)
    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    params, model_cfg, _ = load_model_checkpoint(checkpoint_dir)
    tok = ChatTokenizer.load(tokenizer_path)
    scale = load_scale(opts["scale"], opts["sets"])
    cfg = with_overrides(train_cfg_from_flags(scale.sft, opts), all_assistant_turns=all_assistant_turns or None,
                         sampling=sampling, packing=packing)
    mesh_shape = parse_mesh(opts["mesh"])
    resume = claim_stage_dir(out_dir, "sft", opts, [checkpoint_dir, tokenizer_path, chat_path, pack_path])
    result = sft_stage(model_cfg, cfg, tok, tokenizer_path, conversations, params, out_dir, mesh_shape,
                       progress=not opts["no_progress"], tensorboard_dir=opts["tensorboard_dir"], **resume,
                       **perf_kwargs(scale))
    _report(result, out_dir)


def _report(result: Any, out_dir: Path) -> None:
    s = result.summary
    if result.status != "completed":
        click.echo(f"interrupted at step {result.final_step}; continue with --resume", err=True)
        raise SystemExit(3)
    click.echo(f"{s['stage']}: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, "
               f"val {s['final_val_loss'] if s['final_val_loss'] is None else round(s['final_val_loss'], 3)}; "
               f"model -> {out_dir / 'checkpoint'}")
