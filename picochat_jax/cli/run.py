"""`picochat run tiny`: the whole Path A factory."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import device_option, friendly_errors, mesh_option, precision_option, select_device
from picochat_jax.config import available_scales


@click.group()
def run() -> None:
    """End-to-end pipelines."""


@run.command()
@click.option("--dataset-pack", "pack_path", required=True, type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--scale", default="pico", show_default=True, type=click.Choice(available_scales()))
@mesh_option
@device_option
@precision_option
@click.option("--max-steps", type=int, default=None, help="Cap base and SFT steps (quick looks).")
@click.option("--base-steps", type=int, default=None, help="Base pretraining steps (default: the scale's).")
@click.option("--sft-steps", type=int, default=None, help="SFT steps (default: the scale's).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out-dir from its resume checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out-dir.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@friendly_errors
def tiny(pack_path: Path, out_dir: Path, scale: str, mesh: str | None, device: str | None, precision: str | None,
         max_steps: int | None, base_steps: int | None, sft_steps: int | None, resume: bool, overwrite: bool,
         no_progress: bool) -> None:
    """Import -> tokenizer -> base pretraining -> chat SFT, writing the spec's out-dir layout."""
    select_device(device)
    from picochat_jax.config import load_scale
    from picochat_jax.pipeline import RunOptions, run_tiny

    if max_steps is not None:
        cfg = load_scale(scale)
        base_steps = min(base_steps or cfg.base.steps, max_steps)
        sft_steps = min(sft_steps or cfg.sft.steps, max_steps)
    summary = run_tiny(pack_path, out_dir, RunOptions(scale=scale, mesh=mesh, base_steps=base_steps,
                                                      sft_steps=sft_steps, precision=precision, resume=resume,
                                                      overwrite=overwrite, progress=not no_progress))
    if summary.get("status") != "completed":
        click.echo(f"run interrupted during {summary['stage']} at step {summary['step']}; "
                   f"continue with --resume", err=True)
        raise SystemExit(3)
