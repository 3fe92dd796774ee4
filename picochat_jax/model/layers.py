"""Building blocks of the decoder as Flax modules: norms, projections, attention, MLP. The array operations
they run (rotary embeddings, attention backends, fused kernels and their VJPs) are model/ops.py's.

Every parameter carries *logical* axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`, `layers`);
`picochat_jax.parallel` maps them to mesh axes, so changing the parallelism never touches this file.
Parameter names and layouts follow the HF convention (kernel = weight.T, rotate-half RoPE) so the HF
bridge is a transpose-and-stack, never a permutation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from picochat_jax.config import ModelConfig
from picochat_jax.model import lora, rms_norm_kernel
from picochat_jax.model.ops import (
    AdaptedKernel,
    apply_rope,
    attend,
    attend_cache_and_new,
    concat_projections,
    heads_from_qkv,
    project,
    resolve_attention_impl,
    resolve_norm_rope_impl,
    resolve_swiglu_grad_impl,
    swiglu_gate_up,
    swiglu_packed,
)
from picochat_jax.parallel import per_shard_rows

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
        if self.kind == "rmsnorm":
            return rms_norm_kernel.rms_norm(x, scale, self.eps, self.dtype)
        x32 = x.astype(jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (width,))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


class Projection(nn.Module):
    """A dense layer's parameters without the matmul: `kernel` (in, out) and optional `bias`.

    The same names, shapes, logical axes and initial values as `nn.Dense` (kernel = HF weight.T), so the
    params tree and the HF bridge are unchanged; `project` applies one or runs several of one input as one
    matmul.
    """

    in_features: int
    features: int
    axes: tuple[str, str]
    use_bias: bool
    std: float

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, dict):
            # A frozen kernel stored as NF4 and/or with a LoRA adapter attached (model/lora.py `attach`):
            # this layer's full kernel is formed here, inside the scan, one layer at a time.
            kernel = lora.resolve_kernel(stored, (self.in_features, self.features))
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(_init(self.std), self.axes),
                                (self.in_features, self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), jnp.float32)
        return kernel, bias


class NormScale(nn.Module):
    """An RMSNorm's `scale` parameter alone (same name, axes and init as `Norm`), for fused kernels that
    apply the norm themselves (`heads_from_qkv`)."""

    width: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (self.width,))


def is_decode_step(cache: dict[str, Array] | None, T: int) -> bool:
    """A cached forward of one token a row: its attention reads the cache without writing it
    (`ops.attend_cache_and_new`), and the caller writes the new rows afterwards (`Decoder`)."""
    return cache is not None and T == 1


def write_cache(cache: Array, new: Array, index: Array) -> Array:
    """cache (B, S, ...) with new (B, T, ...) written from slot `index`: a scalar, or (B,) per row."""
    index = jnp.asarray(index)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis=1)
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(cache, new, index)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # None/"auto" = cuDNN flash on GPU when it can, else XLA; see attend()
    fuse_projections: bool = True  # q, k and v as one matmul: see project()
    norm_rope_impl: str | None = None  # None/"auto" = the Mosaic GPU QK-norm+RoPE kernels on GPU; see heads_from_qkv()

    @nn.compact
    def __call__(
        self,
        x: Array,
        rope: tuple[Array, Array] | None,
        mask: Array | None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        cfg = self.cfg
        hd = cfg.resolved_head_dim
        B, T, _ = x.shape
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        d = x.shape[-1]
        qkv_weights = [
            Projection(d, cfg.n_heads * hd, ("embed", "heads"), cfg.qkv_bias, cfg.init_std, name="q_proj")(),
            Projection(d, cfg.n_kv_heads * hd, ("embed", "kv"), cfg.qkv_bias, cfg.init_std, name="k_proj")(),
            Projection(d, cfg.n_kv_heads * hd, ("embed", "kv"), cfg.qkv_bias, cfg.init_std, name="v_proj")(),
        ]
        if self.fuse_projections:
            (qkv,) = project(x, [concat_projections(qkv_weights)], self.dtype, fuse=False)
            scales = (NormScale(hd, name="q_norm")(), NormScale(hd, name="k_norm")()) if cfg.qk_norm else (None, None)
            norm_rope = resolve_norm_rope_impl(self.norm_rope_impl, cfg.qk_norm, rope is not None,
                                               per_shard_rows(B) * T, hd)  # the kernels see one batch shard
            q, k, v = heads_from_qkv(qkv, *scales, rope, cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps, norm_rope)
        else:
            q, k, v = project(x, qkv_weights, self.dtype, fuse=False)
            q = q.reshape(B, T, cfg.n_heads, hd)
            k = k.reshape(B, T, cfg.n_kv_heads, hd)
            v = v.reshape(B, T, cfg.n_kv_heads, hd)
            if cfg.qk_norm:
                q = Norm("rmsnorm", cfg.norm_eps, self.dtype, name="q_norm")(q)
                k = Norm("rmsnorm", cfg.norm_eps, self.dtype, name="k_norm")(k)
            if rope is not None:
                q = apply_rope(q, rope)
                k = apply_rope(k, rope)

        new_cache = None
        scale = None if cfg.query_scale is None else cfg.query_scale ** -0.5
        if is_decode_step(cache, T):
            # One new token a row: attend over the cache as it stands plus the token's own key, and hand back
            # only the new row; the Decoder writes all layers' rows into the cache after the layer stack.
            new_cache = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            out = attend_cache_and_new(q, k, v, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), mask,
                                       scale=scale, softcap=cfg.attn_softcap)
        else:
            if cache is not None:
                # A prompt into the cache: write its keys/values at cache_index (one slot for all rows, or one
                # per row), then attend over the whole cache.
                k_all, v_all = (write_cache(cache[n], x.astype(cache[n].dtype), cache_index)
                                for n, x in (("k", k), ("v", v)))
                new_cache = {"k": k_all, "v": v_all}
                k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
            impl = resolve_attention_impl(self.attention_impl, self.dtype, hd)
            out = attend(q, k, v, mask, segment_ids, impl, scale=scale, softcap=cfg.attn_softcap)
        out = out.reshape(B, T, cfg.n_heads * hd)
        o_proj = Projection(out.shape[-1], cfg.d_model, ("heads", "embed"), cfg.out_bias, out_std, name="o_proj")()
        (out,) = project(out, [o_proj], self.dtype, fuse=False)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    fuse_projections: bool = True  # gate and up as one matmul: see project()
    swiglu_grad_impl: str | None = None  # None/"auto": see ops.resolve_swiglu_grad_impl

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        d = x.shape[-1]
        up_proj = Projection(d, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, cfg.init_std, name="up_proj")()
        if cfg.activation in ("swiglu", "geglu"):
            gate_proj = Projection(d, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, cfg.init_std, name="gate_proj")()
            gate_act = nn.silu if cfg.activation == "swiglu" else functools.partial(nn.gelu, approximate=True)
            grad_impl = resolve_swiglu_grad_impl(self.swiglu_grad_impl, per_shard_rows(x.shape[0]) * x.shape[1],
                                                 cfg.d_ff, dtype=self.dtype)
            plain = not cfg.mlp_bias and not any(isinstance(k, AdaptedKernel) for k, _ in (gate_proj, up_proj))
            if self.fuse_projections and plain and cfg.activation == "swiglu" and grad_impl == "split":
                h = swiglu_gate_up(x, jnp.concatenate([gate_proj[0], up_proj[0]], axis=1), self.dtype)
            elif self.fuse_projections:
                (gate_up,) = project(x, [concat_projections([gate_proj, up_proj])], self.dtype, fuse=False)
                if cfg.activation == "swiglu":  # with its one-pass packed backward
                    h = swiglu_packed(gate_up, "mosaic" if grad_impl == "mosaic" else "xla")
                else:
                    gate, up = jnp.split(gate_up, 2, axis=-1)
                    h = gate_act(gate) * up
            else:
                gate, up = project(x, [gate_proj, up_proj], self.dtype, fuse=False)
                h = gate_act(gate) * up
        else:
            (up,) = project(x, [up_proj], self.dtype, fuse=False)
            h = nn.gelu(up, approximate=False) if cfg.activation == "gelu" else jnp.square(nn.relu(up))  # relu2
        down_proj = Projection(h.shape[-1], cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, out_std, name="down_proj")()
        (out,) = project(h, [down_proj], self.dtype, fuse=False)
        return out
