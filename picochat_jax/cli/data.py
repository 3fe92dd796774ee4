"""`picochat data validate|import`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from picochat_jax.cli.common import friendly_errors
from picochat_jax.data.pack import import_corpus, load_pack, validate_pack


@click.group()
def data() -> None:
    """Dataset packs: validate them, import their corpus."""


@data.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def validate(pack: Path, as_json: bool) -> None:
    """Read every file of PACK; print a summary, or every error with file, line and field."""
    summary, errors = validate_pack(pack)
    if errors:
        for err in errors:
            click.echo(f"error: {err}", err=True)
        raise SystemExit(1)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"pack {summary['name']}: OK")
    for key in ("corpus", "chat", "eval", "preferences"):
        if key in summary:
            click.echo(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in summary[key].items()))
    if summary.get("unknown_keys"):
        click.echo(f"  unknown keys kept: {', '.join(summary['unknown_keys'])}")


@data.command(name="import")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@friendly_errors
def import_(pack: Path, out_dir: Path) -> None:
    """Import PACK's corpus: writes corpus_manifest.json and corpus_report.md under --out-dir."""
    corpus = import_corpus(load_pack(pack), out_dir)
    m = corpus.manifest
    click.echo(f"imported {m['total_files']} files, {m['total_documents']} documents, {m['total_bytes']:,} bytes "
               f"-> {out_dir / 'corpus_manifest.json'}")
