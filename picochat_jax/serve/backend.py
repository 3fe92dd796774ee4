"""The served model: its name, chat format, batcher (over the one decode engine) and request limits, loaded
from a native checkpoint folder or a Hugging Face folder. Defaults are the config tree's `serve:` section.

    backend = load_backend(checkpoint=Path("RUN/sft/checkpoint"))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat_jax.config import ServeConfig
from picochat_jax.serve.batcher import Batcher

DEFAULTS = ServeConfig()  # mirrors configs/base.yaml serve: (tests/test_config.py keeps them equal)
# The server's decode programs unroll the layer loop on GPU (0 = the backend's default, rolled on CPU): it
# compiles them once, at warmup, and then decodes for its whole life (generate.Engine, docs/performance.md).
SERVE_SCAN_UNROLL = 0


@dataclass
class Backend:
    """One served model: its name, chat format (ChatFormat protocol of generate.py), batcher and request limits."""

    model_id: str
    fmt: Any
    batcher: Batcher
    default_max_tokens: int = DEFAULTS.default_max_tokens
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "picochat"
    max_request_bytes: int = DEFAULTS.max_request_bytes  # larger bodies get 413
    max_prompt_tokens: int | None = DEFAULTS.max_prompt_tokens  # per request (all its prompts); None = the context

    @property
    def max_context(self) -> int:
        return self.batcher.max_len


def load_backend(checkpoint: Path | None = None, tokenizer: Path | None = None, hf_model: str | Path | None = None,
                 *, model_name: str | None = None, precision: str = DEFAULTS.precision, max_len: int | None = None,
                 max_batch: int = DEFAULTS.max_batch, chunk_tokens: int = DEFAULTS.chunk_tokens,
                 prefill_rows: int = DEFAULTS.prefill_rows,
                 batch_wait_ms: float = DEFAULTS.batch_wait_ms, default_max_tokens: int = DEFAULTS.default_max_tokens,
                 max_queue: int = DEFAULTS.max_queue, warmup: bool = True,
                 max_request_bytes: int = DEFAULTS.max_request_bytes,
                 max_prompt_tokens: int | None = DEFAULTS.max_prompt_tokens,
                 hf_max_len: int = DEFAULTS.hf_max_len) -> Backend:
    """A Backend for a native checkpoint folder (+ tokenizer.json) or a Hugging Face model folder."""
    if (checkpoint is None) == (hf_model is None):
        raise ValueError("give exactly one of a native checkpoint (--checkpoint) or an HF model folder (--hf-model)")
    if checkpoint is not None:
        from picochat_jax.generate import load_native

        engine, fmt = load_native(Path(checkpoint), tokenizer, precision=precision, max_len=max_len,
                                  max_batch=max_batch, chunk_tokens=chunk_tokens, scan_unroll=SERVE_SCAN_UNROLL)
        name = model_name or "picochat"
    else:
        try:
            from picochat_jax.hf.chat_format import load_hf_chat
        except ImportError as exc:  # the HF bridge is optional for native-only installs
            raise ValueError(f"--hf-model needs the HF bridge (picochat_jax.hf), which failed to import: {exc}") \
                from exc
        engine, fmt = load_hf_chat(hf_model, precision=precision, max_len=max_len, max_batch=max_batch,
                                   default_max_len=hf_max_len, chunk_tokens=chunk_tokens,
                                   scan_unroll=SERVE_SCAN_UNROLL)
        name = model_name or Path(str(hf_model)).name
    batcher = Batcher(engine, fmt.stop_ids, batch_wait_s=batch_wait_ms / 1000.0, max_queue=max_queue,
                      prefill_rows=prefill_rows)
    if warmup:
        batcher.warmup((fmt.encode_text("hi") or [0])[0])
    return Backend(name, fmt, batcher, default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes,
                   max_prompt_tokens=max_prompt_tokens)
