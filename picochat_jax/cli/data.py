"""`picochat data validate|import`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from picochat_jax.cli.common import friendly_errors, out_dir_flags, scale_option, set_option
from picochat_jax.data.pack import load_corpus, load_pack, pack_inputs, validate_pack, write_corpus_report
from picochat_jax.outdir import check_out_dir, claim_out_dir


@click.group()
def data() -> None:
    """Dataset packs: validate them, import their corpus."""


@data.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--max-row-bytes", type=click.IntRange(min=1), default=None,
              help="Largest chat/eval/preference row accepted (default 1 MiB, or PICOCHAT_MAX_ROW_BYTES).")
def validate(pack: Path, as_json: bool, max_row_bytes: int | None) -> None:
    """Read every file of PACK; print a summary, or every error with file, line and field (up to 20 per file,
    then a count of the rest)."""
    summary, errors = validate_pack(pack, max_row_bytes)
    if errors:
        for err in errors:
            click.echo(f"error: {err}", err=True)
        raise SystemExit(1)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"pack {summary['name']}: OK")
    for key in ("corpus", "chat", "eval", "preferences", "external_eval"):
        if key in summary:
            click.echo(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in summary[key].items()))
    if summary.get("unknown_keys"):
        click.echo(f"  unknown keys kept: {', '.join(summary['unknown_keys'])}")


@data.command(name="import")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@out_dir_flags(resume=False)
@friendly_errors
def import_(pack: Path, out_dir: Path, overwrite: bool) -> None:
    """Import PACK's corpus: writes corpus_manifest.json and corpus_report.md under --out-dir."""
    loaded = load_pack(pack)
    corpus = load_corpus(loaded)
    claim_out_dir(check_out_dir(out_dir, "corpus-import", overwrite=overwrite, resumable=False,
                                             inputs=pack_inputs(loaded)))
    write_corpus_report(corpus, loaded, out_dir)
    m = corpus.manifest
    click.echo(f"imported {m['total_files']} files, {m['total_documents']} documents, {m['total_bytes']:,} bytes "
               f"-> {out_dir / 'corpus_manifest.json'}")


@data.command(name="init-pack")
@click.argument("folder", type=click.Path(path_type=Path))
@friendly_errors
def init_pack_cmd(folder: Path) -> None:
    """Write a valid skeleton pack (pack, recipe, corpus folder, chat, eval, README) into a new or empty FOLDER."""
    from picochat_jax.data.inspect import init_pack

    for path in init_pack(folder):
        click.echo(f"wrote {path}")
    click.echo(f"next: edit the files, then `picochat data inspect {folder / 'dataset_pack.json'}`")


@data.command()
@click.argument("pack", type=click.Path(path_type=Path))
@scale_option("The scale to size the pack against:")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
def inspect(pack: Path, scale: str, sets: tuple[str, ...], as_json: bool) -> None:
    """Per-source documents, bytes, estimated tokens, duplicates and text heuristics, and the pack's readiness
    for a scale (the preflight checks: tokens per parameter, eval/SFT overlap, context fit). Writes nothing."""
    from picochat_jax.data.inspect import inspect_markdown, inspect_pack

    report = inspect_pack(pack, scale, sets)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else inspect_markdown(report), nl=not as_json)
