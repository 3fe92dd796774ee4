"""The one decode engine: batched, jitted KV-cache generation for eval, chat and the server alike.

The work is split into

  * one jitted prefill per (batch bucket, prompt bucket, cache bucket), and
  * one jitted decode chunk per (batch bucket, cache bucket, chunk length) that advances every row by up to
    that many tokens inside a `lax.while_loop` and returns to Python,

so the Python loop runs once per chunk, not per token, and the step counter, per-row sampling settings and
the "this row is finished" flags are traced inputs: nothing recompiles as a reply grows or as requests
change. `Engine.run` yields after every chunk (the server streams those tokens and cancels rows between
chunks); `Engine.generate` drains it for a whole list of prompts (eval, chat), with one chunk as long as the
reply, so a batch still runs as one prefill and one decode program.

Left padding keeps every row's last prompt token in the same slot, so one slot index drives the decode
loop for the whole batch; per-row positions (slot minus that row's padding) keep RoPE / learned positions
identical to the unpadded prompt, and `kv_valid` hides the pad slots from every query.

One seed rule everywhere: the key of reply token t of a row is fold_in(key(seed), t), so the same prompt,
seed and sampling settings give the same text from `eval chat`, `chat` and `serve`, whatever the batch.

    engine, fmt = load_native(Path("RUN/sft/checkpoint"))
    ids = engine.generate([fmt.encode_prompt(messages)], SamplingParams(max_new_tokens=48), fmt.stop_ids)
    reply = fmt.decode(ids[0])
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax.config import ModelConfig
from picochat_jax.data.chat import encode_prompt
from picochat_jax.data.records import Message
from picochat_jax.model.transformer import (
    Decoder,
    cache_batch_and_length,
    default_scan_unroll,
    init_cache,
    make_model,
    unstack_layers,
)
from picochat_jax.tokenizer import ChatTokenizer

Array = jax.Array

MIN_BUCKET = 16  # shortest prompt bucket: below this, padding costs less than another compile


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one reply (a row of a batch): the same dataclass for eval, chat and serve."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:  # 0 keeps only the most likely token, as OpenAI's API allows
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ChatFormat(Protocol):
    """How prompts become ids and ids become text, per model family."""

    stop_ids: tuple[int, ...]
    pad_id: int

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]: ...

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def special_tokens(self) -> dict[str, str | None]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class NativeChatFormat:
    """ChatFormat for picochat's own tokenizer and chat template (data/chat.py)."""

    def __init__(self, tok: ChatTokenizer):
        self.tok = tok
        self.stop_ids: tuple[int, ...] = (tok.end_id,)
        self.pad_id: int = tok.pad_id

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return encode_prompt(messages, self.tok).tolist()

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Base pretraining saw every document after <|bos|>, so raw completion starts the same way.
        return [self.tok.bos_id, *self.tok.encode(text)] if add_special_tokens else self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def special_tokens(self) -> dict[str, str | None]:
        name = self.tok.tok.id_to_token
        return {"bos_token": name(self.tok.bos_id), "eos_token": name(self.tok.end_id),
                "pad_token": name(self.tok.pad_id)}


# --------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Mask (B, V) logits outside top-k and the top-p nucleus with -inf.

    k and p are traced scalars (k = 0 and p = 1 switch a filter off), so changing them never recompiles.
    Tokens tied with the cut-off logit are kept.
    """
    V = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take(desc, k - 1, axis=-1)[:, None]
    desc = jnp.where(jnp.arange(V)[None, :] < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # A token stays in the nucleus while the mass strictly before it is under top_p: the first always does.
    in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    n_keep = jnp.maximum(jnp.sum(in_nucleus, axis=-1), 1)
    p_cut = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    cut = jnp.maximum(kth, p_cut)
    return jnp.where(logits < cut, -jnp.inf, logits)


# --------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class ChunkResult:
    """What one decode chunk produced: new tokens per row (stop token excluded), and for each row that
    finished during this chunk its reason ("stop", "length" or "cancelled"; None while still running)."""

    tokens: list[list[int]]
    finished: list[str | None]


def _last_position_logits(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: project only the last position onto the vocabulary during prefill.

    The prefill needs one row of logits per prompt; projecting all P positions would allocate a
    (B, P, vocab) array, which for a 150k-token HF vocabulary dwarfs the model itself.
    """
    if context.method_name == "logits_from_hidden":
        args = (args[0][:, -1:], *args[1:])
    return next_fun(*args, **kwargs)


def _pick(logits: Array, seeds: Array, t: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Next token per row; greedy rows (temperature 0) take the argmax, others sample with their own key.

    The key of step t is fold_in(key(seed), t): a row's draws depend on its seed, not on its neighbours.
    `t` is one step for all rows or one per row (continuous batching: rows at different reply lengths).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_: Any) -> Array:
        steps = jnp.broadcast_to(t, seeds.shape)
        keys = jax.vmap(lambda s, step: jax.random.fold_in(jax.random.key(s), step))(seeds, steps)
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
    cache = init_cache(model, B, cache_len)
    with nn.intercept_methods(_last_position_logits):
        logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                                    cache_index=jnp.int32(0), kv_valid=kv_valid)
    return _pick(logits[:, -1], seeds, jnp.int32(0), temperature, top_k, top_p), cache


def _decode_steps(model: Decoder, params: Any, cache: dict[str, Array], tok: Array, t: Array, done: Array,
                  max_new: Array, sampling: tuple[Array, ...], stop_ids: Array, steps: int,
                  place: Callable[[Array], tuple[Array, Array, Array | None]]) -> tuple[Array, ...]:
    """Advance every unfinished row by up to `steps` tokens: the loop both decode programs share.

    `tok` holds each row's pending token (reply token number t). A step records it, marks the row done on a
    stop token or when it was the row's last allowed token, then feeds it to the model to pick the next.
    `place(t)` gives the step's (positions (B, 1), cache index, kv_valid). `t` is one scalar for a static batch
    or one per row (slots), where finished rows keep theirs. Returns (out (B, steps) with -1 for finished rows,
    t, tok, cache, done)."""
    B = tok.shape[0]
    temperature, top_k, top_p, seeds = sampling
    per_row = t.ndim == 1

    def cond(carry: tuple) -> Array:
        i, _, _, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, t, tok, cache, out, done = carry
        out = out.at[:, i].set(jnp.where(done, -1, tok))
        was_done = done
        done = done | jnp.isin(tok, stop_ids) | (t + 1 >= max_new)
        positions, cache_index, kv_valid = place(t)
        logits, cache = model.apply({"params": params}, tok[:, None], positions=positions, cache=cache,
                                    cache_index=cache_index, kv_valid=kv_valid)
        nxt = _pick(logits[:, 0], seeds, t + 1, temperature, top_k, top_p)
        if per_row:
            return i + 1, jnp.where(was_done, t, t + 1), jnp.where(was_done, tok, nxt), cache, out, done
        return i + 1, t + 1, nxt, cache, out, done

    init = (jnp.int32(0), t, tok, cache, jnp.full((B, steps), -1, jnp.int32), done)
    _, t, tok, cache, out, done = jax.lax.while_loop(cond, body, init)
    return out, t, tok, cache, done


def _decode_chunk(model: Decoder, params: Any, cache: dict[str, Array], tok: Array, t: Array, done: Array,
                  prompt_len: Array, prompt_bucket: Array, max_new: Array, temperature: Array, top_k: Array,
                  top_p: Array, seeds: Array, stop_ids: Array, *, steps: int) -> tuple[Array, ...]:
    """A static batch's chunk: left-padded prompts, so one cache slot prompt_bucket + t serves every row."""
    S = cache_batch_and_length(cache)[1]
    kv_valid = jnp.arange(S)[None, :] >= (prompt_bucket - prompt_len)[:, None]

    def place(t: Array) -> tuple[Array, Array, Array]:
        # Slot P + t stays below the cache length: every row is done once t + 1 reaches the largest max_new.
        return (prompt_len + t)[:, None], prompt_bucket + t, kv_valid

    return _decode_steps(model, params, cache, tok, t, done, max_new, (temperature, top_k, top_p, seeds), stop_ids,
                         steps, place)


# The model is a static argument: engines serving the same architecture share compiled programs.
_PREFILL = jax.jit(_prefill, static_argnames=("model", "cache_len"))


# ------------------------------------------------------------------------------- continuous batching (slots)


def _prefill_slots(model: Decoder, params: Any, cache: dict[str, Any], tok: Array, t: Array, done: Array,
                   slots: Array, tokens: Array, prompt_lens: Array, temperature: Array, top_k: Array, top_p: Array,
                   seeds: Array) -> tuple[dict[str, Any], Array, Array, Array]:
    """Right-padded (R, P) prompts into cache slots `slots` (R,) (each its rows 0..P-1), and those slots'
    decode state set to their first token at reply step 0, not done; returns (cache, tok, t, done). A row whose
    slot is out of range (the cache's batch size) is filler: its writes are dropped.

    The first tokens stay on the device: admitting requests never waits for the chunk in flight. Padding
    after a prompt writes keys a decode step never sees: step t reads the cache only below slot
    prompt_len + t (its own key comes straight from the step) and then writes that slot."""
    R, P = tokens.shape

    def at_prompt_end(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name == "logits_from_hidden":  # only each row's last real position onto the vocabulary
            args = (jnp.take_along_axis(args[0], (prompt_lens - 1)[:, None, None], axis=1), *args[1:])
        return next_fun(*args, **kwargs)

    fresh = init_cache(model, R, P)
    with nn.intercept_methods(at_prompt_end):
        logits, fresh = model.apply({"params": params}, tokens, positions=jnp.broadcast_to(jnp.arange(P), (R, P)),
                                    cache=fresh, cache_index=jnp.int32(0))
    cache = jax.tree_util.tree_map(
        lambda c, f: c.at[(slice(None),) * (c.ndim - 4) + (slots, slice(0, P))].set(f, mode="drop"), cache, fresh)
    first = _pick(logits[:, -1], seeds, jnp.int32(0), temperature, top_k, top_p)
    return (cache, tok.at[slots].set(first, mode="drop"), t.at[slots].set(0, mode="drop"),
            done.at[slots].set(False, mode="drop"))


def _decode_slots(model: Decoder, params: Any, cache: dict[str, Array], tok: Array, t: Array, done: Array,
                  prompt_len: Array, max_new: Array, temperature: Array, top_k: Array, top_p: Array, seeds: Array,
                  stop_ids: Array, *, steps: int) -> tuple[Array, ...]:
    """A chunk over slots: every row has its own prompt length and reply step t, so its cache slot
    prompt_len + t and its position differ from its neighbours'."""
    S = cache_batch_and_length(cache)[1]

    def place(t: Array) -> tuple[Array, Array, None]:
        at = jnp.minimum(prompt_len + t, S - 1)  # finished and free rows write where no live row reads
        return at[:, None], at, None

    return _decode_steps(model, params, cache, tok, t, done, max_new, (temperature, top_k, top_p, seeds), stop_ids,
                         steps, place)


def _decode_slots_window(model: Decoder, params: Any, cache: dict[str, Array], tok: Array, t: Array, done: Array,
                         live: Array, *args: Array, steps: int, window: int) -> tuple[Array, ...]:
    """`_decode_slots` over the live slots (a free or released one is done), on the first `window` cache
    positions only: every live slot's tokens fit in them, so attention reads `window` keys a step instead of
    the whole cache."""
    view = jax.tree_util.tree_map(lambda c: jax.lax.slice_in_dim(c, 0, window, axis=c.ndim - 3), cache)
    out, t, tok, view, done = _decode_slots(model, params, view, tok, t, done | ~live, *args, steps=steps)
    cache = jax.tree_util.tree_map(lambda c, v: jax.lax.dynamic_update_slice_in_dim(c, v, 0, axis=c.ndim - 3),
                                   cache, view)
    return out, t, tok, cache, done


@functools.cache
def _slot_programs(donate_cache: bool) -> tuple[Any, Any]:
    """(prefill into slots, decode chunk over slots), donating the cache where the backend can."""
    donate = ("cache",) if donate_cache else ()
    return (jax.jit(_prefill_slots, static_argnames=("model",), donate_argnames=donate),
            jax.jit(_decode_slots_window, static_argnames=("model", "steps", "window"), donate_argnames=donate))


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (completions allow 5)


def _score(model: Decoder, params: Any, tokens: Array, top_k: int) -> tuple[Array, Array, Array]:
    """Log-probabilities of each next token of right-padded rows (B, T): (B, T-1) for the tokens themselves and
    (B, T-1, top_k) values and ids of the most likely ones, from one forward pass in float32."""
    logp = jax.nn.log_softmax(model.apply({"params": params}, tokens).astype(jnp.float32)[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logp, max(top_k, 1))
    return chosen, top_values, top_ids


_SCORE = jax.jit(_score, static_argnames=("model", "top_k"))


@dataclass(frozen=True)
class TokenScores:
    """Per token of a sequence: the log-probability the model gave it after the tokens before it (None for the
    first token, which has no context), and the `top` most likely alternatives at that position."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@functools.cache
def _chunk_program(donate_cache: bool) -> Any:
    # The cache is rewritten every chunk: donating it saves a copy per chunk where the backend can
    # (CPU cannot, and would warn on every call).
    return jax.jit(_decode_chunk, static_argnames=("model", "steps"),
                   donate_argnames=("cache",) if donate_cache else ())


def bucket_length(n: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `floor`), never above cap."""
    return min(cap, max(floor, 1 << max(0, n - 1).bit_length()))


def window_length(n: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """The attention window (cache positions read) of a decode chunk whose rows reach position n: a power of
    two up to 256, above it also three quarters of the next one (384, 768, 1536, ...), never above cap.
    Attention reads scale with the window, so the in-between sizes save up to a third of the reads of a long
    context for two more compiled windows an octave."""
    bucket = bucket_length(n, cap, floor)
    if bucket > 256 and n <= 3 * bucket // 4:
        return 3 * bucket // 4
    return bucket


def decode_windows(cap: int, steps: int) -> list[int]:
    """Every window `window_length` gives a chunk of `steps` tokens in a cache of `cap` positions."""
    return sorted({window_length(reach, cap) for reach in range(1 + steps, cap + steps + 1)})


def context_length(model_cfg: ModelConfig, max_len: int | None, max_batch: int) -> int:
    """The cache length an engine decodes into (`max_len`, default the model's context), after checking
    the engine's limits against the model."""
    if max_len is not None and max_len > model_cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's context (max_seq_len {model_cfg.max_seq_len})")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return max_len or model_cfg.max_seq_len


def inference_params(params: Any, dtype: Any, device: Any = None) -> Any:
    """Floating leaves cast to the compute dtype and put on `device` (default: JAX's default placement).

    Inference needs no float32 master copy: bf16 runs keep bf16 weights and half the memory.
    """
    return jax.device_put(jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, params),
        device)


class Engine:
    """Batched generation for one model. `run` yields after every chunk of tokens; `generate` drains it.
    Call it from one thread only."""

    def __init__(self, params: Any, model_cfg: ModelConfig, max_len: int | None = None, precision: str = "fp32",
                 *, max_batch: int = 32, chunk_tokens: int = 8, pad_id: int = 0, scan_unroll: int = 1,
                 layer_loop: bool | None = None):
        self.max_len = context_length(model_cfg, max_len, max_batch)
        self.precision = precision
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model_cfg = model_cfg
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self.pad_id = pad_id
        # Layers per scan iteration; 0 = the backend's default (all of them on GPU). Unrolled, an H200 decode step
        # of a 0.5B model ran 12-17% faster but compiled ~5x longer (docs/performance.md): the server, which
        # compiles once at warmup, asks for it; eval and chat, which compile per batch shape, do not. Fully
        # unrolled, the layers run as a loop over per-layer params and caches (`layer_loop`, None = then),
        # which spares every decode step the copies of slicing stacked ones.
        unroll = scan_unroll or default_scan_unroll(model_cfg)
        if layer_loop is None:
            layer_loop = unroll >= model_cfg.n_layers
        self.model = make_model(model_cfg, precision, scan_unroll=1 if layer_loop else unroll, layer_loop=layer_loop)
        # Committed to one device however they were loaded, so every engine of this model calls the
        # shared programs with the same argument placement (a different one would compile them again).
        params = inference_params(params, self.model.dtype, jax.devices()[0])
        self.params = unstack_layers(params) if layer_loop else params
        self._prefill = functools.partial(_PREFILL, self.model)
        self._chunk = functools.partial(_chunk_program(jax.default_backend() != "cpu"), self.model)

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

    def score(self, sequences: Sequence[Sequence[int]], top: int = 0) -> list[TokenScores]:
        """Log-probabilities of every token of each sequence given the ones before it (what an evaluator's
        echo/logprobs request asks), with the `top` most likely tokens at each position. One jitted forward
        pass per batch of rows, lengths bucketed to powers of two. Reads the parameters only, so it may run
        beside `run` on another thread."""
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        out: list[TokenScores] = []
        for lo in range(0, len(sequences), self.max_batch):
            rows = [[int(t) for t in s] for s in sequences[lo:lo + self.max_batch]]
            longest = max(len(r) for r in rows)
            if longest > self.max_len:
                raise ValueError(f"a sequence of {longest} tokens exceeds the context length of {self.max_len}")
            width = bucket_length(longest, self.max_len, floor=2)
            tokens = np.full((bucket_length(len(rows), self.max_batch, floor=1), width), self.pad_id, np.int32)
            for i, r in enumerate(rows):
                tokens[i, :len(r)] = r
            chosen, values, ids = jax.device_get(_SCORE(self.model, self.params, jnp.asarray(tokens),
                                                        top_k=MAX_TOP_LOGPROBS if top else 0))
            for i, r in enumerate(rows):
                n = len(r) - 1
                out.append(TokenScores(r, [None] + chosen[i, :n].astype(float).tolist(),
                                       [None] + [list(zip(ids[i, j, :top].tolist(), values[i, j, :top].astype(float)
                                                          .tolist(), strict=True)) if top else []
                                                 for j in range(n)]))
        return out

    def fit_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[list[list[int]], int]:
        """Left-truncate prompts so prompt + max_new_tokens fits the context; returns (prompts, how many cut)."""
        if max_new_tokens >= self.max_len:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the context length ({self.max_len})")
        limit = self.max_len - max_new_tokens
        out, cut = [], 0
        for p in prompts:
            p = [int(t) for t in p]
            if not p:
                raise ValueError("cannot generate from an empty prompt")
            if len(p) > limit:
                p, cut = p[-limit:], cut + 1
            out.append(p)
        return out, cut

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, stop_ids: Sequence[int],
                 batch_size: int | None = None) -> list[list[int]]:
        """Replies to many prompts (only the new tokens, without the stop token), in batches of similar length;
        prompts too long for the context lose their oldest tokens (with a warning)."""
        if not prompts:
            return []
        fitted, cut = self.fit_prompts(prompts, sampling.max_new_tokens)
        if cut:
            warnings.warn(f"{cut} of {len(prompts)} prompts were longer than {self.max_len - sampling.max_new_tokens} "
                          f"tokens (context {self.max_len} minus {sampling.max_new_tokens} new tokens) and lost their "
                          "oldest tokens", stacklevel=2)
        batch_size = min(batch_size or self.max_batch, self.max_batch, len(fitted))
        # Similar lengths share a batch, so few rows pay for a long neighbour's padding.
        order = sorted(range(len(fitted)), key=lambda i: len(fitted[i]))
        results: list[list[int]] = [[] for _ in fitted]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for chunk in self.run([fitted[i] for i in idx], [sampling] * len(idx), stop_ids,
                                  chunk_tokens=sampling.max_new_tokens):
                for i, new in zip(idx, chunk.tokens, strict=True):
                    results[i].extend(new)
        return results

    def slots(self, stop_ids: Sequence[int], size: int | None = None, prefill_rows: int = 1) -> SlotBatch:
        """Continuous batching over this engine's model with `size` slots (see `SlotBatch`)."""
        return SlotBatch(self, stop_ids, size, prefill_rows)

    def run(self, prompts: Sequence[Sequence[int]], rows: Sequence[SamplingParams], stop_ids: Sequence[int],
            cancelled: Callable[[], Sequence[bool]] | None = None,
            chunk_tokens: int | None = None) -> Iterator[ChunkResult]:
        """Generate for up to max_batch prompts at once, yielding after every chunk of `chunk_tokens` (default:
        the engine's) tokens. `cancelled()` is asked between chunks; a cancelled row stops at once."""
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
                top_k_d, top_p_d, seeds_d, stops, steps=chunk_tokens or self.chunk_tokens)
            out, done, t = np.asarray(out), np.array(done_d), int(t_d)
            new_tokens: list[list[int]] = []
            for i in range(n):
                row, hit_stop = chunk_row_tokens(out[i], stop_set)
                new_tokens.append(row)
                if done[i] and finished[i] is None:
                    finished[i] = reasons[i] = "stop" if hit_stop else "length"
            yield ChunkResult(new_tokens, reasons)


def chunk_row_tokens(row: np.ndarray, stop_set: set[int]) -> tuple[list[int], bool]:
    """A decode chunk's tokens for one row, up to its first -1 (finished) or stop token (excluded), and
    whether a stop token ended it."""
    tokens = []
    for x in row.tolist():
        if x < 0:
            break
        if x in stop_set:
            return tokens, True
        tokens.append(x)
    return tokens, False


@dataclass(frozen=True)
class SlotChunk:
    """A decode chunk in flight (`SlotBatch.launch`): its device outputs and which admission owned each slot
    that was live when it started."""

    out: Array
    done: Array
    owners: dict[int, int]  # slot -> admission number


class SlotBatch:
    """Continuous batching on one engine: `size` cache slots (default and at most the engine's `max_batch`)
    of `max_len` tokens each.

    A request is `admit`ted into a free slot whenever one is free (`admit_many`: several prompts prefilled together,
    `prefill_rows` per program call); `launch` starts one chunk over every live slot and `collect` waits for a
    launched chunk's tokens. Requests join and leave between chunks, so a long reply never holds a short one back.
    Each slot's pending token, reply step and done flag live on the device, so neither admitting nor launching waits
    for the device: a caller can launch the next chunk before it collects the last, keeping the device busy while
    the host hands tokens out (`step` is both at once). The same model programs, sampling and stop rules as
    `Engine.run`: a greedy or seeded reply is the same token for token. Call from one thread only.
    """

    def __init__(self, engine: Engine, stop_ids: Sequence[int], size: int | None = None, prefill_rows: int = 1):
        self.engine = engine
        B, S = min(size or engine.max_batch, engine.max_batch), engine.max_len
        if prefill_rows < 1:
            raise ValueError(f"prefill_rows must be >= 1, got {prefill_rows}")
        self.prefill_rows = min(prefill_rows, B)
        # Everything the programs take is committed to the params' device from the start: the programs'
        # outputs are, and an input that changed placement after the first chunk would compile every program
        # a second time.
        self.device = jax.devices()[0]
        self.cache = jax.device_put(init_cache(engine.model, B, S), self.device)
        self.tok, self.t = (jax.device_put(np.zeros((B,), np.int32), self.device) for _ in range(2))
        self.done = jax.device_put(np.ones((B,), bool), self.device)
        self.stops = jax.device_put(np.asarray(list(stop_ids) or [-1], np.int32), self.device)
        self.stop_set = {int(x) for x in stop_ids}
        # Per-slot settings, fixed while a request holds its slot: sent to the device again only after a change.
        self.lens, self.limits = np.zeros((B,), np.int32), np.zeros((B,), np.int32)
        self.temps, self.top_p = np.zeros((B,), np.float32), np.ones((B,), np.float32)
        self.top_k, self.seeds = np.zeros((B,), np.int32), np.zeros((B,), np.uint32)
        self.live = [False] * B
        self._settings: tuple[Array, ...] | None = None
        self._admissions = [0] * B
        self._reply_steps = np.zeros((B,), np.int32)  # an upper bound of each slot's reply step t: for the window
        prefill, chunk = _slot_programs(jax.default_backend() != "cpu")
        self._prefill = functools.partial(prefill, engine.model)
        self._chunk = functools.partial(chunk, engine.model)

    def free_slots(self) -> list[int]:
        return [i for i, live in enumerate(self.live) if not live]

    def active(self) -> int:
        return sum(self.live)

    def admit(self, slot: int, prompt: Sequence[int], sampling: SamplingParams) -> None:
        """Prefill `prompt` into free `slot`; its reply starts with the next `launch`."""
        self.admit_many([slot], [prompt], [sampling])

    def admit_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                   samplings: Sequence[SamplingParams]) -> None:
        """Prefill each prompt into its free slot, `prefill_rows` prompts per program call (one call for a single
        prompt): a burst of arrivals costs a few prefills instead of one each. Checks every prompt before the
        first call; their replies start with the next `launch`."""
        if not len(slots) == len(prompts) == len(samplings):
            raise ValueError(f"{len(slots)} slots, {len(prompts)} prompts and {len(samplings)} sampling rows")
        if len(set(slots)) != len(slots) or any(self.live[s] for s in slots):
            raise ValueError(f"slots {list(slots)} are not distinct free slots")
        for prompt, sampling in zip(prompts, samplings, strict=True):
            self.engine.check_fits(len(prompt), sampling.max_new_tokens)
        for lo in range(0, len(slots), self.prefill_rows):
            self._prefill_group(slots[lo:lo + self.prefill_rows], prompts[lo:lo + self.prefill_rows],
                                samplings[lo:lo + self.prefill_rows])

    def _prefill_group(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                       samplings: Sequence[SamplingParams]) -> None:
        # Two row counts per prompt bucket (1, and prefill_rows with filler rows), so the warmup compiles few.
        R = 1 if len(slots) == 1 else self.prefill_rows
        P = bucket_length(max(len(p) for p in prompts), self.engine.max_len)
        tokens = np.full((R, P), self.engine.pad_id, np.int32)
        lens = np.ones((R,), np.int32)
        at = np.full((R,), len(self.live), np.int32)  # filler rows aim past the last slot: dropped
        temps, top_p = np.zeros((R,), np.float32), np.ones((R,), np.float32)
        top_k, seeds = np.zeros((R,), np.int32), np.zeros((R,), np.uint32)
        for i, (slot, prompt, sampling) in enumerate(zip(slots, prompts, samplings, strict=True)):
            tokens[i, :len(prompt)] = [int(x) for x in prompt]
            lens[i], at[i] = len(prompt), slot
            temps[i], top_k[i], top_p[i] = sampling.temperature, sampling.top_k, sampling.top_p
            seeds[i] = sampling.seed % (1 << 32)
        self.cache, self.tok, self.t, self.done = self._prefill(
            self.engine.params, self.cache, self.tok, self.t, self.done, at, tokens, lens, temps, top_k, top_p,
            seeds)
        for i, slot in enumerate(slots):
            self.lens[slot], self.limits[slot] = lens[i], samplings[i].max_new_tokens
            self.temps[slot], self.top_k[slot] = temps[i], top_k[i]
            self.top_p[slot], self.seeds[slot] = top_p[i], seeds[i]
            self.live[slot] = True
            self._admissions[slot] += 1
            self._reply_steps[slot] = 0
        self._settings = None

    def release(self, slot: int) -> None:
        """Free a slot (its request finished or was cancelled); the next chunk treats it as done."""
        self.live[slot] = False
        self._settings = None

    def compile_all(self, filler: int, chunk_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Run every prefill bucket and every decode window once, on dummy rows, so that no request waits for a
        compile (a first use would stall every live stream for as long). Only with no slot live: it writes into
        free slots' cache rows, which an admitted request overwrites before reading. Returns (prompt buckets,
        windows)."""
        if any(self.live):
            raise RuntimeError("compile_all() needs every slot free")
        steps = chunk_tokens or self.engine.chunk_tokens
        cap = self.engine.max_len
        lengths = [1] + [(1 << k) + 1 for k in range(MIN_BUCKET.bit_length() - 1, cap.bit_length())]
        prompt_lengths = {bucket_length(n, cap): n for n in lengths if n < cap}  # each bucket's shortest prompt
        for n in prompt_lengths.values():
            for rows in sorted({1, self.prefill_rows}):
                self.admit_many(range(rows), [[filler] * n] * rows, [SamplingParams(1)] * rows)
                for slot in range(rows):
                    self.release(slot)
        windows = decode_windows(cap, steps)
        for window in windows:
            # Every slot is free, hence done: the chunk changes nothing but free rows' cache entries. Collecting
            # it waits for the program, so the warmup ends with every compile done.
            self.collect(self._launch(steps, window))
        return sorted(prompt_lengths), windows

    def _launch(self, steps: int, window: int) -> SlotChunk:
        if self._settings is None:
            self._settings = tuple(jax.device_put(a, self.device) for a in (
                np.asarray(self.live), self.lens, self.limits, self.temps, self.top_k, self.top_p, self.seeds))
        out, self.t, self.tok, self.cache, self.done = self._chunk(
            self.engine.params, self.cache, self.tok, self.t, self.done, *self._settings, self.stops,
            steps=steps, window=window)
        owners = {i: self._admissions[i] for i, live in enumerate(self.live) if live}
        self._reply_steps[list(owners)] += steps
        return SlotChunk(out, self.done, owners)

    def launch(self, chunk_tokens: int | None = None) -> SlotChunk | None:
        """Start one chunk of every live slot on the device and return at once (None with no slot live)."""
        if not any(self.live):
            return None
        steps = chunk_tokens or self.engine.chunk_tokens
        live = np.asarray(self.live)
        # Attention reads only the positions live slots can reach this chunk (a few sizes an octave).
        reply_steps = np.minimum(self._reply_steps[live], self.limits[live])
        window = window_length(int((self.lens[live] + reply_steps).max()) + steps, self.engine.max_len)
        return self._launch(steps, window)

    def collect(self, chunk: SlotChunk | None) -> dict[int, tuple[list[int], str | None]]:
        """Wait for a launched chunk: {slot: (new tokens without the stop token, finish reason or None)} for
        each slot still held by the request it decoded for. Finished slots are released."""
        if chunk is None:
            return {}
        out, done = np.asarray(chunk.out), np.asarray(chunk.done)
        results: dict[int, tuple[list[int], str | None]] = {}
        for slot, admission in chunk.owners.items():
            if not self.live[slot] or self._admissions[slot] != admission:
                continue  # released (finished or cancelled) after this chunk started
            row, hit_stop = chunk_row_tokens(out[slot], self.stop_set)
            reason = ("stop" if hit_stop else "length") if done[slot] else None
            results[slot] = (row, reason)
            if reason is not None:
                self.release(slot)
        return results

    def step(self, chunk_tokens: int | None = None) -> dict[int, tuple[list[int], str | None]]:
        """One chunk for every live slot, waited for: `collect(launch())`."""
        return self.collect(self.launch(chunk_tokens))


def load_native(checkpoint_dir: Path, tokenizer_path: Path | None = None, *, precision: str = "fp32",
                max_len: int | None = None, max_batch: int = 32,
                chunk_tokens: int = 8, scan_unroll: int = 1) -> tuple[Engine, NativeChatFormat]:
    """Engine and chat format for a native checkpoint folder (RUN/sft/checkpoint and friends); the tokenizer
    defaults to the folder's own copy and must be the one the model was trained with."""
    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint

    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    params, model_cfg, _ = load_model_checkpoint(checkpoint_dir)
    tok = ChatTokenizer.load(tokenizer_path)
    fmt = NativeChatFormat(tok)
    return Engine(params, model_cfg, max_len, precision, max_batch=max_batch, chunk_tokens=chunk_tokens,
                  pad_id=fmt.pad_id, scan_unroll=scan_unroll), fmt
