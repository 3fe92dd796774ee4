"""QK-norm + RoPE as Pallas Mosaic GPU kernels over the packed q|k|v projection, forward and backward.

The same math as `norm_rope_kernel` (the Triton kernels, whose Pallas backend jax 0.11 deprecates) on Pallas'
maintained GPU backend. Mosaic GPU programs are warpgroups whose arrays live in layouts: a head's block of
tokens is loaded in the WGMMA layout (rows in multiples of 64), where a sum over a row (the RMS statistics) or
over a column (the scale gradient) is a supported reduction and broadcasting a row statistic back is free.

One kernel each way, a program per block of tokens: it copies its cos and sin rows and the norm scales into
shared memory once, then loops over the query heads, then the key heads, then copies the value heads, with TMA
copies of the next head's blocks (`model/mgpu.py`) overlapping the current head's step, so the packed gradient
is written once, in one launch. Each program leaves its blocks' scale-gradient column sums in a small
partial-sums array that XLA adds up.

Layouts: `qkv` is viewed as (N, (H + 2K) * D) with N = batch * time; cos/sin are the first halves, (N, D/2), of
the rotate-half tables. `ops.rms_rope` / `rms_rope_bwd` stay the reference (tests compare the two).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from picochat_jax.model import mgpu
from picochat_jax.model.mgpu import Block
from picochat_jax.model.norm_rope_kernel import default_interpret, sharded_backward, sharded_forward

Array = jax.Array

_CONCURRENCY = 2  # heads' blocks in shared memory at once: the one computed and the one being copied in


def supported(n_tokens: int, head_dim: int, block: int = mgpu.BLOCK_ROWS) -> bool:
    """Whether the kernels take this shape: whole 64-row blocks, halves of the head a multiple of 8 wide, and
    heads of at most 128 (shared memory holds 1,536 bytes per head column: the staged cos/sin rows and scales,
    and two heads' blocks in flight; 256-wide heads would need 393,216 of an H100/H200's 232,448)."""
    return n_tokens % block == 0 and head_dim % 16 == 0 and head_dim <= 128


def _halves(ref, interpret: bool) -> tuple[Array, Array]:
    """The two halves of a head's rows: rotate-half RoPE pairs column j with column j + D/2."""
    half = ref.shape[-1] // 2
    return mgpu.load(ref, pl.ds(0, half), interpret), mgpu.load(ref, pl.ds(half, half), interpret)


def _normalise(x1: Array, x2: Array, eps: float) -> tuple[Array, Array, Array]:
    mean_sq = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) * (1.0 / (2 * x1.shape[1]))
    rstd = mgpu.broadcast_rows(jax.lax.rsqrt(mean_sq + eps), x1.shape)
    return x1 * rstd, x2 * rstd, rstd


def _store_halves(ref, first: Array, second: Array) -> None:
    half = ref.shape[-1] // 2
    ref[:, pl.ds(0, half)] = first.astype(ref.dtype)
    ref[:, pl.ds(half, half)] = second.astype(ref.dtype)


def _norm_rope_step(cos_ref, sin_ref, scale_ref, eps: float, interpret: bool):
    """One head's block: x -> the normed, rotated head, with the program's cos and sin rows and the kind's
    scale rows (staged in shared memory once for all heads)."""

    def step(_, x_ref, out_ref) -> None:
        n1, n2, _ = _normalise(*_halves(x_ref, interpret), eps)
        s1, s2 = _halves(scale_ref, interpret)
        cos, sin = mgpu.load(cos_ref, interpret=interpret), mgpu.load(sin_ref, interpret=interpret)
        z1, z2 = n1 * s1, n2 * s2
        _store_halves(out_ref, z1 * cos - z2 * sin, z2 * cos + z1 * sin)

    return step


def _norm_rope_grad_step(cos_ref, sin_ref, scale_ref, eps: float, interpret: bool):
    """One head's block of the backward: d x for the head, and the block's column sums of the scale gradient
    as one row of the partial sums."""

    def step(_, x_ref, dy_ref, dx_ref, partial_ref) -> None:
        half = x_ref.shape[-1] // 2
        n1, n2, rstd = _normalise(*_halves(x_ref, interpret), eps)
        dy1, dy2 = _halves(dy_ref, interpret)
        s1, s2 = _halves(scale_ref, interpret)
        cos, sin = mgpu.load(cos_ref, interpret=interpret), mgpu.load(sin_ref, interpret=interpret)
        # The transpose of the rotation, then of the scale; the scale's gradient sums over the block's tokens.
        dz1 = dy1 * cos + dy2 * sin
        dz2 = dy2 * cos - dy1 * sin
        partial_ref[0, pl.ds(0, half)] = jnp.sum(dz1 * n1, axis=0)
        partial_ref[0, pl.ds(half, half)] = jnp.sum(dz2 * n2, axis=0)
        dn1, dn2 = dz1 * s1, dz2 * s2
        mean_dn_n = mgpu.broadcast_rows((jnp.sum(dn1 * n1, axis=1) + jnp.sum(dn2 * n2, axis=1)) * (0.5 / half),
                                        n1.shape)
        _store_halves(dx_ref, rstd * (dn1 - n1 * mean_dn_n), rstd * (dn2 - n2 * mean_dn_n))

    return step


def _copy_step(_, src_ref, dst_ref) -> None:
    dst_ref[...] = src_ref[...]


def _kinds(n_heads: int, n_kv_heads: int) -> tuple[tuple[int, int, int], ...]:
    """(first head in the packed projection, heads, row block of the scales) for the query, then the key heads."""
    return (0, n_heads, 0), (n_heads, n_kv_heads, 1)


def _tables_and_scales(i: Any, cos, sin, scale_rows, block: int) -> list:
    """The program's cos and sin rows and both kinds' scale rows: the same for every head."""
    return [cos.at[pl.ds(i * block, block)], sin.at[pl.ds(i * block, block)], scale_rows]


def _local_forward(qkv: Array, cos: Array, sin: Array, scales: Array, n_heads: int, n_kv_heads: int, eps: float,
                   block: int, interpret: bool, concurrency: int) -> tuple[Array, Array, Array]:
    B, T, width = qkv.shape
    N, D = B * T, width // (n_heads + 2 * n_kv_heads)
    head = (block, D)

    def body(i, x, cos, sin, scale_rows, q, k, v) -> None:
        def heads(cos_rows, sin_rows, scale_rows) -> None:
            for (first, count, kind), out in zip(_kinds(n_heads, n_kv_heads), (q, k), strict=True):
                step = _norm_rope_step(cos_rows, sin_rows, scale_rows.at[pl.ds(kind * block, block)], eps,
                                       interpret)
                mgpu.pipeline(step, count, i, [(x, Block(head, lambda i, h, first=first: (i, first + h)))],
                              [(out, Block(head, lambda i, h: (i, h)))], interpret, concurrency=concurrency)

        mgpu.staged(_tables_and_scales(i, cos, sin, scale_rows, block), heads, interpret)
        mgpu.pipeline(_copy_step, n_kv_heads, i, [(x, Block(head, lambda i, h: (i, n_heads + n_kv_heads + h)))],
                      [(v, Block(head, lambda i, h: (i, h)))], interpret,
                      concurrency=concurrency)  # the value heads, unchanged

    out_type = [jax.ShapeDtypeStruct((N, n * D), qkv.dtype) for n in (n_heads, n_kv_heads, n_kv_heads)]
    operands = (qkv.reshape(N, width), cos.reshape(N, D // 2), sin.reshape(N, D // 2),
                jnp.repeat(scales, block, axis=0))  # each kind's scale as a block of rows
    q, k, v = mgpu.launch(body, operands, out_type, N // block, interpret)
    return q.reshape(B, T, n_heads, D), k.reshape(B, T, n_kv_heads, D), v.reshape(B, T, n_kv_heads, D)


def _local_backward(qkv: Array, cos: Array, sin: Array, scales: Array, dq: Array, dk: Array, dv: Array,
                    n_heads: int, n_kv_heads: int, eps: float, block: int, interpret: bool,
                    concurrency: int) -> tuple[Array, Array]:
    B, T, width = qkv.shape
    N, D = B * T, width // (n_heads + 2 * n_kv_heads)
    n_normed = n_heads + n_kv_heads
    head = (block, D)

    def body(i, x, cos, sin, scale_rows, dq, dk, dv, dx, partials) -> None:
        def heads(cos_rows, sin_rows, scale_rows) -> None:
            for (first, count, kind), dy in zip(_kinds(n_heads, n_kv_heads), (dq, dk), strict=True):
                step = _norm_rope_grad_step(cos_rows, sin_rows, scale_rows.at[pl.ds(kind * block, block)], eps,
                                            interpret)
                mgpu.pipeline(step, count, i,
                              [(x, Block(head, lambda i, h, first=first: (i, first + h))),
                               (dy, Block(head, lambda i, h: (i, h)))],
                              [(dx, Block(head, lambda i, h, first=first: (i, first + h))),
                               (partials, Block((1, D), lambda i, h, first=first: (i, first + h)))], interpret,
                              concurrency=concurrency)

        mgpu.staged(_tables_and_scales(i, cos, sin, scale_rows, block), heads, interpret)
        mgpu.pipeline(_copy_step, n_kv_heads, i, [(dv, Block(head, lambda i, h: (i, h)))],
                      [(dx, Block(head, lambda i, h: (i, n_normed + h)))], interpret,
                      concurrency=concurrency)  # d v, unchanged

    out_type = [jax.ShapeDtypeStruct((N, width), qkv.dtype),
                jax.ShapeDtypeStruct((N // block, n_normed * D), jnp.float32)]
    operands = (qkv.reshape(N, width), cos.reshape(N, D // 2), sin.reshape(N, D // 2),
                jnp.repeat(scales, block, axis=0), dq.reshape(N, -1), dk.reshape(N, -1), dv.reshape(N, -1))
    d_packed, partials = mgpu.launch(body, operands, out_type, N // block, interpret)
    per_head = partials.reshape(N // block, n_normed, D).sum(0)
    return d_packed.reshape(qkv.shape), jnp.stack([per_head[:n_heads].sum(0), per_head[n_heads:].sum(0)])


def norm_rope_forward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], n_heads: int,
                      n_kv_heads: int, eps: float, interpret: bool | None = None, block: int = mgpu.BLOCK_ROWS,
                      concurrency: int = _CONCURRENCY) -> tuple[Array, Array, Array]:
    """(q, k, v) heads from the packed projection (B, T, (H + 2K) * D): RMSNorm * scale, then RoPE. Pallas'
    interpret mode on CPU (tests), the compiled kernels elsewhere, unless told. `block` (tokens per program, a
    multiple of 64) and `concurrency` (heads' blocks in flight) are tuning knobs (tools/bench_kernels.py)."""
    local = functools.partial(_local_forward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps, block=block,
                              concurrency=concurrency, interpret=default_interpret(interpret))
    return sharded_forward(local, qkv, q_scale, k_scale, rope)


def norm_rope_backward(qkv: Array, q_scale: Array, k_scale: Array, rope: tuple[Array, Array], dq: Array, dk: Array,
                       dv: Array, n_heads: int, n_kv_heads: int, eps: float, interpret: bool | None = None,
                       block: int = mgpu.BLOCK_ROWS, concurrency: int = _CONCURRENCY) -> tuple[Array, Array, Array]:
    """(d qkv packed, d q_scale, d k_scale) for the cotangents of `norm_rope_forward`'s outputs."""
    local = functools.partial(_local_backward, n_heads=n_heads, n_kv_heads=n_kv_heads, eps=eps, block=block,
                              concurrency=concurrency, interpret=default_interpret(interpret))
    return sharded_backward(local, qkv, q_scale, k_scale, rope, dq, dk, dv)
