"""The pre-norm RMSNorm's backward as one Pallas (Triton) kernel, residual gradient included.

In the backward pass XLA:GPU fuses the residual stream's gradient, the norm's input gradient and the norm
scale's column reduction into one kernel that ran at about 40% of HBM speed on an H100 (0.18 ms a call for
0.07 ms of traffic at h100-100m; two calls a layer). Here a program owns a block of rows: it reads the rows once
for their statistics and once more from cache to write d x, and leaves its block's column sums of the scale
gradient in a small partial-sums array that XLA adds up.

`residual_rms_norm(x, scale)` returns `(x, RMSNorm(x) * scale)`. Passing the residual stream through the same
custom VJP is what lets the backward add the residual's own cotangent in the kernel instead of in a separate
elementwise pass. The forward stays XLA's (its fusion with the residual add already runs at HBM speed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from picochat_jax.model import rms_norm_mgpu
from picochat_jax.model.norm_rope_kernel import block_tokens, compiler_params, default_interpret, power_of_two_divisor
from picochat_jax.parallel import per_batch_shard

Array = jax.Array

_MAX_BLOCK_ROWS = 16  # tools/bench_kernels.py sweep, H100: 16 rows x 8 warps was fastest
_NUM_WARPS = 8
_MAX_CHUNK = 256


def column_chunk(width: int) -> int:
    """Columns loaded at a time (a 768-wide row is three 256-wide chunks); 0 when none fits."""
    return power_of_two_divisor(width, _MAX_CHUNK)


def supported(n_rows: int, width: int) -> bool:
    return block_tokens(n_rows, _MAX_BLOCK_ROWS) > 0 and column_chunk(width) > 0


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """RMSNorm(x) * scale in `dtype`, statistics in float32 (the one definition `layers.Norm` uses too)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * scale).astype(dtype)


def _backward_kernel(x_ref, dy_ref, d_pass_ref, scale_ref, dx_ref, d_scale_ref, *, chunk: int, eps: float) -> None:
    width = x_ref.shape[-1]
    columns = [slice(start, start + chunk) for start in range(0, width, chunk)]
    sum_sq = jnp.zeros((x_ref.shape[0],), jnp.float32)
    sum_dy_g_x = jnp.zeros((x_ref.shape[0],), jnp.float32)
    for cols in columns:
        x = x_ref[:, cols].astype(jnp.float32)
        dy_g = dy_ref[:, cols].astype(jnp.float32) * scale_ref[cols][None, :]
        sum_sq += jnp.sum(x * x, axis=1)
        sum_dy_g_x += jnp.sum(dy_g * x, axis=1)
    rstd = jax.lax.rsqrt(sum_sq / width + eps)
    # d x = rstd * dy * g - x * rstd^3 * sum(dy * g * x) / width
    x_coef = (rstd * rstd * rstd * sum_dy_g_x / width)[:, None]
    rstd = rstd[:, None]
    for cols in columns:
        x = x_ref[:, cols].astype(jnp.float32)
        dy = dy_ref[:, cols].astype(jnp.float32)
        d_scale_ref[cols] = jnp.sum(dy * x * rstd, axis=0)
        dx = rstd * dy * scale_ref[cols][None, :] - x * x_coef + d_pass_ref[:, cols].astype(jnp.float32)
        dx_ref[:, cols] = dx.astype(dx_ref.dtype)


def _local_backward(x: Array, scale: Array, dy: Array, d_pass: Array, eps: float, interpret: bool, max_block: int,
                    num_warps: int) -> tuple[Array, Array]:
    *lead, width = x.shape
    rows = x.size // width
    block = block_tokens(rows, max_block)
    row_block = pl.BlockSpec((block, width), lambda i: (i, 0))
    dx, partials = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=column_chunk(width), eps=eps),
        grid=(rows // block,),
        in_specs=[row_block, row_block, row_block, pl.BlockSpec((width,), lambda i: (0,))],
        out_specs=[row_block, pl.BlockSpec((pl.Squeezed(), width), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, width), x.dtype), jax.ShapeDtypeStruct((rows // block, width),
                                                                                     jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps),
        interpret=interpret,
        name="rms_norm_bwd",
    )(x.reshape(rows, width), dy.reshape(rows, width), d_pass.reshape(rows, width), scale.astype(jnp.float32))
    return dx.reshape(*lead, width), partials.sum(0)


def rms_norm_backward(x: Array, scale: Array, dy: Array, d_pass: Array, eps: float, interpret: bool | None = None,
                      max_block: int = _MAX_BLOCK_ROWS, num_warps: int = _NUM_WARPS) -> tuple[Array, Array]:
    """(d x, d scale) of `residual_rms_norm` for cotangents d_pass (of x passed through) and dy (of the norm).
    `max_block` (rows per program, a power of two) and `num_warps` are tuning knobs (tools/bench_kernels.py)."""
    local = functools.partial(_local_backward, eps=eps, interpret=default_interpret(interpret), max_block=max_block,
                              num_warps=num_warps)
    return per_batch_shard(local, (True, False, True, True), (True, False))(x, scale, dy, d_pass)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def residual_rms_norm(x: Array, scale: Array, eps: float, dtype, impl: str = "mosaic") -> tuple[Array, Array]:
    """(x, RMSNorm(x) * scale in `dtype`): the residual stream passed through, and its pre-norm. The backward
    runs this module's Triton kernel (impl "pallas") or its Mosaic GPU port (`rms_norm_mgpu`, impl "mosaic")."""
    return x, rms_norm(x, scale, eps, dtype)


def _residual_rms_norm_fwd(x, scale, eps, dtype, impl):
    return residual_rms_norm(x, scale, eps, dtype, impl), (x, scale)


def _residual_rms_norm_bwd(eps, dtype, impl, res, cotangents):
    x, scale = res
    d_pass, dy = cotangents
    backward = rms_norm_mgpu.rms_norm_backward if impl == "mosaic" else rms_norm_backward
    dx, d_scale = backward(x, scale, dy, d_pass, eps)
    return dx, d_scale.astype(scale.dtype)


residual_rms_norm.defvjp(_residual_rms_norm_fwd, _residual_rms_norm_bwd)
