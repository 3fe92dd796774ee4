"""`picochat train dpo`: preference tuning of a native checkpoint (usually RUN/sft/checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import config_default, friendly_errors, input_or_pack_file, select_device
from picochat_jax.cli.train import claim_stage_dir, train_cfg_from_flags, train_flags


@click.command(name="dpo")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(path_type=Path),
              help="Policy and frozen reference model (e.g. RUN/sft/checkpoint).")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json (default: the one inside --checkpoint).")
@click.option("--input", "input_path", default=None, type=click.Path(path_type=Path),
              help='Preference JSONL: {"prompt"|"user", "chosen", "rejected"} per line.')
@click.option("--dataset-pack", "pack_path", default=None, type=click.Path(path_type=Path),
              help="Use the pack's preferences file instead of --input.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--beta", type=float, default=None,
              help="Strength of the pull towards the reference model, higher = stay closer. "
                   + config_default("dpo", "beta"))
@train_flags
@friendly_errors
def dpo(checkpoint_dir: Path, tokenizer_path: Path | None, input_path: Path | None, pack_path: Path | None,
        out_dir: Path, beta: float | None, **opts: Any) -> None:
    """DPO on preference pairs; writes checkpoint/, best_checkpoint/, metrics.jsonl, summary.json like SFT.

    Defaults: the scale's SFT settings with the config's `dpo:` section applied (a tenth of the SFT learning
    rate, 20 steps, no weight decay).
    """
    select_device(opts["device"])
    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint
    from picochat_jax.config import load_scale, with_overrides
    from picochat_jax.data.records import read_preference_jsonl
    from picochat_jax.parallel import parse_mesh
    from picochat_jax.tokenizer import ChatTokenizer
    from picochat_jax.train.dpo import dpo_train_config, train_dpo

    prefs_path = input_or_pack_file(input_path, pack_path, "preferences")
    rows = read_preference_jsonl(prefs_path)
    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    params, model_cfg, _ = load_model_checkpoint(checkpoint_dir)
    tok = ChatTokenizer.load(tokenizer_path)
    scale = load_scale(opts["scale"], opts["sets"])
    dpo_cfg = with_overrides(scale.dpo, beta=beta)
    base_cfg = dpo_train_config(scale.sft, dpo_cfg, opts["steps"], opts["learning_rate"])
    cfg = train_cfg_from_flags(base_cfg, {**opts, "steps": None, "learning_rate": None})
    mesh_shape = parse_mesh(opts["mesh"])
    resume = claim_stage_dir(out_dir, "dpo", opts, [checkpoint_dir, tokenizer_path, prefs_path, pack_path])
    result = train_dpo(model_cfg=model_cfg, train_cfg=cfg, dpo_cfg=dpo_cfg, tok=tok, rows=rows,
                       init_params=params, out_dir=out_dir, mesh_shape=mesh_shape,
                       tokenizer_path=tokenizer_path, progress=not opts["no_progress"], **resume)
    s = result.summary
    click.echo(f"dpo: {s['steps']} steps on {s['pairs']} pairs, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}; "
               f"reward accuracy {s['before']['reward_accuracy']:.2f} -> {s['after']['reward_accuracy']:.2f}, "
               f"chosen-rejected log-prob margin {s['before']['logp_margin']:.2f} -> {s['after']['logp_margin']:.2f}; "
               f"model -> {out_dir / 'checkpoint'}")

