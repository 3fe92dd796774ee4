"""Chunked KV-cache decoding for the server: per-row sampling settings, tokens handed out as they appear.

`generate.Engine` runs a whole reply in one compiled program, which suits eval but not a server: a stream
must see tokens while the reply is still being written, and one batch mixes requests with their own
temperature, top_p, seed and max_tokens. This engine therefore splits the work into

  * one jitted prefill per (batch bucket, prompt bucket, cache bucket), and
  * one jitted decode chunk per (batch bucket, cache bucket) that advances every row by up to
    `chunk_tokens` tokens inside a `lax.while_loop` and returns to Python,

so the Python loop runs once per chunk, not per token, and the step counter, sampling settings and the
"this row is finished" flags are traced inputs: nothing recompiles as a reply grows or as requests change.
Between chunks the caller may cancel rows (a client went away, a stop string was found).

The layout matches `generate.Engine`: prompts left-padded so one cache slot index drives the batch,
per-row positions keep RoPE / learned positions those of the unpadded prompt, `kv_valid` hides padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax.config import ModelConfig
from picochat_jax.generate import Engine, bucket_length, context_length, filter_logits, inference_params
from picochat_jax.model.transformer import Decoder, init_cache, make_model

Array = jax.Array


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings of one row (one request) of a batch."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class ChunkResult:
    """What one decode chunk produced: new tokens per row (stop token excluded), and for each row that
    finished during this chunk its reason ("stop", "length" or "cancelled"; None while still running)."""

    tokens: list[list[int]]
    finished: list[str | None]


def _last_position_logits(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    # Prefill needs one row of logits per prompt; a (B, P, vocab) array would dwarf a small model.
    if context.method_name == "logits_from_hidden":
        args = (args[0][:, -1:], *args[1:])
    return next_fun(*args, **kwargs)


def _pick(logits: Array, seeds: Array, t: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Next token per row; greedy rows (temperature 0) take the argmax, others sample with their own key.

    The key of step t is fold_in(key(seed), t): a row's draws depend on its seed, not on its neighbours.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_: Any) -> Array:
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), t))(seeds)
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        kept = jax.vmap(lambda row, k, p: filter_logits(row[None], k, p)[0])(scaled, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # An all-greedy batch skips the vocabulary sort entirely.
    return jax.lax.cond(jnp.all(temperature == 0), lambda _: greedy, sample, None)


def _prefill(model: Decoder, params: Any, tokens: Array, prompt_lens: Array, temperature: Array, top_k: Array,
             top_p: Array, seeds: Array, *, cache_len: int) -> tuple[Array, dict[str, Array]]:
    """Run the left-padded (B, P) prompts into a fresh cache of cache_len slots; returns (first token, cache)."""
    B, P = tokens.shape
    pad = P - prompt_lens
    kv_valid = jnp.arange(cache_len)[None, :] >= pad[:, None]
    positions = jnp.maximum(jnp.arange(P)[None, :] - pad[:, None], 0)
    cache = init_cache(model.cfg, B, cache_len, model.dtype)
    with nn.intercept_methods(_last_position_logits):
        logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                                    cache_index=jnp.int32(0), kv_valid=kv_valid)
    return _pick(logits[:, -1], seeds, jnp.int32(0), temperature, top_k, top_p), cache


def _decode_chunk(model: Decoder, params: Any, cache: dict[str, Array], tok: Array, t: Array, done: Array,
                  prompt_len: Array, prompt_bucket: Array, max_new: Array, temperature: Array, top_k: Array,
                  top_p: Array, seeds: Array, stop_ids: Array, *, steps: int) -> tuple[Array, ...]:
    """Advance every unfinished row by up to `steps` tokens.

    `tok` holds each row's pending token (reply token number t). A step records it, marks the row done on a
    stop token or when it was the row's last allowed token, then feeds it to the model to pick the next.
    Returns (out (B, steps) with -1 for finished rows, t, tok, cache, done).
    """
    B = tok.shape[0]
    S = cache["k"].shape[2]
    kv_valid = jnp.arange(S)[None, :] >= (prompt_bucket - prompt_len)[:, None]

    def cond(carry: tuple) -> Array:
        i, _, _, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, t, tok, cache, out, done = carry
        out = out.at[:, i].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, stop_ids) | (t + 1 >= max_new)
        # Slot P + t stays below the cache length: every row is done once t + 1 reaches the largest max_new.
        logits, cache = model.apply({"params": params}, tok[:, None], positions=(prompt_len + t)[:, None],
                                    cache=cache, cache_index=prompt_bucket + t, kv_valid=kv_valid)
        nxt = _pick(logits[:, 0], seeds, t + 1, temperature, top_k, top_p)
        return i + 1, t + 1, nxt, cache, out, done

    init = (jnp.int32(0), t, tok, cache, jnp.full((B, steps), -1, jnp.int32), done)
    _, t, tok, cache, out, done = jax.lax.while_loop(cond, body, init)
    return out, t, tok, cache, done


# The model is a static argument: engines serving the same architecture share compiled programs.
_PREFILL = jax.jit(_prefill, static_argnames=("model", "cache_len"))


@functools.cache
def _chunk_program(donate_cache: bool) -> Any:
    # The cache is rewritten every chunk: donating it saves a copy per chunk where the backend can
    # (CPU cannot, and would warn on every call).
    return jax.jit(_decode_chunk, static_argnames=("model", "steps"),
                   donate_argnames=("cache",) if donate_cache else ())


class ChunkedEngine:
    """Batched generation that yields after every chunk of tokens. Call it from one thread only."""

    def __init__(self, params: Any, model_cfg: ModelConfig, max_len: int | None = None, precision: str = "fp32",
                 *, max_batch: int = 8, chunk_tokens: int = 8, pad_id: int = 0):
        self.max_len = context_length(model_cfg, max_len, max_batch)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model_cfg = model_cfg
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self.pad_id = pad_id
        self.model = make_model(model_cfg, precision)
        # Committed to one device however they were loaded, so every engine of this model calls the
        # shared programs with the same argument placement (a different one would compile them again).
        self.params = inference_params(params, self.model.dtype, jax.devices()[0])
        self._prefill = functools.partial(_PREFILL, self.model)
        self._chunk = functools.partial(_chunk_program(jax.default_backend() != "cpu"), self.model)

    @classmethod
    def from_engine(cls, engine: Engine, *, chunk_tokens: int = 8, max_batch: int | None = None,
                    pad_id: int = 0) -> ChunkedEngine:
        """Reuse a loaded `generate.Engine`'s device params and settings (load_native / load_hf_chat)."""
        return cls(engine.params, engine.model_cfg, engine.max_len, engine.precision,
                   max_batch=max_batch or engine.max_batch, chunk_tokens=chunk_tokens, pad_id=pad_id)

    @property
    def compiled_programs(self) -> int:
        """Programs compiled so far: one prefill per shape bucket, one chunk per (batch, cache) bucket.

        The programs are cached per model config, so engines of the same model (a reload, tests) share them.
        """
        return _PREFILL._cache_size() + _chunk_program(jax.default_backend() != "cpu")._cache_size()

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("cannot generate from an empty prompt")
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context length of {self.max_len} tokens")

    def run(self, prompts: Sequence[Sequence[int]], rows: Sequence[RowSampling], stop_ids: Sequence[int],
            cancelled: Callable[[], Sequence[bool]] | None = None) -> Iterator[ChunkResult]:
        """Generate for up to max_batch prompts at once, yielding after the prefill's first chunk and every
        chunk after it. `cancelled()` is asked between chunks; a cancelled row stops at once."""
        n = len(prompts)
        if n != len(rows):
            raise ValueError(f"{n} prompts but {len(rows)} sampling rows")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"a batch holds 1..{self.max_batch} prompts, got {n}")
        for p, r in zip(prompts, rows, strict=True):
            self.check_fits(len(p), r.max_new_tokens)
        longest = max(len(p) for p in prompts)
        max_new = max(r.max_new_tokens for r in rows)
        if longest + max_new > self.max_len:
            raise ValueError(f"longest prompt ({longest}) + largest max_new_tokens ({max_new}) exceeds the context "
                             f"length of {self.max_len}: split such requests into separate batches")
        B = bucket_length(n, self.max_batch, floor=1)
        P = bucket_length(longest, self.max_len - max_new)
        S = bucket_length(P + max_new, self.max_len)

        tokens = np.full((B, P), self.pad_id, np.int32)
        lens = np.ones((B,), np.int32)  # filler rows: one pad token, born finished
        limits = np.ones((B,), np.int32)
        temps, top_p = np.zeros((B,), np.float32), np.ones((B,), np.float32)
        top_k, seeds = np.zeros((B,), np.int32), np.zeros((B,), np.uint32)
        for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
            tokens[i, P - len(p):] = [int(x) for x in p]
            lens[i], limits[i] = len(p), r.max_new_tokens
            temps[i], top_p[i], top_k[i], seeds[i] = r.temperature, r.top_p, r.top_k, r.seed % (1 << 32)
        stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
        stop_set = {int(s) for s in stop_ids}
        lens_d, limits_d, temps_d, top_k_d, top_p_d, seeds_d = (
            jnp.asarray(a) for a in (lens, limits, temps, top_k, top_p, seeds))

        tok, cache = self._prefill(self.params, jnp.asarray(tokens), lens_d, temps_d, top_k_d, top_p_d, seeds_d,
                                   cache_len=S)
        done = np.zeros((B,), bool)
        done[n:] = True
        finished: list[str | None] = [None] * n
        t = 0  # kept on the host: a device scalar fed back would flip committed-ness and recompile once
        while True:
            reasons: list[str | None] = [None] * n
            flags = list(cancelled()) if cancelled is not None else [False] * n
            for i in range(n):
                if flags[i] and finished[i] is None:
                    done[i] = True
                    finished[i] = reasons[i] = "cancelled"
            if done.all():
                if any(reasons):
                    yield ChunkResult([[] for _ in range(n)], reasons)
                return
            out, t_d, tok, cache, done_d = self._chunk(
                self.params, cache, tok, np.int32(t), jnp.asarray(done), lens_d, np.int32(P), limits_d, temps_d,
                top_k_d, top_p_d, seeds_d, stops, steps=self.chunk_tokens)
            out, done, t = np.asarray(out), np.array(done_d), int(t_d)
            new_tokens: list[list[int]] = []
            for i in range(n):
                row, hit_stop = [], False
                for x in out[i].tolist():
                    if x < 0:
                        break
                    if x in stop_set:
                        hit_stop = True
                        break
                    row.append(x)
                new_tokens.append(row)
                if done[i] and finished[i] is None:
                    finished[i] = reasons[i] = "stop" if hit_stop else "length"
            yield ChunkResult(new_tokens, reasons)
