"""The decoder's array operations, below the Flax modules (model/layers.py): rotary embeddings, projection
fusion, the attention backends (XLA, cuDNN, Pallas) and their choice per chip, the fused QK-norm + RoPE and
SwiGLU paths with their custom VJPs, and the dispatch between the Pallas kernels and their XLA references.
Pure functions of arrays: no parameters live here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag

from picochat_jax.model import norm_rope_kernel, norm_rope_mgpu, quant, rms_norm_kernel, rms_norm_mgpu, swiglu_mgpu
from picochat_jax.parallel import shard_activation_batch

Array = jax.Array
Dtype = Any


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Array:
    """Inverse frequencies, including the HF `rope_scaling` types we import (linear, llama3, yarn, dynamic).

    `dynamic` (NTK) changes the frequencies only for sequences longer than the model's max_position_embeddings,
    a context this model never serves (max_seq_len is capped there), so inside it they are the default ones.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_mid, mid, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn, dynamic)")


def _yarn_inv_freq(dim: int, base: float, scaling: dict[str, Any]) -> Array:
    """YaRN (Peng et al., 2023): interpolated frequencies for the slow dimensions, the original ones for the fast
    dimensions, a linear ramp between the correction range given by beta_fast/beta_slow rotations."""
    factor = scaling["factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN applies to cos and sin (1 for every other rope type)."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def rope_tables(positions: Array, inv_freq: Array, attention_factor: float = 1.0) -> tuple[Array, Array]:
    """(cos, sin), each (B, T, 1, D) float32, for rotate-half RoPE at `positions` (B, T), scaled by YaRN's
    attention factor when there is one.

    Built once per forward and shared by every layer's q and k, rather than re-evaluating sin/cos inside
    each layer's fused RoPE kernels (forward and backward).
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    if attention_factor != 1.0:
        return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotate-half RoPE (HF layout). x: (B, T, H, D); rope: `rope_tables` output."""
    return rms_rope(x.astype(jnp.float32), None, rope, 0.0).astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["parts"], meta_fields=["shapes"])
@dataclasses.dataclass(frozen=True)
class FrozenKernel:
    """A frozen (in, out) kernel as it is stored: `parts` side by side along the output axis, each a plain
    array or an NF4 dict (model/quant.py) of the (in, out) shape in `shapes`.

    `lora_matmul` keeps it in this form from the forward pass to the backward and builds the kernel in each
    (`materialize`): saving the built kernel instead kept a copy of every layer's concatenated (and, for NF4,
    dequantized float32) kernels alive between the passes."""

    parts: tuple[Any, ...]
    shapes: tuple[tuple[int, int], ...]

    @staticmethod
    def of(stored: Any, shape: tuple[int, int]) -> FrozenKernel:
        return FrozenKernel((stored,), (tuple(shape),))

    @property
    def shape(self) -> tuple[int, int]:
        return self.shapes[0][0], sum(out for _, out in self.shapes)

    def materialize(self, dtype: Dtype) -> Array:
        arrays = [quant.dequantize_nf4(part, shape, dtype) if quant.is_quantized(part) else part.astype(dtype)
                  for part, shape in zip(self.parts, self.shapes, strict=True)]
        return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=1)

    def concat(self, other: FrozenKernel) -> FrozenKernel:
        return FrozenKernel(self.parts + other.parts, self.shapes + other.shapes)


class AdaptedKernel(NamedTuple):
    """A frozen (in, out) kernel with a LoRA update: x @ (base + a @ b), `b` already times alpha / r.

    `project` runs it through `lora_matmul`, whose backward gives the adapters their gradients through the
    rank-r path and never forms the full (in, out) weight gradient autodiff through base + a @ b would. A
    frozen kernel without adapters is one with rank 0 (`frozen_only`)."""

    base: FrozenKernel
    a: Array  # (in, r)
    b: Array  # (r, out)

    @staticmethod
    def frozen_only(base: FrozenKernel) -> AdaptedKernel:
        d_in, d_out = base.shape
        return AdaptedKernel(base, jnp.zeros((d_in, 0), jnp.float32), jnp.zeros((0, d_out), jnp.float32))


def _out_width(kernel: Array | AdaptedKernel) -> int:
    return kernel.shape[1] if not isinstance(kernel, AdaptedKernel) else kernel.base.shape[1]


def concat_projections(weights: list[tuple[Any, Array | None]]) -> tuple[Any, Array | None]:
    """One (kernel, bias) whose outputs are the given projections' outputs side by side (adapted kernels
    concatenate their A's and stack their B's block-diagonally: the same per-part updates)."""
    kernels = [k for k, _ in weights]
    biases = [b for _, b in weights]  # a fused group shares one bias setting (qkv_bias, mlp_bias)
    bias = None if biases[0] is None else jnp.concatenate(biases)
    if not any(isinstance(k, AdaptedKernel) for k in kernels):
        return jnp.concatenate(kernels, axis=1), bias
    parts = [k if isinstance(k, AdaptedKernel) else AdaptedKernel.frozen_only(FrozenKernel.of(k, k.shape))
             for k in kernels]
    return AdaptedKernel(functools.reduce(FrozenKernel.concat, [p.base for p in parts]),
                         jnp.concatenate([p.a.astype(jnp.float32) for p in parts], axis=1),
                         block_diag(*[p.b.astype(jnp.float32) for p in parts])), bias


def _merged(base: FrozenKernel, a: Array, b: Array, dtype: Dtype) -> Array:
    merged = base.materialize(jnp.float32)
    if a.shape[1]:
        merged = merged + a.astype(jnp.float32) @ b.astype(jnp.float32)
    return merged.astype(dtype)


def _no_cotangent(leaf: Array) -> Any:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)  # integer leaves (NF4 codes) take float0 cotangents


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x: Array, base: FrozenKernel, a: Array, b: Array, dtype: Dtype) -> Array:
    """x @ (base + a @ b) in `dtype` (float32 accumulation). Gradients: dx through the merged kernel;
    da = x^T (dy b^T) and db = (x a)^T dy through the rank-r path; the frozen base gets none."""
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x.astype(dtype), _merged(base, a, b, dtype), contract)


def _lora_matmul_fwd(x: Array, base: FrozenKernel, a: Array, b: Array, dtype: Dtype) -> tuple[Array, tuple]:
    return lora_matmul(x, base, a, b, dtype), (x, base, a, b)  # the stored kernel, rebuilt in the backward


def _lora_matmul_bwd(dtype: Dtype, res: tuple, dy: Array) -> tuple[Array, Any, Array, Array]:
    x, base, a, b = res
    x = x.astype(dtype)
    dy = dy.astype(dtype)
    dx = jnp.einsum("...o,io->...i", dy, _merged(base, a, b, dtype)).astype(res[0].dtype)
    dy_b = jnp.einsum("...o,ro->...r", dy, b.astype(dtype), preferred_element_type=jnp.float32)
    x_a = jnp.einsum("...i,ir->...r", x, a.astype(dtype), preferred_element_type=jnp.float32)
    da = jnp.einsum("...i,...r->ir", x, dy_b.astype(dtype), preferred_element_type=jnp.float32)
    db = jnp.einsum("...r,...o->ro", x_a.astype(dtype), dy, preferred_element_type=jnp.float32)
    return dx, jax.tree_util.tree_map(_no_cotangent, base), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def project(x: Array, weights: list[tuple[Array, Array | None]], dtype: Dtype, fuse: bool) -> list[Array]:
    """x @ kernel (+ bias) for each (kernel, bias), in `dtype`, as nn.Dense computes it.

    With `fuse`, one matmul against the kernels concatenated along their output axis: the input is read
    once, the backward's input gradient comes out of one matmul instead of a sum of several, and GQA's
    narrow K/V projections stop being separate small (tensor-core-starved) matmuls. Concatenating kernels
    that are sharded on their output axis would reshuffle them across devices, so tensor-parallel meshes
    run unfused (see `Decoder.fuse_projections`).
    """
    if fuse and len(weights) > 1:
        (fused,) = project(x, [concat_projections(weights)], dtype, fuse=False)
        return jnp.split(fused, np.cumsum([_out_width(k) for k, _ in weights])[:-1].tolist(), axis=-1)
    x = x.astype(dtype)
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    outs = [lora_matmul(x, *k, dtype) if isinstance(k, AdaptedKernel)
            else jax.lax.dot_general(x, k.astype(dtype), contract) for k, _ in weights]
    outs = [y if b is None else y + b.astype(dtype) for y, (_, b) in zip(outs, weights, strict=True)]
    return [shard_activation_batch(y) for y in outs]


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "splash")
SPLASH_BLOCK = 128  # sequence tile of the TPU splash kernel; other lengths take the XLA path

# Large-but-finite additive bias for masked logits: -inf would make a fully masked row NaN in bf16.
MASKED_BIAS = -1e9


def resolve_attention_impl(impl: str | None, dtype: Dtype, head_dim: int, platform: str | None = None) -> str:
    """The attention kernel a Decoder will use: explicit choices stand; None/"auto" picks for the chip.

    "auto" means cuDNN flash attention on an NVIDIA GPU when it supports the call (bf16/fp16 operands,
    head_dim a multiple of 8 up to 128), JAX's Pallas splash-attention kernel on TPU (with segment ids for
    packed rows, as MaxText runs it), and XLA's einsum/softmax otherwise (CPU, float32 GPU), so float32 CPU
    results are bit-for-bit what the plain XLA path gives.
    """
    if impl not in (None, *ATTENTION_IMPLS):
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl not in (None, "auto"):
        return impl
    platform = platform or jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform in ("gpu", "cuda") and low_precision and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def kv_heads_to_query_heads(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """k, v (B, S, KV, D) with each GQA head repeated for its group of query heads (q: (B, T, H, D)), for
    kernels that want as many K/V heads as query heads; the repeat's gradient sums the group back."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return k, v


def causal_mask(T: int, segment_ids: Array | None = None, window: int | None = None) -> Array:
    """Boolean (B|1, 1, T, T) attention mask: causal, within `window` positions (q - k < window, transformers'
    sliding-window overlay) and within the query's own packed document when `segment_ids` (B, T) are given."""
    i = jnp.arange(T)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    if segment_ids is None:
        return allowed[None, None]
    return (allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def pallas_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """Causal flash attention with in-kernel document masking (Pallas/Triton), for packed GPU batches.

    The kernel wants as many K/V heads as query heads (`kv_heads_to_query_heads`).
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    k, v = kv_heads_to_query_heads(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return pallas_gpu.mha(q, k, v, segment_ids, sm_scale=scale, causal=True,
                          interpret=norm_rope_kernel.default_interpret(None))


def softcapped_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float, softcap: float) -> Array:
    """XLA attention with Gemma 2's score soft-capping: softmax(cap * tanh(q.k * scale / cap)), in float32."""
    k, v = kv_heads_to_query_heads(q, k, v)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = softcap * jnp.tanh(scores / softcap)
    if mask is None:
        T, S = q.shape[1], k.shape[1]
        mask = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, scale: float | None = None,
                     interpret: bool | None = None) -> Array:
    """Causal attention through JAX's Pallas TPU splash-attention kernel, documents kept apart by segment ids.

    q (B, T, H, D), k/v (B, T, KV, D) -> (B, T, H, D). GQA heads are repeated to the query heads. The kernel
    does not scale scores, so q is scaled first. Under a multi-device mesh it runs per batch shard
    (`parallel.per_batch_shard`: a Pallas call has no partitioning rule). Off TPU it runs in Pallas' interpret
    mode (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    from picochat_jax.parallel import per_batch_shard

    B, T, H, D = q.shape
    k, v = kv_heads_to_query_heads(q, k, v)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kernel = splash.make_splash_mha(
        mask=splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T)) for _ in range(H)]),
        head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=splash.BlockSizes(block_q=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK, block_kv=SPLASH_BLOCK,
                                      block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK,
                                      block_kv_dkv_compute=SPLASH_BLOCK, block_q_dq=SPLASH_BLOCK,
                                      block_kv_dq=SPLASH_BLOCK))
    q = (q * (scale if scale is not None else 1.0 / math.sqrt(D))).astype(q.dtype)
    heads_first = (0, 2, 1, 3)
    q, k, v = (jnp.transpose(x, heads_first) for x in (q, k, v))
    ids = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def run(q: Array, k: Array, v: Array, ids: Array) -> tuple[Array]:
        return (jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=splash.SegmentIds(q=i, kv=i)))(q, k, v, ids),)

    (out,) = per_batch_shard(run, (True, True, True, True), (True,))(q, k, v, ids)
    return jnp.transpose(out, heads_first)


def attend_cache_and_new(q: Array, k_new: Array, v_new: Array, k_cache: Array, v_cache: Array, cache_mask: Array,
                         scale: float | None = None, softcap: float | None = None) -> Array:
    """One decode step's attention: the query (B, 1, H, D) over the cached keys (B, S, KV, D) that `cache_mask`
    (B|1, 1, 1, S) allows, and over its own new key (B, 1, KV, D), which is not in the cache yet.

    The caller writes every layer's new key and value into the cache once, after the layer stack
    (`Decoder`): a layer that wrote its row before attending would hand the scan a fresh copy of its whole
    cache slice each step. GQA groups stay grouped (no repeated K/V); scores and softmax in float32."""
    B, T, H, D = q.shape
    KV = k_cache.shape[2]
    qg = q.reshape(B, T, KV, H // KV, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    old = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    own = jnp.einsum("btkgd,btkd->bkgt", qg, k_new, preferred_element_type=jnp.float32)[..., None] * scale
    if softcap is not None:
        old, own = (softcap * jnp.tanh(s / softcap) for s in (old, own))
    old = jnp.where(cache_mask[:, :, None], old, jnp.finfo(jnp.float32).min)  # (B|1, 1, 1, 1, S) over (k, g)
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), own)
    p_old, p_own = jnp.exp(old - top), jnp.exp(own - top)
    total = jnp.sum(p_old, axis=-1, keepdims=True) + p_own
    out = jnp.einsum("bkgts,bskd->btkgd", (p_old / total).astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgt,btkd->btkgd", (p_own / total)[..., 0], v_new.astype(jnp.float32))
    return out.reshape(B, T, H, D).astype(q.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array | None, segment_ids: Array | None, impl: str,
           scale: float | None = None, softcap: float | None = None) -> Array:
    """Scaled dot-product attention, causal unless `mask` (B|1, 1, T, S) is given.

    `segment_ids` (B, T) restricts attention to the query's own packed document. The XLA path takes that
    restriction as a boolean `mask` built by the caller; the fused kernels take the ids themselves and
    never materialise a (B, H, T, T) score tensor. `scale` defaults to head_dim ** -0.5; `softcap` (Gemma 2)
    always runs on the XLA path (callers build an explicit mask for it, see Decoder).
    """
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, scale or 1.0 / math.sqrt(q.shape[-1]), softcap)
    if impl == "splash" and mask is None and q.shape[1] % SPLASH_BLOCK == 0 and q.shape[1] == k.shape[1]:
        return splash_attention(q, k, v, segment_ids, scale)
    if mask is None and segment_ids is not None and impl == "splash":  # a length the kernel's tiles do not fit
        mask = causal_mask(q.shape[1], segment_ids)
    if mask is not None or impl in ("xla", "splash"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, scale=scale,
                                            implementation="xla")
    if scale is not None and impl == "pallas":
        raise ValueError("the Pallas attention kernel uses head_dim ** -0.5; use attention_impl xla or cudnn")
    if impl == "cudnn":
        bias = None
        if segment_ids is not None:
            # cuDNN keeps its causal tile skipping; the document boundary is an additive (B, 1, T, T) bias,
            # which is a few MB per layer against the ~0.8 GB of fp32 scores the XLA path writes.
            same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
            bias = jnp.where(same_doc, 0.0, MASKED_BIAS).astype(q.dtype)[:, None]
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True, scale=scale,
                                            implementation="cudnn")
    if impl == "pallas":
        return pallas_attention(q, k, v, segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}")


def rms_rope(x: Array, scale: Array | None, rope: tuple[Array, Array] | None, eps: float) -> Array:
    """float32 x (B, T, H, D) -> RMSNorm(x) * scale (if scale) -> rotate-half RoPE (if rope)."""
    if scale is not None:
        x = rms_norm_kernel.rms_norm(x, scale, eps, jnp.float32)
    if rope is not None:
        cos, sin = rope
        x1, x2 = jnp.split(x, 2, axis=-1)
        x = x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return x


def rms_rope_bwd(x: Array, scale: Array | None, rope: tuple[Array, Array] | None, eps: float,
                  dy: Array) -> tuple[Array, Array | None]:
    """(d x, d scale) of `rms_rope` for the output cotangent dy, all float32."""
    if rope is not None:
        cos, sin = rope
        t1, t2 = jnp.split(dy * sin, 2, axis=-1)
        dy = dy * cos + jnp.concatenate([t2, -t1], axis=-1)  # the transpose of the rotate-half
    if scale is None:
        return dy, None
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    n = x * r
    d_scale = jnp.sum(dy * n, axis=tuple(range(dy.ndim - 1)))
    dn = dy * scale
    return r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True)), d_scale


def split_qkv(qkv: Array, n_heads: int, n_kv_heads: int) -> tuple[Array, Array, Array]:
    B, T, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv_heads)
    q, k, v = jnp.split(qkv, [n_heads * hd, (n_heads + n_kv_heads) * hd], axis=-1)
    return q.reshape(B, T, n_heads, hd), k.reshape(B, T, n_kv_heads, hd), v.reshape(B, T, n_kv_heads, hd)


KERNEL_IMPLS = ("auto", "xla", "pallas", "mosaic")


def resolve_kernel(impl: str | None, what: str, fits: dict[str, bool], platform: str | None) -> str:
    """"mosaic" (Pallas on Mosaic GPU), "pallas" (the same kernels on Pallas' Triton backend, which jax 0.11
    deprecates; kept for comparison) or "xla" for one of the Pallas kernels. `fits` says which kernels take the
    shape; where the chosen one doesn't, even an explicit choice gets the XLA path. "auto" picks the Mosaic GPU
    kernel on an NVIDIA GPU only, so CPU and TPU results are the XLA path's."""
    if impl not in (None, *KERNEL_IMPLS):
        raise ValueError(f"{what} implementation must be one of {KERNEL_IMPLS}, got {impl!r}")
    if impl in (None, "auto"):
        impl = "mosaic" if (platform or jax.default_backend()) in ("gpu", "cuda") else "xla"
    return impl if impl != "xla" and fits[impl] else "xla"


def resolve_rms_norm_impl(impl: str | None, kind: str, n_rows: int, width: int, platform: str | None = None) -> str:
    """Which code runs the pre-norms' backward: "mosaic" (`rms_norm_mgpu`, 64-row blocks and 64-column chunks),
    "pallas" (`rms_norm_kernel`, power-of-two tiles) or "xla"; RMSNorm only."""
    fits = {"mosaic": rms_norm_mgpu.supported(n_rows, width), "pallas": rms_norm_kernel.supported(n_rows, width)}
    return resolve_kernel(impl, "rms-norm", {k: kind == "rmsnorm" and v for k, v in fits.items()}, platform)


def resolve_norm_rope_impl(impl: str | None, qk_norm: bool, rope: bool, n_tokens: int, head_dim: int,
                           platform: str | None = None) -> str:
    """Which code applies QK-norm + RoPE in `heads_from_qkv`: "mosaic" (`norm_rope_mgpu`, 64-token blocks),
    "pallas" (`norm_rope_kernel`, power-of-two tiles) or "xla". The kernels need both a norm scale and RoPE."""
    fits = {"mosaic": norm_rope_mgpu.supported(n_tokens, head_dim),
            "pallas": norm_rope_kernel.supported(n_tokens, head_dim)}
    return resolve_kernel(impl, "norm/rope", {k: qk_norm and rope and v for k, v in fits.items()}, platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def heads_from_qkv(qkv: Array, q_scale: Array | None, k_scale: Array | None, rope: tuple[Array, Array] | None,
                   n_heads: int, n_kv_heads: int, eps: float, impl: str = "xla") -> tuple[Array, Array, Array]:
    """q, k, v heads from the fused q|k|v projection output: QK-norm (when scales are given) and RoPE
    (when tables are given) applied to q and k, in float32, cast back to the compute dtype.

    The custom VJP returns the packed (B, T, (H + 2K) * D) gradient from one pass: autodiff through the
    split writes d_q and d_k, then copies them and d_v into the packed layout (docs/performance.md).
    impl="mosaic" or "pallas" (see `resolve_norm_rope_impl`) runs both directions as the `norm_rope_mgpu` or
    `norm_rope_kernel` kernels.
    """
    if impl in ("pallas", "mosaic"):
        kernels = norm_rope_kernel if impl == "pallas" else norm_rope_mgpu
        return kernels.norm_rope_forward(qkv, q_scale, k_scale, rope, n_heads, n_kv_heads, eps)
    q, k, v = split_qkv(qkv, n_heads, n_kv_heads)
    q = rms_rope(q.astype(jnp.float32), q_scale, rope, eps).astype(qkv.dtype)
    k = rms_rope(k.astype(jnp.float32), k_scale, rope, eps).astype(qkv.dtype)
    return q, k, v


def _heads_from_qkv_fwd(qkv, q_scale, k_scale, rope, n_heads, n_kv_heads, eps, impl):
    heads = heads_from_qkv(qkv, q_scale, k_scale, rope, n_heads, n_kv_heads, eps, impl)
    return heads, (qkv, q_scale, k_scale, rope)


def _heads_from_qkv_bwd(n_heads, n_kv_heads, eps, impl, res, grads):
    qkv, q_scale, k_scale, rope = res
    dq, dk, dv = grads
    rope_zero = None if rope is None else tuple(jnp.zeros_like(t) for t in rope)
    if impl in ("pallas", "mosaic"):
        kernels = norm_rope_kernel if impl == "pallas" else norm_rope_mgpu
        d_qkv, d_q_scale, d_k_scale = kernels.norm_rope_backward(qkv, q_scale, k_scale, rope, dq, dk, dv,
                                                                 n_heads, n_kv_heads, eps)
        return d_qkv, d_q_scale, d_k_scale, rope_zero
    q, k, _ = split_qkv(qkv, n_heads, n_kv_heads)
    dq, d_q_scale = rms_rope_bwd(q.astype(jnp.float32), q_scale, rope, eps, dq.astype(jnp.float32))
    dk, d_k_scale = rms_rope_bwd(k.astype(jnp.float32), k_scale, rope, eps, dk.astype(jnp.float32))
    # Each piece zero-padded to the packed width and summed, rather than concatenated: XLA:GPU fuses pads and
    # adds into the kernel that computes d_q and d_k, where a concatenate became a separate copy.
    B, T, width = qkv.shape
    pieces = [dq.reshape(B, T, -1), dk.reshape(B, T, -1), dv.reshape(B, T, -1).astype(jnp.float32)]
    offsets = np.cumsum([0] + [p.shape[-1] for p in pieces])
    d_qkv = sum(jnp.pad(p, ((0, 0), (0, 0), (int(lo), int(width - hi)))) for p, lo, hi in
                zip(pieces, offsets[:-1], offsets[1:], strict=True))
    return d_qkv.astype(qkv.dtype), d_q_scale, d_k_scale, rope_zero


heads_from_qkv.defvjp(_heads_from_qkv_fwd, _heads_from_qkv_bwd)


def _swiglu_grads(gate: Array, up: Array, d_out: Array) -> tuple[Array, Array]:
    """(d gate, d up) of silu(gate) * up for its cotangent d_out, float32 in and out."""
    sig = jax.nn.sigmoid(gate)
    return d_out * up * sig * (1.0 + gate * (1.0 - sig)), d_out * gate * sig


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def swiglu_packed(gate_up: Array, impl: str = "xla") -> Array:
    """silu(gate) * up for `gate_up` = [gate | up] along the last axis (the fused gate/up matmul's output).

    The custom VJP writes the gradient of the packed input in one elementwise pass. Autodiff through the
    split computes d_gate and d_up in separate kernels and then copies both into the packed layout: on an
    H100 that copy alone was 5.6 ms of a 67 ms h100-100m step (docs/performance.md). impl="mosaic" writes it
    with the Mosaic GPU kernel of `swiglu_mgpu`, which reads each input once.
    """
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(gate_up.dtype)


def _swiglu_packed_fwd(gate_up: Array, impl: str) -> tuple[Array, Array]:
    return swiglu_packed(gate_up, impl), gate_up


def _swiglu_packed_bwd(impl: str, gate_up: Array, d_out: Array) -> tuple[Array]:
    if impl == "mosaic":
        return (swiglu_mgpu.swiglu_backward(gate_up, d_out),)
    # Viewed as (..., 2, F), both halves' gradients are one select over broadcasts: a single elementwise
    # kernel. Written as a concatenate, XLA:GPU computed each half in its own kernel and then copied both.
    *lead, width = gate_up.shape
    pair = gate_up.astype(jnp.float32).reshape(*lead, 2, width // 2)
    d_gate, d_up = _swiglu_grads(pair[..., :1, :], pair[..., 1:, :], d_out.astype(jnp.float32)[..., None, :])
    first_half = jax.lax.broadcasted_iota(jnp.int32, pair.shape, pair.ndim - 2) == 0
    return (jnp.where(first_half, d_gate, d_up).reshape(gate_up.shape).astype(gate_up.dtype),)


swiglu_packed.defvjp(_swiglu_packed_fwd, _swiglu_packed_bwd)


# How the SwiGLU MLP's fused gate/up projection is differentiated (docs/performance.md):
# "packed": autodiff of the matmul and `swiglu_packed`'s XLA backward, one packed (N, 2F) gradient;
# "split" (`swiglu_gate_up`): d_gate and d_up as two arrays, the backward matmuls run per half;
# "mosaic": the packed gradient from `swiglu_mgpu`'s kernel, which reads gate, up and d_out once.
# "auto" = "mosaic" on an NVIDIA GPU, "packed" elsewhere. "mosaic" falls back to "split" on shapes its kernel
# does not take (rows not in 64-row blocks, d_ff not in whole column chunks: 128 in bf16, 64 in float32).
SWIGLU_GRAD_IMPLS = ("auto", "packed", "split", "mosaic")


def resolve_swiglu_grad_impl(impl: str | None, n_rows: int, width: int, platform: str | None = None,
                             dtype: Dtype = jnp.bfloat16) -> str:
    """The SwiGLU backward for `n_rows` rows (one batch shard's tokens) of d_ff `width` in compute `dtype`."""
    if impl not in (None, *SWIGLU_GRAD_IMPLS):
        raise ValueError(f"SwiGLU-gradient implementation must be one of {SWIGLU_GRAD_IMPLS}, got {impl!r}")
    if impl in (None, "auto"):
        if (platform or jax.default_backend()) not in ("gpu", "cuda"):
            return "packed"
        impl = "mosaic"
    if impl == "mosaic" and not swiglu_mgpu.supported(n_rows, width, jnp.dtype(dtype).itemsize):
        return "split"
    return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu_gate_up(x: Array, kernel: Array, dtype: Dtype) -> Array:
    """silu(x @ W_gate) * (x @ W_up) for `kernel` = [W_gate | W_up] (d, 2F), as one matmul in `dtype`.

    Forward as `project` + `swiglu_packed`. The custom VJP never assembles a packed (N, 2F) gradient:
    d_gate and d_up come out of one elementwise pass, dx = d_gate W_gate^T + d_up W_up^T and
    dW = [x^T d_gate | x^T d_up]."""
    return _swiglu_gate_up_fwd(x, kernel, dtype)[0]


def _swiglu_gate_up_fwd(x: Array, kernel: Array, dtype: Dtype) -> tuple[Array, tuple[Array, Array, Array]]:
    contract = (((x.ndim - 1,), (0,)), ((), ()))
    gate_up = shard_activation_batch(jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), contract))
    return swiglu_packed(gate_up), (x, kernel, gate_up)


def _swiglu_gate_up_bwd(dtype: Dtype, res: tuple[Array, Array, Array], d_out: Array) -> tuple[Array, Array]:
    x, kernel, gate_up = res
    width = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :width].astype(jnp.float32), gate_up[..., width:].astype(jnp.float32)
    d_gate, d_up = (shard_activation_batch(d.astype(dtype)) for d in _swiglu_grads(gate, up, d_out.astype(jnp.float32)))
    w = kernel.astype(dtype)
    xd = x.astype(dtype)
    dx = (jnp.einsum("...f,df->...d", d_gate, w[:, :width]) + jnp.einsum("...f,df->...d", d_up, w[:, width:]))
    dw = jnp.concatenate([jnp.einsum("...d,...f->df", xd, d, preferred_element_type=jnp.float32)
                          for d in (d_gate, d_up)], axis=1)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


swiglu_gate_up.defvjp(_swiglu_gate_up_fwd, _swiglu_gate_up_bwd)


# How the token embedding's gradient is summed. jnp.take's own backward ("scatter") scatter-adds in the
# lookup's dtype: under bf16 compute a frequent id's thousands of rows are summed in bf16 (percents off, tested)
# and, on GPU, each add is an atomic compare-and-swap loop that real text's repeated ids contend on (the Zipf
# rows of docs/performance.md). "scatter_f32" scatters into the float32 table's gradient (native atomic adds,
# exact sums); "onehot" sums with matmuls against one-hot token blocks (no atomics, 2·N·V·d more FLOPs).
EMBED_GRAD_IMPLS = ("auto", "scatter", "scatter_f32", "onehot")


def resolve_embed_grad_impl(impl: str | None) -> str:
    """"auto" = "scatter_f32" on every platform; the same as "scatter" when the compute dtype is float32."""
    if impl not in (None, *EMBED_GRAD_IMPLS):
        raise ValueError(f"embedding-gradient implementation must be one of {EMBED_GRAD_IMPLS}, got {impl!r}")
    return "scatter_f32" if impl in (None, "auto") else impl


# Tokens per one-hot block: bounds the (block, vocab) one-hot operand to 256 MiB of bf16 at a 32k vocabulary.
_ONEHOT_BLOCK_ELEMENTS = 1 << 27


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onehot_embed(table: Array, tokens: Array, dtype: Dtype) -> Array:
    return jnp.take(table, tokens, axis=0).astype(dtype)


def _onehot_embed_fwd(table: Array, tokens: Array, dtype: Dtype) -> tuple[Array, tuple[Array, Array]]:
    # A (vocab, 0) array carries the table's row count and dtype into the backward without its bytes.
    return _onehot_embed(table, tokens, dtype), (tokens, jnp.zeros((table.shape[0], 0), table.dtype))


def _onehot_embed_bwd(dtype: Dtype, res: tuple[Array, Array], dy: Array) -> tuple[Array, None]:
    tokens, shape_probe = res
    vocab, width = shape_probe.shape[0], dy.shape[-1]
    ids, dy = tokens.reshape(-1), dy.reshape(-1, width)
    block = max(1, min(ids.shape[0], _ONEHOT_BLOCK_ELEMENTS // vocab))
    blocks = -(-ids.shape[0] // block)
    pad = blocks * block - ids.shape[0]
    ids = jnp.pad(ids, (0, pad), constant_values=-1)  # -1 matches no row: padded tokens add nothing
    dy = jnp.pad(dy, ((0, pad), (0, 0)))

    def add_block(acc: Array, xs: tuple[Array, Array]) -> tuple[Array, None]:
        block_ids, block_dy = xs
        onehot = (block_ids[:, None] == jnp.arange(vocab, dtype=block_ids.dtype)[None, :]).astype(block_dy.dtype)
        return acc + jnp.einsum("nv,nd->vd", onehot, block_dy, preferred_element_type=jnp.float32), None

    grad, _ = jax.lax.scan(add_block, jnp.zeros((vocab, width), jnp.float32),
                           (ids.reshape(blocks, block), dy.reshape(blocks, block, width)))
    return grad.astype(shape_probe.dtype), None


_onehot_embed.defvjp(_onehot_embed_fwd, _onehot_embed_bwd)


def embed_lookup(table: Array, tokens: Array, dtype: Dtype, impl: str) -> Array:
    """table[tokens] in `dtype`, with the gradient summed as `impl` (a resolved EMBED_GRAD_IMPLS entry) says."""
    if impl == "scatter":
        return jnp.take(table.astype(dtype), tokens, axis=0)
    if impl == "scatter_f32":
        return jnp.take(table, tokens, axis=0).astype(dtype)
    if impl == "onehot":
        return _onehot_embed(table, tokens, dtype)
    raise ValueError(f"unresolved embedding-gradient implementation {impl!r}")
