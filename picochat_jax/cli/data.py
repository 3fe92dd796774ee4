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


@data.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(path_type=Path),
              help="tokenizer.json (e.g. from `picochat tokenizer train`).")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--shard-tokens", type=click.IntRange(min=1024), default=1 << 24, show_default=True,
              help="Tokens per shard (the last shard holds the rest).")
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
              help="Share of whole documents held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the document holdout.")
@click.option("--no-progress", is_flag=True)
@out_dir_flags()
@friendly_errors
def tokenize(pack: Path, tokenizer_path: Path, out_dir: Path, shard_tokens: int, val_fraction: float, seed: int,
             no_progress: bool, overwrite: bool, resume: bool, resume_or_start: bool) -> None:
    """Tokenize PACK's corpus (a pack, a text file or a folder) into fixed-size token shards with a
    document-level holdout; `train base --shards OUT_DIR` streams them. An interrupted run continues with
    --resume and writes the same bytes as an uninterrupted one."""
    from picochat_jax.data.pack import corpus_bytes, iter_documents, load_pack_or_text, source_files
    from picochat_jax.data.shards import tokenize_to_shards
    from picochat_jax.tokenizer import ChatTokenizer

    loaded = load_pack_or_text(pack)
    tok = ChatTokenizer.load(tokenizer_path)
    files, _ = source_files(loaded)
    plan = check_out_dir(out_dir, "tokens", overwrite=overwrite, resume=resume, resume_or_start=resume_or_start,
                         inputs=[tokenizer_path, *pack_inputs(loaded)])
    click.echo(f"counting documents in {len(files)} files ...")
    count = sum(1 for _ in iter_documents(loaded))
    if count == 0:
        raise click.UsageError(f"{pack}: the corpus has no documents")
    claim_out_dir(plan)
    sources = [{"file": str(f), "label": label, "bytes": f.stat().st_size} for f, label in files]
    manifest = tokenize_to_shards(lambda: iter_documents(loaded), tok, tokenizer_path, out_dir, num_documents=count,
                                  val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
                                  total_bytes=corpus_bytes(loaded), progress=not no_progress, sources=sources)
    for split in ("train", "val"):
        s = manifest["splits"][split]
        click.echo(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    click.echo(f"-> {out_dir / 'manifest.json'}")

