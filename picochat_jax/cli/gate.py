"""`picochat gate RUN_DIR`: the release decision for a finished run, from its evidence files."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import UserError, friendly_errors, use_compile_cache


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--profile", default="default", show_default=True, metavar="NAME|PATH.yaml",
              help="Gate profile: configs/gate/NAME.yaml or a YAML file of thresholds.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one threshold, e.g. --set min_eval_pass_rate=0.5 (repeatable).")
@click.option("--ci-bootstrap-samples", type=click.IntRange(min=0), default=None,
              help="Resamples for the 95% intervals of rate checks (default: the profile's, 1000; 0 = none).")
@click.option("--eval-input", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="hf-sft folders: eval JSONL the fine-tuned model answers (written to OUT/eval, with honesty "
                   "against its SFT input in OUT/honesty) when that evidence is not there yet.")
@click.option("--external-input", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="hf-sft folders: an external benchmark (multiple choice or eval rows) -> OUT/external_eval.")
@click.option("--no-report", is_flag=True, help="Do not rebuild RUN_DIR/report.md.")
@friendly_errors
def gate(run_dir: Path, profile: str, overrides: tuple[str, ...], ci_bootstrap_samples: int | None,
         eval_input: Path | None, external_input: Path | None, no_report: bool) -> None:
    """Read RUN_DIR's evidence, write release/gate.json and release/release_card.md.

    RUN_DIR is a `run tiny` folder or a `train hf-sft` out-dir (judged on its report and the eval, external
    eval and honesty evidence --eval-input/--external-input build inside it through the HF bridge).
    Profiles: default, research, first_release, skill_release (configs/gate/). Exits 0 when approved, 0 with a
    warning when only warn-level checks failed, and 1 when the gate blocks (the reasons are printed).
    """
    from picochat_jax.eval.gate import evaluate_gate, load_gate_profile, parse_overrides
    from picochat_jax.eval.report import write_run_report
    from picochat_jax.outdir import MARKER, read_marker

    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    marker = read_marker(run_dir)
    if marker is None or marker["kind"] not in ("run", "hf-sft", "hf-dpo"):
        raise UserError(f"{run_dir} is not a `picochat run`, `train hf-sft` or `train hf-dpo` folder (no {MARKER} "
                        "of those kinds); the gate writes release/ and report.md only into folders picochat made")
    hf = marker["kind"] != "run"
    if (eval_input or external_input) and not hf:
        raise click.UsageError("--eval-input/--external-input are for hf-sft folders; a run has its own evidence")
    settings = parse_overrides(overrides)
    profile_obj = load_gate_profile(profile, settings if ci_bootstrap_samples is None else
                                    {**settings, "ci_bootstrap_samples": str(ci_bootstrap_samples)})
    if hf:
        from picochat_jax.hf.release import build_hf_evidence

        use_compile_cache()  # the fine-tuned model answers the eval rows
        for name, what in build_hf_evidence(run_dir, eval_input, external_input).items():
            click.echo(f"  built {name}: {what}")
    result = evaluate_gate(run_dir, profile_obj)
    for c in result["checks"]:
        interval = f" [95% {c['interval'][0]:.3g}-{c['interval'][1]:.3g}]" if c.get("interval") else ""
        click.echo(f"  {c['verdict'].upper():5} {c['name']}: {c['reason']}{interval}")
    if not no_report and not hf:
        write_run_report(run_dir)
    click.echo(f"release gate: {result['decision'].upper()} -> {run_dir / 'release' / 'gate.json'}")
    if result["decision"] == "warn":
        click.echo(f"warning: approved with warnings ({', '.join(result['warnings'])})", err=True)
    if result["decision"] == "blocked":
        raise SystemExit(1)
