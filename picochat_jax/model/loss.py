"""The masked next-token cross-entropy of a Decoder, in float32: what training minimises and what `eval loss`
and SFT fit report. Model math, so evaluation uses it without importing the training package."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from picochat_jax.model.transformer import Decoder

Array = jax.Array
Batch = dict[str, Array]


def token_losses(model: Decoder, params: Any, batch: Batch, ce_chunk_tokens: int = 0) -> Array:
    """Per-token cross-entropy in float32, shape (B, T).

    With `ce_chunk_tokens` > 0 the (B, T, V) float32 logits never exist at once: see `chunked_token_losses`.
    """
    # Packed rows carry per-segment positions (each document starts at 0); without them positions are 0..T-1.
    hidden = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"), return_hidden=True)
    if ce_chunk_tokens > 0:
        return chunked_token_losses(model, params, hidden, batch["targets"], ce_chunk_tokens)
    return model.apply({"params": params}, hidden, batch["targets"], method=Decoder.token_cross_entropy)


def ce_chunk_rows(batch: int, seq: int, chunk_tokens: int) -> int:
    """Rows per cross-entropy chunk: the largest divisor of `batch` with at most `chunk_tokens` tokens."""
    rows = max(1, min(batch, chunk_tokens // max(seq, 1)))
    while batch % rows:
        rows -= 1
    return rows


def chunked_token_losses(model: Decoder, params: Any, hidden: Array, targets: Array, chunk_tokens: int) -> Array:
    """Cross-entropy from the final hidden state, a few rows at a time, logits recomputed in the backward.

    Only one chunk's (rows, T, V) float32 logits is live in the forward and in the backward, instead of the
    whole batch's (1 GB at 64x512x8192; 4 GB at 16x2048x32768): the price is one extra vocab matmul.
    """
    B, T, D = hidden.shape
    rows = ce_chunk_rows(B, T, chunk_tokens)
    n = B // rows

    @jax.checkpoint
    def chunk_ce(h: Array, y: Array) -> Array:
        return model.apply({"params": params}, h, y, method=Decoder.token_cross_entropy)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, Array]:
        return carry, chunk_ce(*xs)

    _, ce = jax.lax.scan(body, None, (hidden.reshape(n, rows, T, D), targets.reshape(n, rows, T)))
    return ce.reshape(B, T)


def loss_sums(model: Decoder, params: Any, batch: Batch, token_bytes: Array,
              ce_chunk_tokens: int = 0) -> tuple[Array, Array, Array]:
    """(sum of masked CE, masked tokens, masked target bytes) for one micro-batch."""
    mask = batch["loss_mask"]
    ce = token_losses(model, params, batch, ce_chunk_tokens)
    return jnp.sum(ce * mask), jnp.sum(mask), jnp.sum(token_bytes[batch["targets"]] * mask)
