"""`picochat tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import friendly_errors
from picochat_jax.config import available_scales, load_scale
from picochat_jax.data.pack import load_corpus, load_pack
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.pipeline import tokenizer_texts, train_tokenizer_stage


@click.group()
def tokenizer() -> None:
    """Byte-level BPE tokenizers with the chat special tokens."""


@tokenizer.command(name="train")
@click.option("--dataset-pack", "pack_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="tokenizer.json to write.")
@click.option("--scale", default="pico", show_default=True, type=click.Choice(available_scales()))
@click.option("--vocab-size", type=int, default=None, help="Override the scale's vocabulary size.")
@friendly_errors
def train_cmd(pack_path: Path, out_path: Path, scale: str, vocab_size: int | None) -> None:
    """Train the tokenizer on the pack's corpus and chat rows."""
    pack = load_pack(pack_path)
    rows = read_chat_jsonl(pack.chat) if pack.chat else []
    tok = train_tokenizer_stage(load_scale(scale), tokenizer_texts(load_corpus(pack), rows), out_path, vocab_size)
    click.echo(f"tokenizer: vocab {tok.vocab_size} -> {out_path}")
