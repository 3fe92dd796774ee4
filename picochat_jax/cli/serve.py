"""`picochat serve`: an OpenAI-compatible HTTP server for a native checkpoint or an HF model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from picochat_jax.cli.common import (
    config_default,
    device_option,
    friendly_errors,
    resolve_flags,
    select_device,
    set_option,
)


def _serve_option(name: str, kind: Any, help_text: str = "") -> Any:
    key = name.lstrip("-").replace("-", "_")
    return click.option(name, key, type=kind, default=None, help=f"{help_text} {config_default('serve', key)}".strip())


@click.command()
@click.option("--checkpoint", "checkpoint_dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Native model folder, e.g. RUN/sft/checkpoint.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json for --checkpoint (default: the copy inside the checkpoint).")
@click.option("--hf-model", default=None, help="Hugging Face model folder (or a hub id already in the local cache).")
@_serve_option("--host", str, "Interface to listen on (0.0.0.0 exposes the server to the network).")
@_serve_option("--port", click.IntRange(0, 65535))
@click.option("--model-name", default=None,
              help="Model id clients must send (default: 'picochat', or the HF folder's name).")
@_serve_option("--max-batch", click.IntRange(min=1), "Most requests decoded together in one batch.")
@_serve_option("--batch-wait-ms", click.FloatRange(min=0.0),
               "How long the first waiting request waits for others to join its batch.")
@_serve_option("--chunk-tokens", click.IntRange(min=1),
               "Tokens decoded per compiled step before streams get them and new cancellations apply.")
@_serve_option("--prefill-rows", click.IntRange(min=1),
               "Waiting prompts prefilled together in one call (a burst of arrivals costs few prefills).")
@click.option("--max-len", default=None, type=click.IntRange(min=2),
              help="KV-cache length / served context (default: the model's; for HF models at most serve.hf_max_len).")
@_serve_option("--default-max-tokens", click.IntRange(min=1),
               "Reply length when a request gives no max_tokens (clipped to the room left in the context).")
@_serve_option("--max-queue", click.IntRange(min=1), "Waiting requests beyond this get 503 instead of queueing.")
@_serve_option("--max-request-bytes", click.IntRange(min=1),
               "Largest request body accepted; larger ones get 413 before the rest is read.")
@_serve_option("--max-prompt-tokens", click.IntRange(min=1),
               "Most prompt tokens one request may send, over all its prompts (null: the context).")
@_serve_option("--precision", click.Choice(["fp32", "bf16"]))
@click.option("--api-key", default=None, envvar="PICOCHAT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route (401 otherwise).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let browser pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Compile the smallest programs before accepting requests.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@device_option
@set_option
@friendly_errors
def serve(checkpoint_dir: Path | None, tokenizer_path: Path | None, hf_model: str | None, model_name: str | None,
          max_len: int | None, api_key: str | None, cors_origins: tuple[str, ...], warmup: bool, log_level: str,
          device: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Serve /v1/models, /v1/completions (echo, logprobs) and /v1/chat/completions (logprobs), OpenAI-compatible
    and streaming, plus /tokenize, /detokenize and /health."""
    if (checkpoint_dir is None) == (hf_model is None):
        raise click.UsageError("give exactly one of --checkpoint (native) or --hf-model (Hugging Face folder)")
    if tokenizer_path is not None and hf_model is not None:
        raise click.UsageError("--tokenizer goes with --checkpoint; an HF folder carries its own tokenizer")
    select_device(device)
    try:
        import uvicorn

        from picochat_jax.serve import create_app, load_backend
    except ImportError as exc:
        raise click.ClickException(f"serving needs fastapi and uvicorn ({exc}); pip install fastapi uvicorn") from exc
    from picochat_jax.config import load_defaults

    cfg = load_defaults(sets).serve
    f = resolve_flags(flags, cfg)
    click.echo(f"loading {checkpoint_dir or hf_model} ...")
    backend = load_backend(checkpoint_dir, tokenizer_path, hf_model, model_name=model_name, precision=f["precision"],
                           max_len=max_len, max_batch=f["max_batch"], chunk_tokens=f["chunk_tokens"],
                           prefill_rows=f["prefill_rows"],
                           batch_wait_ms=f["batch_wait_ms"], default_max_tokens=f["default_max_tokens"],
                           max_queue=f["max_queue"], warmup=warmup, max_request_bytes=f["max_request_bytes"],
                           max_prompt_tokens=f["max_prompt_tokens"], hf_max_len=cfg.hf_max_len)
    click.echo(f"serving model '{backend.model_id}' (context {backend.max_context} tokens, batches of up to "
               f"{f['max_batch']}) on http://{f['host']}:{f['port']}/v1")
    if api_key:
        click.echo("every route needs 'Authorization: Bearer <api key>'")
    elif f["host"] not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {f['host']} without --api-key: anyone who can reach it can use it",
                   err=True)
    uvicorn.run(create_app(backend, api_key=api_key, cors_origins=cors_origins), host=f["host"], port=f["port"],
                log_level=log_level)
