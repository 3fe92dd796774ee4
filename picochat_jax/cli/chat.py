"""`picochat chat`: a terminal REPL over a native checkpoint, keeping the multi-turn history."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import device_option, friendly_errors, plain_warnings, select_device
from picochat_jax.cli.eval import precision_option, sampling_from, sampling_options

HELP = "commands: /reset clears the conversation, /quit (or Ctrl-D) leaves"


def fit_history(history: list[Any], encode: Callable[[list[Any]], list[int]], budget: int) -> list[Any]:
    """Drop the oldest user/assistant exchanges (never the system prompt) until the prompt fits budget tokens.

    Whole turns go, not tokens: a conversation cut mid-message confuses a small model more than a shorter one.
    """
    head = [m for m in history[:1] if m.role == "system"]
    turns = history[len(head):]
    while len(turns) > 1 and len(encode(head + turns)) > budget:
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
    return head + turns


def repl(engine: Any, fmt: Any, sampling: Any, system: str | None, read_line: Callable[[], str | None],
         write: Callable[[str], None]) -> list[Any]:
    """Run the loop until /quit or end of input; returns the final history (for tests)."""
    from picochat_jax.data.records import Message

    start = [Message("system", system)] if system else []
    history = list(start)
    budget = engine.max_len - sampling.max_new_tokens
    while True:
        line = read_line()
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = list(start)
            write("(conversation cleared)")
            continue
        if text in ("/help", "/?"):
            write(HELP)
            continue
        history = fit_history(history + [Message("user", text)], fmt.encode_prompt, budget)
        ids = engine.generate([fmt.encode_prompt(history)], sampling, fmt.stop_ids)[0]
        reply = fmt.decode(ids).strip()
        history.append(Message("assistant", reply))
        write(f"assistant> {reply}")
    return history


@click.command()
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Model folder, e.g. RUN/sft/checkpoint.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json (default: the copy inside --checkpoint).")
@click.option("--system", default=None, help="System prompt kept at the top of the conversation.")
@sampling_options(max_new_default=128)
@device_option
@precision_option
@friendly_errors
def chat(checkpoint_dir: Path, tokenizer_path: Path | None, system: str | None, device: str | None,
         precision: str, **opts: Any) -> None:
    """Talk to a checkpoint in the terminal (multi-turn; /reset, /quit)."""
    select_device(device)
    from picochat_jax.generate import load_native

    engine, fmt = load_native(checkpoint_dir, tokenizer_path, precision=precision, max_batch=1)
    sampling = sampling_from(opts)
    if sampling.max_new_tokens >= engine.max_len:
        raise click.UsageError(f"--max-new-tokens must be below the model's context ({engine.max_len})")
    def read_line() -> str | None:
        click.echo("you> ", nl=False)
        line = sys.stdin.readline()
        return line if line else None

    click.echo(f"picochat: {checkpoint_dir} (context {engine.max_len} tokens). {HELP}")
    with plain_warnings():
        repl(engine, fmt, sampling, system, read_line, click.echo)
    click.echo("")
