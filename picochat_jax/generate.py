"""Batched, jitted KV-cache generation, shared by native checkpoints and the HF bridge.

One compiled program per (batch bucket, prompt bucket, max_new_tokens, greedy?) runs the whole reply:
a prefill over the left-padded prompts, then a `lax.while_loop` that decodes one token per step into a
fixed-size KV cache and exits as soon as every row has produced a stop token. Nothing is recompiled per
token, and prompts are padded to power-of-two lengths so a whole eval set needs a handful of compiles.

Left padding keeps every row's last prompt token in the same slot, so one slot index drives the decode
loop for the whole batch; per-row positions (slot minus that row's padding) keep RoPE / learned positions
identical to the unpadded prompt, and `kv_valid` hides the pad slots from every query.

    engine, fmt = load_native(Path("RUN/sft/checkpoint"))
    ids = engine.generate([fmt.encode_prompt(messages)], SamplingParams(max_new_tokens=48), fmt.stop_ids)
    reply = fmt.decode(ids[0])
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
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
from picochat_jax.model.transformer import Decoder, init_cache, make_model
from picochat_jax.tokenizer import ChatTokenizer

Array = jax.Array

MIN_BUCKET = 16  # shortest prompt bucket: below this, padding costs less than another compile


@dataclass(frozen=True)
class SamplingParams:
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
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ChatFormat(Protocol):
    """How prompts become ids and ids become text, per model family."""

    stop_ids: tuple[int, ...]
    pad_id: int

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class NativeChatFormat:
    """ChatFormat for picochat's own tokenizer and chat template (data/chat.py)."""

    def __init__(self, tok: ChatTokenizer):
        self.tok = tok
        self.stop_ids: tuple[int, ...] = (tok.end_id,)
        self.pad_id: int = tok.pad_id

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return encode_prompt(messages, self.tok).tolist()

    def encode_text(self, text: str) -> list[int]:
        # Base pretraining saw every document after <|bos|>, so raw completion starts the same way.
        return [self.tok.bos_id, *self.tok.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)


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


def sample_tokens(logits: Array, keys: Array, temperature: Array, top_k: Array, top_p: Array,
                  greedy: bool) -> Array:
    """Next token per row from (B, V) float32 logits; `keys` holds one PRNG key per row."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits / temperature, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- decoding


def _last_position_logits(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: project only the last position onto the vocabulary during prefill.

    The prefill needs one row of logits per prompt; projecting all P positions would allocate a
    (B, P, vocab) array, which for a 150k-token HF vocabulary dwarfs the model itself.
    """
    if context.method_name == "logits_from_hidden":
        args = (args[0][:, -1:], *args[1:])
    return next_fun(*args, **kwargs)


def _decode(model: Decoder, params: Any, tokens: Array, prompt_lens: Array, row_ids: Array, seed: Array,
            temperature: Array, top_k: Array, top_p: Array, stop_ids: Array, *, max_new: int,
            greedy: bool) -> tuple[Array, Array]:
    """Prefill left-padded (B, P) prompts, then decode up to max_new tokens per row.

    Returns (B, max_new) tokens (-1 after a row's stop token) and the number of decode steps run.
    """
    B, P = tokens.shape
    S = P + max_new
    pad = P - prompt_lens
    kv_valid = jnp.arange(S)[None, :] >= pad[:, None]
    positions = jnp.maximum(jnp.arange(P)[None, :] - pad[:, None], 0)
    cache = init_cache(model.cfg, B, S, model.dtype)
    with nn.intercept_methods(_last_position_logits):
        logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                                    cache_index=jnp.int32(0), kv_valid=kv_valid)

    # Per-row keys derived from the row's index in the caller's list: a row samples the same reply
    # whatever batch or bucket it lands in.
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_ids)

    def pick(step_logits: Array, t: Array) -> Array:
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
        return sample_tokens(step_logits.astype(jnp.float32), keys, temperature, top_k, top_p, greedy)

    def cond(carry):
        t, _, _, _, done = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, tok, cache, out, done = carry
        out = out.at[:, t].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, stop_ids)
        step_logits, cache = model.apply({"params": params}, tok[:, None], positions=(prompt_lens + t)[:, None],
                                         cache=cache, cache_index=P + t, kv_valid=kv_valid)
        return t + 1, pick(step_logits[:, 0], t + 1), cache, out, done

    first = pick(logits[:, -1], jnp.int32(0))
    init = (jnp.int32(0), first, cache, jnp.full((B, max_new), -1, jnp.int32), jnp.zeros((B,), bool))
    steps, _, _, out, _ = jax.lax.while_loop(cond, body, init)
    return out, steps


def bucket_length(n: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `floor`), never above cap."""
    return min(cap, max(floor, 1 << max(0, n - 1).bit_length()))


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
    """Generation for one model: params on device, one jitted decode program per shape bucket."""

    def __init__(self, params: Any, model_cfg: ModelConfig, max_len: int | None = None, precision: str = "fp32",
                 *, max_batch: int = 32):
        self.model_cfg = model_cfg
        self.max_len = context_length(model_cfg, max_len, max_batch)
        self.precision = precision
        self.max_batch = max_batch
        self.model = make_model(model_cfg, precision)
        self.params = inference_params(params, self.model.dtype)
        self._decode = jax.jit(functools.partial(_decode, self.model), static_argnames=("max_new", "greedy"))

    @property
    def compiled_programs(self) -> int:
        """How many decode programs have been compiled so far (one per shape bucket and mode)."""
        return self._decode._cache_size()

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
        """Batched; returns only the new tokens of each prompt, without the stop token."""
        if not prompts:
            return []
        max_new = sampling.max_new_tokens
        fitted, cut = self.fit_prompts(prompts, max_new)
        if cut:
            warnings.warn(f"{cut} of {len(prompts)} prompts were longer than {self.max_len - max_new} tokens "
                          f"(context {self.max_len} minus {max_new} new tokens) and lost their oldest tokens",
                          stacklevel=2)
        batch_size = min(batch_size or self.max_batch, len(fitted))
        stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
        scalars = (jnp.uint32(sampling.seed), jnp.float32(max(sampling.temperature, 1e-6)),
                   jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
        # Similar lengths share a batch, so few rows pay for a long neighbour's padding.
        order = sorted(range(len(fitted)), key=lambda i: len(fitted[i]))
        results: list[list[int]] = [[] for _ in fitted]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = bucket_length(len(idx), batch_size, floor=1)
            P = bucket_length(max(len(fitted[i]) for i in idx), self.max_len - max_new)
            tokens = np.zeros((rows, P), np.int32)
            lens = np.ones((rows,), np.int32)  # filler rows: one pad token, output discarded
            row_ids = np.zeros((rows,), np.int32)
            for r, i in enumerate(idx):
                tokens[r, P - len(fitted[i]) :] = fitted[i]
                lens[r], row_ids[r] = len(fitted[i]), i
            out, _ = self._decode(self.params, tokens, lens, row_ids, *scalars, stops, max_new=max_new,
                                  greedy=sampling.greedy)
            out = np.asarray(jax.device_get(out))
            stop_set = set(int(s) for s in stop_ids)
            for r, i in enumerate(idx):
                reply = []
                for t in out[r].tolist():
                    if t < 0 or t in stop_set:
                        break
                    reply.append(t)
                results[i] = reply
        return results


def load_native(checkpoint_dir: Path, tokenizer_path: Path | None = None, *, precision: str = "fp32",
                max_len: int | None = None, max_batch: int = 32) -> tuple[Engine, NativeChatFormat]:
    """Engine and chat format for a native checkpoint folder (RUN/sft/checkpoint and friends); the tokenizer
    defaults to the folder's own copy and must be the one the model was trained with."""
    from picochat_jax.train.checkpoint import checkpoint_tokenizer, load_model_checkpoint

    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    params, model_cfg, _ = load_model_checkpoint(checkpoint_dir)
    tok = ChatTokenizer.load(tokenizer_path)
    return Engine(params, model_cfg, max_len, precision, max_batch=max_batch), NativeChatFormat(tok)
