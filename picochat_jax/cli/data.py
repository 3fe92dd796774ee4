"""`picochat data validate|import`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import friendly_errors, out_dir_flags, scale_option, set_option, use_compile_cache
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



def import_flags(fn: Any) -> Any:
    """Options shared by hf-import and climbmix-import."""
    for opt in reversed([
        click.option("--pack-out", "--out-dir", "pack_out", required=True, type=click.Path(path_type=Path),
                     help="New or empty folder for the pack (corpus/, dataset_pack.json, import_manifest.json)."),
        click.option("--max-rows", type=click.IntRange(min=1), default=None,
                     help="Stop after reading this many rows (default: all)."),
        click.option("--min-chars", type=click.IntRange(min=0), default=20, show_default=True,
                     help="Skip rows whose text is shorter."),
        click.option("--document-shard-rows", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Rows per JSONL document file under corpus/."),
        click.option("--no-streaming", is_flag=True, help="Download/load the split whole instead of streaming."),
        click.option("--chat", "chat", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Chat JSONL to copy into the pack (run tiny needs SFT rows)."),
        click.option("--eval", "eval_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Eval JSONL to copy into the pack."),
        click.option("--preferences", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Preference JSONL to copy into the pack."),
        click.option("--no-progress", is_flag=True),
        out_dir_flags(resume=False),
        friendly_errors,
    ]):
        fn = opt(fn)
    return fn


def _import(rows: Any, sources: list[dict], pack_out: Path, name: str, description: str, text_column: str,
            opts: dict[str, Any]) -> None:
    from picochat_jax.data.importers import write_import_pack

    manifest = write_import_pack(rows, pack_out, name=name, description=description, sources=sources,
                                 text_column=text_column, max_rows=opts["max_rows"], min_chars=opts["min_chars"],
                                 document_shard_rows=opts["document_shard_rows"], chat=opts["chat"],
                                 eval_file=opts["eval_file"], preferences=opts["preferences"],
                                 progress=not opts["no_progress"])
    rows_ = manifest["rows"]
    click.echo(f"read {rows_['read']:,} rows, wrote {rows_['written']:,} ({manifest['text_bytes']:,} bytes of text) "
               f"in {len(manifest['files'])} files; skipped {rows_['skipped_short']:,} short, "
               f"{rows_['skipped_not_text']:,} not text -> {pack_out / 'dataset_pack.json'}")
    if opts["chat"] is None:
        click.echo("note: the pack has no chat rows; add them (--chat, or a 'chat' key) before `run tiny`")


def _claim_import(pack_out: Path, opts: dict[str, Any]) -> None:
    inputs = [opts["chat"], opts["eval_file"], opts["preferences"]]
    claim_out_dir(check_out_dir(pack_out, "pack-import", overwrite=opts["overwrite"], resumable=False,
                                inputs=inputs))


@data.command(name="hf-import")
@click.option("--dataset", required=True, help="Hub id (e.g. HuggingFaceFW/fineweb-edu) or a local file/folder "
                                               "of parquet, JSON/JSONL, CSV or Arrow files, or a save_to_disk folder.")
@click.option("--config", "config_name", default=None, help="Dataset configuration (hub datasets).")
@click.option("--split", default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True)
@import_flags
def hf_import(dataset: str, config_name: str | None, split: str, text_column: str, pack_out: Path,
              **opts: Any) -> None:
    """Import a Hugging Face dataset's text column as a dataset pack (streamed, bounded memory)."""
    from picochat_jax.data.importers import checked_rows, open_dataset

    rows, sources = open_dataset(dataset, config_name, split, streaming=not opts["no_streaming"])
    rows = checked_rows(rows, text_column, dataset)
    _claim_import(pack_out, opts)
    _import(rows, sources, pack_out, Path(dataset).name if Path(dataset).exists() else dataset,
            f"Hugging Face dataset import: {dataset} ({split}, column {text_column}).", text_column, opts)


@data.command(name="climbmix-import")
@click.option("--shards", required=True, metavar="GLOB|N|IDS",
              help="Local parquet shards (a glob), or ClimbMix shard ids on the hub: N = the first N, or "
                   "'0-3,7'.")
@import_flags
def climbmix_import(shards: str, pack_out: Path, **opts: Any) -> None:
    """Import ClimbMix-style parquet shards (a `text` column; nanochat's karpathy/climbmix-400b-shuffle) as a
    dataset pack."""
    from picochat_jax.data.importers import checked_rows, open_climbmix

    rows, sources = open_climbmix(shards, streaming=not opts["no_streaming"])
    rows = checked_rows(rows, "text", shards)
    _claim_import(pack_out, opts)
    _import(rows, sources, pack_out, "climbmix", f"ClimbMix parquet shards: {shards}.", "text", opts)


@data.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "checkpoint_dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Also check this model: memorisation canaries, and regurgitation in its greedy eval replies.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json for --checkpoint (default: the copy inside it).")
@click.option("--near-threshold", type=click.FloatRange(0.0, 1.0), default=0.86, show_default=True,
              help="Estimated Jaccard similarity at which a text counts as a near duplicate.")
@click.option("--ngram-size", type=click.IntRange(min=1), default=5, show_default=True,
              help="Characters per shingle of the near-duplicate check.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Reply length for the regurgitation check.")
@out_dir_flags(resume=False)
@friendly_errors
def honesty(pack: Path, out_dir: Path, checkpoint_dir: Path | None, tokenizer_path: Path | None,
            near_threshold: float, ngram_size: int, max_new_tokens: int, overwrite: bool) -> None:
    """Contamination of PACK's eval rows in its SFT rows and corpus (exact, word n-gram and near-duplicate),
    and with --checkpoint the model's memorisation and regurgitation -> honesty_report.json|md."""
    from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl
    from picochat_jax.eval.honesty import run_honesty
    from picochat_jax.eval.ngram import document_sources

    loaded = load_pack(pack)
    if loaded.eval is None:
        raise click.UsageError(f"{pack} names no eval file: there is nothing to check for contamination")
    eval_rows = read_eval_jsonl(loaded.eval)
    conversations = read_chat_jsonl(loaded.chat) if loaded.chat else []
    corpus = load_corpus(loaded)
    plan = check_out_dir(out_dir, "honesty", overwrite=overwrite, resumable=False,
                         inputs=[*pack_inputs(loaded), checkpoint_dir, tokenizer_path])
    engine = tok = None
    replies: list[str] = []
    if checkpoint_dir is not None:
        from picochat_jax.generate import SamplingParams, load_native

        use_compile_cache()
        engine, fmt = load_native(checkpoint_dir, tokenizer_path)
        tok = fmt.tok
        ids = engine.generate([fmt.encode_prompt(r.prompt) for r in eval_rows],
                              SamplingParams(max_new_tokens=max_new_tokens), fmt.stop_ids)
        replies = [fmt.decode(x) for x in ids]
    claim_out_dir(plan)
    model = str(checkpoint_dir) if checkpoint_dir else None
    report = run_honesty(out_dir, eval_rows=eval_rows, conversations=conversations, documents=corpus.documents,
                         doc_labels=document_sources(corpus), inputs={"pack": str(loaded.path), "checkpoint": model},
                         engine=engine, tok=tok, model_name=model,
                         replies=replies, reply_labels=[f"eval line {r.line}" for r in eval_rows],
                         near_threshold=near_threshold, char_ngram=ngram_size)
    c = report["counts"]
    click.echo(f"honesty: {report['status']}; {c['eval_rows_contaminated']} of {c['eval_rows']} eval rows found in "
               f"training data ({c['eval_rows_in_sft']} in SFT, {c['eval_rows_in_corpus']} in the corpus, "
               f"{c['eval_rows_near_duplicated']} near duplicates)")
    if report.get("memorization"):
        m = report["memorization"]
        click.echo(f"memorised {m['memorized']}/{m['canaries']} canaries")
    if report.get("regurgitation"):
        r = report["regurgitation"]
        click.echo(f"regurgitated corpus text in {r['regurgitated']}/{r['replies']} replies")
    click.echo(f"report -> {out_dir / 'honesty_report.md'}")
