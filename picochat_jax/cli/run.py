"""`picochat run tiny`: the whole Path A factory."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import (
    device_option,
    friendly_errors,
    mesh_option,
    out_dir_flags,
    precision_option,
    scale_option,
    select_device,
    set_option,
)


@click.group()
def run() -> None:
    """End-to-end pipelines."""


@run.command()
@click.option("--dataset-pack", "pack_path", required=True, type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@scale_option()
@set_option
@mesh_option
@device_option
@precision_option
@click.option("--max-steps", type=int, default=None, help="Cap base and SFT steps (quick looks).")
@click.option("--base-steps", type=int, default=None, help="Base pretraining steps (default: the scale's).")
@click.option("--sft-steps", type=int, default=None, help="SFT steps (default: the scale's).")
@out_dir_flags()
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@click.option("--allow-preflight-warnings", is_flag=True,
              help="Train even when preflight finds blocking problems (the release gate still blocks).")
@click.option("--dpo-steps", type=int, default=None,
              help="DPO steps when the pack names preferences (default: the config's dpo.steps).")
@click.option("--dpo-beta", type=float, default=None, help="DPO beta (default: the config's dpo.beta).")
@click.option("--no-dpo", is_flag=True, help="Skip DPO even when the pack names preferences.")
@click.option("--canaries", type=int, default=0, show_default=True,
              help="Plant N random canary strings in the corpus and report how many the model memorised.")
@click.option("--gate-profile", default=None, metavar="NAME|PATH.yaml",
              help="Release gate thresholds (default: configs/gate/default.yaml).")
@click.option("--gate-set", "gate_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one gate threshold (repeatable).")
@click.option("--tensorboard-dir", type=click.Path(path_type=Path), default=None,
              help="Write TensorBoard events under DIR/base, DIR/sft, DIR/dpo (default: beside each metrics.jsonl).")
@click.option("--preflight-only", is_flag=True,
              help="Import, write the corpus and preflight reports, and stop (exit 1 when preflight blocks).")
@friendly_errors
def tiny(pack_path: Path, out_dir: Path, scale: str, sets: tuple[str, ...], mesh: str | None, device: str | None,
         precision: str | None, max_steps: int | None, base_steps: int | None, sft_steps: int | None, resume: bool,
         resume_or_start: bool, overwrite: bool, no_progress: bool, allow_preflight_warnings: bool,
         dpo_steps: int | None, dpo_beta: float | None, no_dpo: bool,
         canaries: int, gate_profile: str | None, gate_overrides: tuple[str, ...], tensorboard_dir: Path | None,
         preflight_only: bool) -> None:
    """Import -> preflight -> tokenizer -> base -> SFT -> [DPO] -> SFT fit -> eval -> honesty -> release gate
    -> report.md, writing the spec's out-dir layout. A finished run is not a release: see release/gate.json."""
    select_device(device)
    from picochat_jax.config import load_scale
    from picochat_jax.eval.gate import parse_overrides
    from picochat_jax.pipeline import RunOptions, run_tiny

    if max_steps is not None:
        cfg = load_scale(scale, sets)
        base_steps = min(base_steps or cfg.base.steps, max_steps)
        sft_steps = min(sft_steps or cfg.sft.steps, max_steps)
        dpo_steps = min(dpo_steps or cfg.dpo.steps, max_steps)
    options = RunOptions(scale=scale, mesh=mesh, base_steps=base_steps, sft_steps=sft_steps, precision=precision,
                         resume=resume, resume_or_start=resume_or_start, overwrite=overwrite, progress=not no_progress,
                         allow_preflight_warnings=allow_preflight_warnings, dpo=not no_dpo, dpo_steps=dpo_steps,
                         dpo_beta=dpo_beta, sets=sets, canaries=canaries, gate_profile=gate_profile,
                         gate_overrides=tuple(parse_overrides(gate_overrides).items()),
                         tensorboard_dir=str(tensorboard_dir) if tensorboard_dir else None,
                         preflight_only=preflight_only)
    summary = run_tiny(pack_path, out_dir, options)
    if summary.get("status") == "preflight_only":
        click.echo(f"preflight: {summary['preflight']}"
                   + (f"; blocking: {', '.join(summary['blocking'])}" if summary["blocking"] else "")
                   + (f"; warnings: {', '.join(summary['warnings'])}" if summary["warnings"] else ""))
        raise SystemExit(1 if summary["blocking"] else 0)
    if summary.get("status") != "completed":
        click.echo(f"run interrupted during {summary['stage']} at step {summary['step']}; "
                   f"continue with --resume", err=True)
        raise SystemExit(3)
