"""The pre-norm RMSNorm's backward, residual gradient included, as a Pallas Mosaic GPU kernel.

The same math as `rms_norm_kernel`'s Triton kernel (see there for why the backward is a kernel). A program owns a
block of 64 rows (the WGMMA layout's row tile) and makes two pipelines over 64-wide column blocks: the first
sums each row's x² and (dy · scale · x) into a carry, the second writes d x and leaves the block's column sums of
the scale gradient as one row of a small partial-sums array that XLA adds up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from picochat_jax.model import mgpu
from picochat_jax.model.mgpu import Block
from picochat_jax.model.norm_rope_kernel import default_interpret
from picochat_jax.parallel import per_batch_shard

Array = jax.Array

_CHUNK = 64
_CONCURRENCY = 2


def supported(n_rows: int, width: int, chunk: int = _CHUNK) -> bool:
    """Whether the kernel takes this shape: whole 64-row blocks and whole column chunks."""
    return n_rows % mgpu.BLOCK_ROWS == 0 and width % chunk == 0


def _local_backward(x: Array, scale: Array, dy: Array, d_pass: Array, eps: float, interpret: bool, columns: int,
                    concurrency: int) -> tuple[Array, Array]:
    *lead, width = x.shape
    rows = x.size // width
    chunk = (mgpu.BLOCK_ROWS, columns)
    chunks = width // columns

    def statistics_step(_, x_ref, dy_ref, scale_ref, sums):
        sum_sq, sum_dy_g_x = sums
        xs = mgpu.load(x_ref, interpret=interpret)
        dy_g = mgpu.load(dy_ref, interpret=interpret) * mgpu.load(scale_ref, interpret=interpret)
        return sum_sq + jnp.sum(xs * xs, axis=1), sum_dy_g_x + jnp.sum(dy_g * xs, axis=1)

    def body(i, x, dy, d_pass, scale_rows, dx, partials) -> None:
        def at(ref):
            return ref, Block(chunk, lambda i, c: (i, c))

        scale_block = (scale_rows, Block(chunk, lambda i, c: (0, c)))
        zeros = mgpu.row_zeros(mgpu.BLOCK_ROWS, interpret)
        sum_sq, sum_dy_g_x = mgpu.pipeline(statistics_step, chunks, i, [at(x), at(dy), scale_block], [], interpret,
                                           init_carry=(zeros, zeros), concurrency=concurrency)
        rstd = jax.lax.rsqrt(sum_sq * (1.0 / width) + eps)
        # d x = rstd * dy * g - x * rstd^3 * sum(dy * g * x) / width
        x_coef = mgpu.broadcast_rows(rstd * rstd * rstd * sum_dy_g_x * (1.0 / width), chunk)
        rstd = mgpu.broadcast_rows(rstd, chunk)

        def gradient_step(_, x_ref, dy_ref, d_pass_ref, scale_ref, dx_ref, partial_ref) -> None:
            xs, dys = mgpu.load(x_ref, interpret=interpret), mgpu.load(dy_ref, interpret=interpret)
            partial_ref[0, :] = jnp.sum(dys * xs * rstd, axis=0)
            dx_ref[...] = (rstd * dys * mgpu.load(scale_ref, interpret=interpret) - xs * x_coef
                           + mgpu.load(d_pass_ref, interpret=interpret)).astype(dx_ref.dtype)

        mgpu.pipeline(gradient_step, chunks, i, [at(x), at(dy), at(d_pass), scale_block],
                      [at(dx), (partials, Block((1, columns), lambda i, c: (i, c)))], interpret,
                      concurrency=concurrency)

    out_type = [jax.ShapeDtypeStruct((rows, width), x.dtype),
                jax.ShapeDtypeStruct((rows // mgpu.BLOCK_ROWS, width), jnp.float32)]
    scale_rows = jnp.broadcast_to(scale.astype(jnp.float32), (mgpu.BLOCK_ROWS, width))
    dx, partials = mgpu.launch(body, (x.reshape(rows, width), dy.reshape(rows, width), d_pass.reshape(rows, width),
                                      scale_rows), out_type, rows // mgpu.BLOCK_ROWS, interpret)
    return dx.reshape(*lead, width), partials.sum(0)


def rms_norm_backward(x: Array, scale: Array, dy: Array, d_pass: Array, eps: float, interpret: bool | None = None,
                      chunk: int = _CHUNK, concurrency: int = _CONCURRENCY) -> tuple[Array, Array]:
    """(d x, d scale) of `rms_norm_kernel.residual_rms_norm` for cotangents d_pass (of x passed through) and dy
    (of the norm). `chunk` (columns per step) and `concurrency` (chunks in flight) are tuning knobs
    (tools/bench_kernels.py)."""
    local = functools.partial(_local_backward, eps=eps, interpret=default_interpret(interpret), columns=chunk,
                              concurrency=concurrency)
    return per_batch_shard(local, (True, False, True, True), (True, False))(x, scale, dy, d_pass)
