"""QK-norm + RoPE as Pallas (Triton) kernels over the packed q|k|v projection, forward and backward.

XLA:GPU splits a per-head RMSNorm into a row-statistics kernel and an elementwise kernel, and computes the
norm scale's gradient as a separate column reduction over every (token, head) row, which it runs at about a
third of HBM speed (docs/performance.md). These kernels make one pass each way: a program owns a block of
tokens and all of their heads, reads the RoPE tables of its tokens once for every head, computes the row
statistics in registers, and writes its block's share of the scale gradients as one row of a small
partial-sums array that XLA adds up afterwards.

Layouts: `qkv` is the fused projection output viewed as (N, H + 2K, D) with N = batch * time; heads 0..H-1
are queries, H..H+K-1 keys, the rest values (passed through). cos/sin are the first halves, (N, D/2), of the
rotate-half tables.
The math is `ops.rms_rope` / `rms_rope_bwd`, which stay the reference (tests compare the two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from picochat_jax.parallel import per_batch_shard

Array = jax.Array

_MAX_BLOCK_TOKENS = 16  # tools/bench_kernels.py sweep, H100: 16 tokens x 4 warps was fastest for fwd+bwd
_NUM_WARPS = 4


def power_of_two_divisor(n: int, largest: int, smallest: int = 16) -> int:
    """The largest power of two in [smallest, largest] that divides n, or 0: Triton tiles are powers of two."""
    tile = largest
    while tile >= smallest:
        if n % tile == 0:
            return tile
        tile //= 2
    return 0


def block_tokens(n_tokens: int, largest: int = _MAX_BLOCK_TOKENS) -> int:
    """Tokens per program (0 when no power-of-two block of at least 16 divides n_tokens)."""
    return power_of_two_divisor(n_tokens, largest)


def supported(n_tokens: int, head_dim: int) -> bool:
    """Whether the kernels take this shape: Triton wants power-of-two tiles."""
    return block_tokens(n_tokens) > 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _load_halves(ref, half: int, *index) -> tuple[Array, Array]:
    """The two halves of a head's rows, float32: rotate-half RoPE pairs column j with column j + half."""
    return ref[(*index, slice(None, half))].astype(jnp.float32), ref[(*index, slice(half, None))].astype(jnp.float32)


def _normalise(x1: Array, x2: Array, eps: float) -> tuple[Array, Array, Array]:
    width = 2 * x1.shape[-1]
    mean_sq = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / width
    rstd = jax.lax.rsqrt(mean_sq + eps)[:, None]
    return x1 * rstd, x2 * rstd, rstd


def _head_plan(n_heads: int, n_kv_heads: int) -> list[tuple[int, str, int]]:
    """(head in the packed projection, kind, index within its kind's output) for every normed head."""
    return [(h, "q", h) for h in range(n_heads)] + [(n_heads + j, "k", j) for j in range(n_kv_heads)]


def _forward_kernel(x_ref, cos_ref, sin_ref, scale_ref, q_ref, k_ref, v_ref, *, n_heads: int, n_kv_heads: int,
                    eps: float) -> None:
    half = x_ref.shape[-1] // 2
    cos, sin = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)  # once for every head
    outs = {"q": (q_ref, 0), "k": (k_ref, 1)}
    for head, kind, j in _head_plan(n_heads, n_kv_heads):
        out_ref, row = outs[kind]
        n1, n2, _ = _normalise(*_load_halves(x_ref, half, slice(None), head), eps)
        z1 = n1 * scale_ref[row, :half][None, :]
        z2 = n2 * scale_ref[row, half:][None, :]
        out_ref[:, j, :half] = (z1 * cos - z2 * sin).astype(out_ref.dtype)
        out_ref[:, j, half:] = (z2 * cos + z1 * sin).astype(out_ref.dtype)
    for j in range(n_kv_heads):
        v_ref[:, j, :] = x_ref[:, n_heads + n_kv_heads + j, :].astype(v_ref.dtype)


def _backward_kernel(x_ref, cos_ref, sin_ref, scale_ref, dq_ref, dk_ref, dv_ref, dx_ref, dscale_ref, *,
                     n_heads: int, n_kv_heads: int, eps: float) -> None:
    half = x_ref.shape[-1] // 2
    cos, sin = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
    grads = {"q": (dq_ref, 0), "k": (dk_ref, 1)}
    zeros = jnp.zeros((half,), jnp.float32)
    dscale = {"q": [zeros, zeros], "k": [zeros, zeros]}
    for head, kind, j in _head_plan(n_heads, n_kv_heads):
        dy_ref, row = grads[kind]
        n1, n2, rstd = _normalise(*_load_halves(x_ref, half, slice(None), head), eps)
        dy1, dy2 = _load_halves(dy_ref, half, slice(None), j)
        # The transpose of the rotation, then of the scale; the scale's gradient sums over tokens and heads.
        dz1 = dy1 * cos + dy2 * sin
        dz2 = dy2 * cos - dy1 * sin
        dscale[kind][0] += jnp.sum(dz1 * n1, axis=0)
        dscale[kind][1] += jnp.sum(dz2 * n2, axis=0)
        dn1 = dz1 * scale_ref[row, :half][None, :]
        dn2 = dz2 * scale_ref[row, half:][None, :]
        mean_dn_n = ((jnp.sum(dn1 * n1, axis=1) + jnp.sum(dn2 * n2, axis=1)) / (2 * half))[:, None]
        dx_ref[:, head, :half] = (rstd * (dn1 - n1 * mean_dn_n)).astype(dx_ref.dtype)
        dx_ref[:, head, half:] = (rstd * (dn2 - n2 * mean_dn_n)).astype(dx_ref.dtype)
    for kind, row in (("q", 0), ("k", 1)):
        dscale_ref[row, :half] = dscale[kind][0]
        dscale_ref[row, half:] = dscale[kind][1]
    for j in range(n_kv_heads):
        dx_ref[:, n_heads + n_kv_heads + j, :] = dv_ref[:, j, :].astype(dx_ref.dtype)


def _specs(block: int, head_dim: int):
    """BlockSpecs over the token-block grid: a program owns every head of its tokens, so each RoPE table
    block is read once per token instead of once per (token, head)."""
    def heads(count: int) -> pl.BlockSpec:
        return pl.BlockSpec((block, count, head_dim), lambda i: (i, 0, 0))

    table = pl.BlockSpec((block, head_dim // 2), lambda i: (i, 0))
    scales = pl.BlockSpec((2, head_dim), lambda i: (0, 0))
    return heads, table, scales


def compiler_params(interpret: bool, num_warps: int = 4):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _layout(qkv: Array, n_heads: int, n_kv_heads: int, max_block: int) -> tuple[int, int, int, int, int, int]:
    """(B, T, N = B*T tokens, heads in the packed projection, head_dim, tokens per program)."""
    B, T, width = qkv.shape
    n_all = n_heads + 2 * n_kv_heads
    return B, T, B * T, n_all, width // n_all, block_tokens(B * T, max_block)


def _local_forward(qkv: Array, cos: Array, sin: Array, scales: Array, n_heads: int, n_kv_heads: int, eps: float,
                   interpret: bool, max_block: int, num_warps: int) -> tuple[Array, Array, Array]:
    B, T, N, n_all, D, block = _layout(qkv, n_heads, n_kv_heads, max_block)
    heads, table, scale_spec = _specs(block, D)
    kernel = functools.partial(_forward_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps)
    q, k, v = pl.pallas_call(
        kernel,
        grid=(N // block,),
        in_specs=[heads(n_all), table, table, scale_spec],
        out_specs=[heads(n_heads), heads(n_kv_heads), heads(n_kv_heads)],
        out_shape=[jax.ShapeDtypeStruct((N, n, D), qkv.dtype) for n in (n_heads, n_kv_heads, n_kv_heads)],
        compiler_params=compiler_params(interpret, num_warps),
        interpret=interpret,
        name="qk_norm_rope_fwd",
    )(qkv.reshape(N, n_all, D), cos.reshape(N, D // 2), sin.reshape(N, D // 2), scales)
    return q.reshape(B, T, n_heads, D), k.reshape(B, T, n_kv_heads, D), v.reshape(B, T, n_kv_heads, D)


def _local_backward(qkv: Array, cos: Array, sin: Array, scales: Array, dq: Array, dk: Array, dv: Array,
                    n_heads: int, n_kv_heads: int, eps: float, interpret: bool, max_block: int,
                    num_warps: int) -> tuple[Array, Array]:
    B, T, N, n_all, D, block = _layout(qkv, n_heads, n_kv_heads, max_block)
    heads, table, scale_spec = _specs(block, D)
    partial_spec = pl.BlockSpec((pl.Squeezed(), 2, D), lambda i: (i, 0, 0))
    kernel = functools.partial(_backward_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps)
    d_packed, partials = pl.pallas_call(
        kernel,
        grid=(N // block,),
        in_specs=[heads(n_all), table, table, scale_spec, heads(n_heads), heads(n_kv_heads), heads(n_kv_heads)],
        out_specs=[heads(n_all), partial_spec],
        out_shape=[jax.ShapeDtypeStruct((N, n_all, D), qkv.dtype),
                   jax.ShapeDtypeStruct((N // block, 2, D), jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps),
        interpret=interpret,
        name="qk_norm_rope_bwd",
    )(qkv.reshape(N, n_all, D), cos.reshape(N, D // 2), sin.reshape(N, D // 2), scales,
      dq.reshape(N, n_heads, D), dk.reshape(N, n_kv_heads, D), dv.reshape(N, n_kv_heads, D))
    return d_packed.reshape(qkv.shape), partials.sum(0)


def _tables(rope: tuple[Array, Array], qkv: Array) -> tuple[Array, Array]:
    """(B, T, D/2) float32 cos and sin: a rotate-half table's two halves are equal (`ops.rope_tables`
    repeats the angles), so the kernels read only the first."""
    B, T, _ = qkv.shape
    cos, sin = (jnp.broadcast_to(t[..., : t.shape[-1] // 2], (B, T, 1, t.shape[-1] // 2)).reshape(B, T, -1)
                .astype(jnp.float32) for t in rope)
    return cos, sin


def default_interpret(interpret: bool | None) -> bool:
    """Pallas' interpret mode on CPU (tests), the compiled kernels elsewhere, unless told."""
    return jax.default_backend() == "cpu" if interpret is None else interpret


def sharded_forward(local, qkv: Array, q_scale: Array, k_scale: Array,
                    rope: tuple[Array, Array]) -> tuple[Array, Array, Array]:
    """`local(qkv, cos, sin, scales)` on each batch shard, with the tables' first halves and both scales: the
    calling convention of this module's kernels and of their Mosaic GPU port (`norm_rope_mgpu`)."""
    cos, sin = _tables(rope, qkv)
    scales = jnp.stack([q_scale, k_scale]).astype(jnp.float32)
    return per_batch_shard(local, (True, True, True, False), (True, True, True))(qkv, cos, sin, scales)


def sharded_backward(local, qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], dq: Array,
                     dk: Array, dv: Array) -> tuple[Array, Array, Array]:
    """`local(qkv, cos, sin, scales, dq, dk, dv)` -> (d packed, (2, D) scale gradients) on each batch shard, the
    scale gradients summed over shards: (d qkv packed, d q_scale, d k_scale)."""
    cos, sin = _tables(rope, qkv)
    scales = jnp.stack([q_scale, k_scale]).astype(jnp.float32)
    run = per_batch_shard(local, (True, True, True, False, True, True, True), (True, False))
    d_packed, d_scales = run(qkv, cos, sin, scales, dq, dk, dv)
    return d_packed, d_scales[0].astype(q_scale.dtype), d_scales[1].astype(k_scale.dtype)


def norm_rope_forward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], n_heads: int,
                      n_kv_heads: int, eps: float, interpret: bool | None = None, max_block: int = _MAX_BLOCK_TOKENS,
                      num_warps: int = _NUM_WARPS) -> tuple[Array, Array, Array]:
    """(q, k, v) heads from the packed projection (B, T, (H + 2K) * D): RMSNorm * scale, then RoPE.
    `max_block` (tokens per program, a power of two) and `num_warps` are tuning knobs (tools/bench_kernels.py)."""
    local = functools.partial(_local_forward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps,
                              interpret=default_interpret(interpret), max_block=max_block, num_warps=num_warps)
    return sharded_forward(local, qkv, q_scale, k_scale, rope)


def norm_rope_backward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], dq: Array, dk: Array,
                       dv: Array, n_heads: int, n_kv_heads: int, eps: float, interpret: bool | None = None,
                       max_block: int = _MAX_BLOCK_TOKENS, num_warps: int = _NUM_WARPS) -> tuple[Array, Array, Array]:
    """(d qkv packed, d q_scale, d k_scale) for the cotangents of `norm_rope_forward`'s outputs."""
    local = functools.partial(_local_backward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps,
                              interpret=default_interpret(interpret), max_block=max_block, num_warps=num_warps)
    return sharded_backward(local, qkv, q_scale, k_scale, rope, dq, dk, dv)
