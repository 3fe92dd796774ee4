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


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # None = let JAX pick (cuDNN flash on GPU when it can), "xla", "cudnn"

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array | None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
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

        is_causal = mask is None
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=self.attention_impl
        )
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
