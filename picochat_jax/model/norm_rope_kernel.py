"""QK-norm + RoPE as Pallas (Triton) kernels over the packed q|k|v projection, forward and backward.

XLA:GPU splits a per-head RMSNorm into a row-statistics kernel and an elementwise kernel, and computes the
norm scale's gradient as a separate column reduction over every (token, head) row, which it runs at about a
third of HBM speed (docs/performance.md). These kernels make one pass each way: a program owns a block of
tokens of one head, computes the row statistics in registers, and writes its block's share of the scale
gradient as one row of a small partial-sums array that XLA adds up afterwards.

Layouts: `qkv` is the fused projection output viewed as (N, H + 2K, D) with N = batch * time; heads 0..H-1
are queries, H..H+K-1 keys, the rest values (passed through). cos/sin are the (N, D) rotate-half tables.
The math is `layers._rms_rope` / `_rms_rope_bwd`, which stay the reference (tests compare the two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from picochat_jax.parallel import per_batch_shard

Array = jax.Array

_MAX_BLOCK_TOKENS = 128


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


def _halves(ref, half: int) -> tuple[Array, Array]:
    return ref[:, :half].astype(jnp.float32), ref[:, half:].astype(jnp.float32)


def _normalise(x1: Array, x2: Array, eps: float) -> tuple[Array, Array, Array]:
    width = 2 * x1.shape[-1]
    mean_sq = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / width
    rstd = jax.lax.rsqrt(mean_sq + eps)[:, None]
    return x1 * rstd, x2 * rstd, rstd


def _by_head_kind(head: Array, n_heads: int, n_kv_heads: int, query: Callable[[], None], key: Callable[[], None],
                  value: Callable[[], None]) -> None:
    """Run one of three kernel bodies by the kind of head this program owns (q, k or v)."""
    pl.when(head < n_heads)(query)
    pl.when((head >= n_heads) & (head < n_heads + n_kv_heads))(key)
    pl.when(head >= n_heads + n_kv_heads)(value)


def _forward_kernel(x_ref, cos_ref, sin_ref, scale_ref, q_ref, k_ref, v_ref, *, n_heads: int, n_kv_heads: int,
                    eps: float) -> None:
    head = pl.program_id(1)
    half = x_ref.shape[-1] // 2

    def norm_rope(out_ref, scale_row: int) -> None:
        n1, n2, _ = _normalise(*_halves(x_ref, half), eps)
        z1 = n1 * scale_ref[scale_row, :half][None, :]
        z2 = n2 * scale_ref[scale_row, half:][None, :]
        c1, c2 = _halves(cos_ref, half)
        s1, s2 = _halves(sin_ref, half)
        out_ref[:, :half] = (z1 * c1 - z2 * s1).astype(out_ref.dtype)
        out_ref[:, half:] = (z2 * c2 + z1 * s2).astype(out_ref.dtype)

    def copy_value() -> None:
        v_ref[...] = x_ref[...].astype(v_ref.dtype)

    _by_head_kind(head, n_heads, n_kv_heads, lambda: norm_rope(q_ref, 0), lambda: norm_rope(k_ref, 1), copy_value)


def _backward_kernel(x_ref, cos_ref, sin_ref, scale_ref, dq_ref, dk_ref, dv_ref, dx_ref, dscale_ref, *,
                     n_heads: int, n_kv_heads: int, eps: float) -> None:
    head = pl.program_id(1)
    half = x_ref.shape[-1] // 2

    def norm_rope_grad(dy_ref, scale_row: int) -> None:
        n1, n2, rstd = _normalise(*_halves(x_ref, half), eps)
        dy1, dy2 = _halves(dy_ref, half)
        c1, c2 = _halves(cos_ref, half)
        s1, s2 = _halves(sin_ref, half)
        # The transpose of the rotation, then of the scale; the scale's gradient is this block's column sums.
        dz1 = dy1 * c1 + dy2 * s2
        dz2 = dy2 * c2 - dy1 * s1
        dscale_ref[:half] = jnp.sum(dz1 * n1, axis=0)
        dscale_ref[half:] = jnp.sum(dz2 * n2, axis=0)
        dn1 = dz1 * scale_ref[scale_row, :half][None, :]
        dn2 = dz2 * scale_ref[scale_row, half:][None, :]
        mean_dn_n = ((jnp.sum(dn1 * n1, axis=1) + jnp.sum(dn2 * n2, axis=1)) / (2 * half))[:, None]
        dx_ref[:, :half] = (rstd * (dn1 - n1 * mean_dn_n)).astype(dx_ref.dtype)
        dx_ref[:, half:] = (rstd * (dn2 - n2 * mean_dn_n)).astype(dx_ref.dtype)

    def copy_value_grad() -> None:
        dx_ref[...] = dv_ref[...].astype(dx_ref.dtype)

    _by_head_kind(head, n_heads, n_kv_heads, lambda: norm_rope_grad(dq_ref, 0), lambda: norm_rope_grad(dk_ref, 1),
                  copy_value_grad)


def _specs(n_heads: int, n_kv_heads: int, block: int, head_dim: int):
    """BlockSpecs over the (token block, head) grid. Each per-kind array's head index is clamped into range;
    a program touches only its own kind's refs, so the clamped blocks are never loaded or stored."""
    squeezed = pl.Squeezed()

    def head_spec(first: int, count: int) -> pl.BlockSpec:
        return pl.BlockSpec((block, squeezed, head_dim),
                            lambda i, h: (i, jnp.clip(h - first, 0, count - 1), 0))

    table = pl.BlockSpec((block, head_dim), lambda i, h: (i, 0))
    scales = pl.BlockSpec((2, head_dim), lambda i, h: (0, 0))
    packed = pl.BlockSpec((block, squeezed, head_dim), lambda i, h: (i, h, 0))
    return head_spec, table, scales, packed


def compiler_params(interpret: bool, num_warps: int = 4):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _layout(qkv: Array, n_heads: int, n_kv_heads: int) -> tuple[int, int, int, int, int, int]:
    """(B, T, N = B*T tokens, heads in the packed projection, head_dim, tokens per program)."""
    B, T, width = qkv.shape
    n_all = n_heads + 2 * n_kv_heads
    return B, T, B * T, n_all, width // n_all, block_tokens(B * T)


def _local_forward(qkv: Array, cos: Array, sin: Array, scales: Array, n_heads: int, n_kv_heads: int, eps: float,
                   interpret: bool) -> tuple[Array, Array, Array]:
    B, T, N, n_all, D, block = _layout(qkv, n_heads, n_kv_heads)
    head_spec, table, scale_spec, packed = _specs(n_heads, n_kv_heads, block, D)
    kernel = functools.partial(_forward_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps)
    q, k, v = pl.pallas_call(
        kernel,
        grid=(N // block, n_all),
        in_specs=[packed, table, table, scale_spec],
        out_specs=[head_spec(0, n_heads), head_spec(n_heads, n_kv_heads), head_spec(n_heads + n_kv_heads, n_kv_heads)],
        out_shape=[jax.ShapeDtypeStruct((N, n, D), qkv.dtype) for n in (n_heads, n_kv_heads, n_kv_heads)],
        compiler_params=compiler_params(interpret),
        interpret=interpret,
        name="qk_norm_rope_fwd",
    )(qkv.reshape(N, n_all, D), cos.reshape(N, D), sin.reshape(N, D), scales)
    return q.reshape(B, T, n_heads, D), k.reshape(B, T, n_kv_heads, D), v.reshape(B, T, n_kv_heads, D)


def _local_backward(qkv: Array, cos: Array, sin: Array, scales: Array, dq: Array, dk: Array, dv: Array,
                    n_heads: int, n_kv_heads: int, eps: float, interpret: bool) -> tuple[Array, Array]:
    B, T, N, n_all, D, block = _layout(qkv, n_heads, n_kv_heads)
    head_spec, table, scale_spec, packed = _specs(n_heads, n_kv_heads, block, D)
    n_normed = n_heads + n_kv_heads
    partial_spec = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), D), lambda i, h: (i, jnp.minimum(h, n_normed - 1), 0))
    kernel = functools.partial(_backward_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps)
    d_packed, partials = pl.pallas_call(
        kernel,
        grid=(N // block, n_all),
        in_specs=[packed, table, table, scale_spec, head_spec(0, n_heads), head_spec(n_heads, n_kv_heads),
                  head_spec(n_heads + n_kv_heads, n_kv_heads)],
        out_specs=[packed, partial_spec],
        out_shape=[jax.ShapeDtypeStruct((N, n_all, D), qkv.dtype),
                   jax.ShapeDtypeStruct((N // block, n_normed, D), jnp.float32)],
        compiler_params=compiler_params(interpret),
        interpret=interpret,
        name="qk_norm_rope_bwd",
    )(qkv.reshape(N, n_all, D), cos.reshape(N, D), sin.reshape(N, D), scales,
      dq.reshape(N, n_heads, D), dk.reshape(N, n_kv_heads, D), dv.reshape(N, n_kv_heads, D))
    d_scales = jnp.stack([partials[:, :n_heads].sum((0, 1)), partials[:, n_heads:].sum((0, 1))])
    return d_packed.reshape(qkv.shape), d_scales


def _tables(rope: tuple[Array, Array], qkv: Array) -> tuple[Array, Array]:
    B, T, _ = qkv.shape
    cos, sin = (jnp.broadcast_to(t, (B, T, 1, t.shape[-1])).reshape(B, T, -1).astype(jnp.float32) for t in rope)
    return cos, sin


def default_interpret(interpret: bool | None) -> bool:
    """Pallas' interpret mode on CPU (tests), the compiled Triton kernel elsewhere, unless told."""
    return jax.default_backend() == "cpu" if interpret is None else interpret


def norm_rope_forward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], n_heads: int,
                      n_kv_heads: int, eps: float, interpret: bool | None = None) -> tuple[Array, Array, Array]:
    """(q, k, v) heads from the packed projection (B, T, (H + 2K) * D): RMSNorm * scale, then RoPE."""
    cos, sin = _tables(rope, qkv)
    scales = jnp.stack([q_scale, k_scale]).astype(jnp.float32)
    local = functools.partial(_local_forward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps,
                              interpret=default_interpret(interpret))
    return per_batch_shard(local, (True, True, True, False), (True, True, True))(qkv, cos, sin, scales)


def norm_rope_backward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], dq: Array, dk: Array,
                       dv: Array, n_heads: int, n_kv_heads: int, eps: float,
                       interpret: bool | None = None) -> tuple[Array, Array, Array]:
    """(d qkv packed, d q_scale, d k_scale) for the cotangents of `norm_rope_forward`'s outputs."""
    cos, sin = _tables(rope, qkv)
    scales = jnp.stack([q_scale, k_scale]).astype(jnp.float32)
    local = functools.partial(_local_backward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps,
                              interpret=default_interpret(interpret))
    run = per_batch_shard(local, (True, True, True, False, True, True, True), (True, False))
    d_packed, d_scales = run(qkv, cos, sin, scales, dq, dk, dv)
    return d_packed, d_scales[0].astype(q_scale.dtype), d_scales[1].astype(k_scale.dtype)
