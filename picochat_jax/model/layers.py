"""Building blocks of the decoder: norms, rotary embeddings, attention, MLP.

Every parameter carries *logical* axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`, `layers`);
`picochat_jax.parallel` maps them to mesh axes, so changing the parallelism never touches this file.
Parameter names and layouts follow the HF convention (kernel = weight.T, rotate-half RoPE) so the HF
bridge is a transpose-and-stack, never a permutation.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from picochat_jax.config import ModelConfig

Array = jax.Array
Dtype = Any


def _init(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class Norm(nn.Module):
    """RMSNorm or LayerNorm, statistics always in float32 (as HF does) whatever the compute dtype."""

    kind: str
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (width,))
        x32 = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return (y * scale).astype(self.dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (width,))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Array:
    """Inverse frequencies, including the HF `rope_scaling` types we import (linear, llama3)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
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
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate-half RoPE (HF layout). x: (B, T, H, D); positions: (B, T)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos2 = jnp.concatenate([cos, cos], axis=-1)
    sin2 = jnp.concatenate([sin, sin], axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos2 + rotated * sin2).astype(x.dtype)


def dense(features: int, axes: tuple[str, str], use_bias: bool, std: float, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_init(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# Large-but-finite additive bias for masked logits: -inf would make a fully masked row NaN in bf16.
_MASKED_BIAS = -1e9


def resolve_attention_impl(impl: str | None, dtype: Dtype, head_dim: int, platform: str | None = None) -> str:
    """The attention kernel a Decoder will use: explicit choices stand; None/"auto" picks for the chip.

    "auto" means cuDNN flash attention on an NVIDIA GPU when it supports the call (bf16/fp16 operands,
    head_dim a multiple of 8 up to 128) and XLA's einsum/softmax otherwise (CPU, TPU, float32), so float32
    CPU results are bit-for-bit what the plain XLA path gives.
    """
    if impl not in (None, *ATTENTION_IMPLS):
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl not in (None, "auto"):
        return impl
    platform = platform or jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform in ("gpu", "cuda") and low_precision and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def _pallas_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """Causal flash attention with in-kernel document masking (Pallas/Triton), for packed GPU batches.

    The kernel wants as many K/V heads as query heads, so GQA heads are repeated first (the repeat's
    gradient sums them back).
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return pallas_gpu.mha(q, k, v, segment_ids, sm_scale=scale, causal=True,
                          interpret=jax.default_backend() == "cpu")


def attend(q: Array, k: Array, v: Array, mask: Array | None, segment_ids: Array | None, impl: str) -> Array:
    """Scaled dot-product attention, causal unless `mask` (B|1, 1, T, S) is given.

    `segment_ids` (B, T) restricts attention to the query's own packed document. The XLA path takes that
    restriction as a boolean `mask` built by the caller; the fused kernels take the ids themselves and
    never materialise a (B, H, T, T) score tensor.
    """
    if mask is not None or impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation="xla")
    if impl == "cudnn":
        bias = None
        if segment_ids is not None:
            # cuDNN keeps its causal tile skipping; the document boundary is an additive (B, 1, T, T) bias,
            # which is a few MB per layer against the ~0.8 GB of fp32 scores the XLA path writes.
            same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
            bias = jnp.where(same_doc, 0.0, _MASKED_BIAS).astype(q.dtype)[:, None]
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation="cudnn")
    if impl == "pallas":
        return _pallas_attention(q, k, v, segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}")


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # None/"auto" = cuDNN flash on GPU when it can, else XLA; see attend()

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array | None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        cfg = self.cfg
        hd = cfg.resolved_head_dim
        B, T, _ = x.shape
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        q = dense(cfg.n_heads * hd, ("embed", "heads"), cfg.qkv_bias, cfg.init_std, self.dtype, "q_proj")(x)
        k = dense(cfg.n_kv_heads * hd, ("embed", "kv"), cfg.qkv_bias, cfg.init_std, self.dtype, "k_proj")(x)
        v = dense(cfg.n_kv_heads * hd, ("embed", "kv"), cfg.qkv_bias, cfg.init_std, self.dtype, "v_proj")(x)
        q = q.reshape(B, T, cfg.n_heads, hd)
        k = k.reshape(B, T, cfg.n_kv_heads, hd)
        v = v.reshape(B, T, cfg.n_kv_heads, hd)
        if cfg.qk_norm:
            q = Norm("rmsnorm", cfg.norm_eps, self.dtype, name="q_norm")(q)
            k = Norm("rmsnorm", cfg.norm_eps, self.dtype, name="k_norm")(k)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling_dict)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)

        new_cache = None
        if cache is not None:
            # Decoding: write this chunk's keys/values at cache_index, then attend over the whole cache.
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)

        impl = resolve_attention_impl(self.attention_impl, self.dtype, hd)
        out = attend(q, k, v, mask, segment_ids, impl)
        out = out.reshape(B, T, cfg.n_heads * hd)
        out = dense(cfg.d_model, ("heads", "embed"), cfg.out_bias, out_std, self.dtype, "o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        up = dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, cfg.init_std, self.dtype, "up_proj")(x)
        if cfg.activation == "swiglu":
            gate = dense(cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, cfg.init_std, self.dtype, "gate_proj")(x)
            h = nn.silu(gate) * up
        elif cfg.activation == "gelu":
            h = nn.gelu(up, approximate=False)
        else:  # relu2
            h = jnp.square(nn.relu(up))
        return dense(cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, out_std, self.dtype, "down_proj")(h)
