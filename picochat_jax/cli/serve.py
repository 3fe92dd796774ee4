"""`picochat serve`: an OpenAI-compatible HTTP server for a native checkpoint or an HF model folder."""

from __future__ import annotations

from pathlib import Path

import click

from picochat_jax.cli.common import device_option, friendly_errors, select_device


@click.command()
@click.option("--checkpoint", "checkpoint_dir", default=None, type=click.Path(path_type=Path, file_okay=False),
              help="Native model folder, e.g. RUN/sft/checkpoint.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(path_type=Path),
              help="tokenizer.json for --checkpoint (default: the copy inside the checkpoint).")
@click.option("--hf-model", default=None, help="Hugging Face model folder (or a hub id already in the local cache).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None,
              help="Model id clients must send (default: 'picochat', or the HF folder's name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most requests decoded together in one batch.")
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0.0),
              help="How long the first waiting request waits for others to join its batch.")
@click.option("--chunk-tokens", default=8, show_default=True, type=click.IntRange(min=1),
              help="Tokens decoded per compiled step before streams get them and new cancellations apply.")
@click.option("--max-len", default=None, type=click.IntRange(min=2),
              help="KV-cache length / served context (default: the model's; at most 4096 for HF models).")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Reply length when a request gives no max_tokens (clipped to the room left in the context).")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Waiting requests beyond this get 503 instead of queueing without bound.")
@click.option("--max-request-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1),
              help="Largest request body accepted; larger ones get 413 before the rest is read.")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(min=1),
              help="Most prompt tokens one request may send, over all its prompts (default: the context).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Compile the smallest programs before accepting requests.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@device_option
@friendly_errors
def serve(checkpoint_dir: Path | None, tokenizer_path: Path | None, hf_model: str | None, host: str, port: int,
          model_name: str | None, max_batch: int, batch_wait_ms: float, chunk_tokens: int, max_len: int | None,
          default_max_tokens: int, max_queue: int, max_request_bytes: int, max_prompt_tokens: int | None,
          precision: str, warmup: bool, log_level: str, device: str | None) -> None:
    """Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI-compatible, streaming)."""
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

    click.echo(f"loading {checkpoint_dir or hf_model} ...")
    backend = load_backend(checkpoint_dir, tokenizer_path, hf_model, model_name=model_name, precision=precision,
                           max_len=max_len, max_batch=max_batch, chunk_tokens=chunk_tokens,
                           batch_wait_ms=batch_wait_ms, default_max_tokens=default_max_tokens, max_queue=max_queue,
                           warmup=warmup, max_request_bytes=max_request_bytes, max_prompt_tokens=max_prompt_tokens)
    click.echo(f"serving model '{backend.model_id}' (context {backend.max_context} tokens, batches of up to "
               f"{max_batch}) on http://{host}:{port}/v1")
    uvicorn.run(create_app(backend), host=host, port=port, log_level=log_level)
