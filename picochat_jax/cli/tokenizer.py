"""`picochat tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import UserError, friendly_errors, scale_option, set_option
from picochat_jax.config import load_scale
from picochat_jax.data.pack import load_corpus, load_pack, pack_inputs
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.pipeline import tokenizer_texts, train_tokenizer_stage


@click.group()
def tokenizer() -> None:
    """Byte-level BPE tokenizers with the chat special tokens."""


@tokenizer.command(name="train")
@click.option("--dataset-pack", "pack_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="tokenizer.json to write.")
@scale_option("Tokenizer kind and vocabulary size:")
@set_option
@click.option("--vocab-size", type=int, default=None, help="Override the scale's vocabulary size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tokenizer file at --out.")
@friendly_errors
def train_cmd(pack_path: Path, out_path: Path, scale: str, sets: tuple[str, ...], vocab_size: int | None,
              overwrite: bool) -> None:
    """Train the tokenizer on the pack's corpus and chat rows."""
    pack = load_pack(pack_path)
    rows = read_chat_jsonl(pack.chat) if pack.chat else []
    corpus = load_corpus(pack)
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder; give the tokenizer.json file to write")
    if out_path.exists() and not overwrite:
        raise UserError(f"--out {out_path} already exists; pass --overwrite to replace it")
    if out_path.exists() and any(out_path.resolve() == Path(p).resolve() for p in pack_inputs(pack)):
        raise UserError(f"--out {out_path} is one of the pack's own files; write elsewhere")
    tok = train_tokenizer_stage(load_scale(scale, sets), tokenizer_texts(corpus, rows), out_path, vocab_size)
    click.echo(f"tokenizer: vocab {tok.vocab_size} -> {out_path}")
