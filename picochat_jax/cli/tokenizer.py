"""`picochat tokenizer train`."""

from __future__ import annotations

import itertools
from pathlib import Path

import click

from picochat_jax.cli.common import UserError, friendly_errors, scale_option, set_option
from picochat_jax.config import load_scale
from picochat_jax.data.pack import corpus_bytes, iter_documents, load_pack_or_text, pack_inputs
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.pipeline import train_tokenizer_stage
from picochat_jax.tokenizer import SampledTexts


@click.group()
def tokenizer() -> None:
    """Byte-level BPE tokenizers with the chat special tokens."""


@tokenizer.command(name="train")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="A dataset pack (.json: its corpus and chat rows) or corpus text (a file or folder).")
@click.option("--dataset-pack", "pack_path", type=click.Path(path_type=Path), default=None,
              help="Same as --input with a pack.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="tokenizer.json to write.")
@scale_option("Tokenizer kind and vocabulary size:")
@set_option
@click.option("--type", "kind", type=click.Choice(["byte", "bpe", "hf_bpe"]), default=None,
              help="byte: 256 byte tokens, no merges; bpe (= hf_bpe): byte-level BPE saved as a Hugging Face "
                   "tokenizer.json (default: the scale's tokenizer.kind).")
@click.option("--vocab-size", type=int, default=None, help="Override the scale's vocabulary size.")
@click.option("--min-freq", type=click.IntRange(min=1), default=None,
              help="Fewest occurrences for a merge (default: the scale's tokenizer.min_frequency).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=256 << 20, show_default=True,
              help="Train on a seeded sample of documents of about this many bytes: memory stays bounded "
                   "whatever the corpus size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tokenizer file at --out.")
@friendly_errors
def train_cmd(input_path: Path | None, pack_path: Path | None, out_path: Path, scale: str, sets: tuple[str, ...],
              kind: str | None, vocab_size: int | None, min_freq: int | None, max_bytes: int,
              overwrite: bool) -> None:
    """Train the tokenizer on a pack's corpus and chat rows (or on corpus text), streaming a bounded sample."""
    if (input_path is None) == (pack_path is None):
        raise click.UsageError("give exactly one of --input or --dataset-pack")
    source = input_path or pack_path
    pack = load_pack_or_text(source)
    rows = read_chat_jsonl(pack.chat) if pack.chat else []
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder; give the tokenizer.json file to write")
    if out_path.exists() and not overwrite:
        raise UserError(f"--out {out_path} already exists; pass --overwrite to replace it")
    if out_path.exists() and any(out_path.resolve() == Path(p).resolve() for p in pack_inputs(pack)):
        raise UserError(f"--out {out_path} is one of the pack's own files; write elsewhere")
    scale_cfg = load_scale(scale, sets)
    total = corpus_bytes(pack)
    sample = SampledTexts(iter_documents(pack), total, max_bytes, seed=0)
    texts = itertools.chain(sample, (m.content for c in rows for m in c.messages))
    kind = "bpe" if kind == "hf_bpe" else (kind or scale_cfg.tokenizer.kind)
    tok = train_tokenizer_stage(scale_cfg, texts, out_path, vocab_size, kind, min_freq)
    used = sample.bytes_used
    click.echo(f"tokenizer: {kind}, vocab {tok.vocab_size}, trained on {used:,} of {total:,} corpus bytes "
               f"({sample.documents_used:,} documents) + {len(rows)} chat rows -> {out_path}")
