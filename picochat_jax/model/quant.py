"""4-bit NormalFloat (NF4) storage for frozen weights: QLoRA's base-model format, in plain JAX.

A kernel is cut into blocks of 64 consecutive values (row-major over (in, out)); each block keeps its absmax
and every value becomes the index (4 bits) of the nearest of 16 NormalFloat levels of value / absmax. Two
indices share a byte. The absmaxes are quantised once more ("double quantisation", as bitsandbytes does):
minus their mean, in blocks of 256, as int8 with one float32 scale per block. That is 4 + 8/64 + 32/16384
~= 4.13 bits per weight, against 16 for bf16.

A quantised kernel is a dict of arrays (`QUANT_KEY` marks it) and keeps the leading layer axis of the scanned
decoder, so `nn.scan` hands each layer its own slice and `dequantize_nf4` rebuilds one layer's kernel inside
the step: the full-precision weights of all layers never exist at once. Everything is jnp: the same code on
CPU, GPU and TPU; the unpack-lookup-scale is left to XLA's fusion (there is no hand-written dequant-matmul
kernel).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NF4 levels of the QLoRA paper (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)

BLOCK = 64  # values per absmax
ABSMAX_BLOCK = 256  # absmaxes per second-level scale
QUANT_KEY = "nf4"
QUANTIZE_CHOICES = ("none", "4bit")


def is_quantized(value: Any) -> bool:
    return isinstance(value, dict) and QUANT_KEY in value


def can_quantize(shape: tuple[int, ...]) -> bool:
    """A (L, in, out) kernel whose per-layer size splits into whole blocks."""
    return len(shape) == 3 and (shape[1] * shape[2]) % BLOCK == 0


def quantize_nf4(kernel: Any) -> dict[str, np.ndarray]:
    """(L, in, out) float kernel -> NF4 dict of host arrays with leading axis L (see the module docstring).

    Runs in numpy one layer at a time, as the weights load: no accelerator memory is spent on it, so the
    step's peak memory is the quantised model's own."""
    kernel = np.asarray(kernel)
    L = kernel.shape[0]
    nblocks = kernel[0].size // BLOCK
    padded = -(-nblocks // ABSMAX_BLOCK) * ABSMAX_BLOCK
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    packed = np.empty((L, kernel[0].size // 2), np.uint8)
    absmax = np.zeros((L, padded), np.float32)
    for layer in range(L):
        blocks = kernel[layer].astype(np.float32).reshape(nblocks, BLOCK)
        absmax[layer, :nblocks] = np.abs(blocks).max(axis=-1)
        normed = blocks / np.where(absmax[layer, :nblocks] == 0, 1.0, absmax[layer, :nblocks])[:, None]
        codes = np.searchsorted(midpoints, normed).astype(np.uint8).reshape(-1)  # index of the nearest level
        packed[layer] = (codes[0::2] << 4) | codes[1::2]
    # Double quantisation of the absmaxes: centred, int8 per block of 256, float32 scale per block.
    offset = absmax[:, :nblocks].mean(axis=1)
    centred = absmax - offset[:, None]
    centred[:, nblocks:] = 0.0
    centred = centred.reshape(L, -1, ABSMAX_BLOCK)
    scale = (np.abs(centred).max(axis=-1) / 127.0).astype(np.float32)
    q = np.round(centred / np.where(scale == 0, 1.0, scale)[..., None]).astype(np.int8)
    return {QUANT_KEY: packed, "absmax_q": q.reshape(L, -1), "absmax_scale": scale,
            "absmax_offset": offset.astype(np.float32)}


def dequantize_nf4(q: dict[str, Array], shape: tuple[int, int], dtype: Any = jnp.float32) -> Array:
    """One kernel of `shape` (in, out) from a quantised dict *without* the layer axis (as inside the scan),
    or (L, in, out) from one with it."""
    return _dequantize(q, shape, dtype, jnp)


def _dequantize(q: dict[str, Any], shape: tuple[int, int], dtype: Any, xp: Any) -> Any:
    """`dequantize_nf4` in the array module `xp`: jnp inside the step, numpy on the host."""
    packed = q[QUANT_KEY]
    lead = packed.shape[:-1]
    codes = xp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*lead, -1, BLOCK)
    values = xp.asarray(NF4_LEVELS)[codes.astype(xp.int32)]
    absmax_q = q["absmax_q"].astype(xp.float32).reshape(*lead, -1, ABSMAX_BLOCK)
    absmax = (absmax_q * q["absmax_scale"][..., None]).reshape(*lead, -1)[..., :codes.shape[-2]]
    absmax = absmax + q["absmax_offset"][..., None]
    return (values * absmax[..., None]).reshape(*lead, *shape).astype(dtype)


def quantize_tree(params: Any, paths: list[tuple[str, ...]], source: Any = None) -> Any:
    """`params` with the kernels at `paths` replaced by NF4 dicts, quantised from the same leaves of `source`
    (e.g. the float32 weights when `params` holds bf16 copies; default `params` itself). Kernels that do not
    split into whole blocks stay as they are. Pure: untouched leaves are shared."""
    from picochat_jax.model.lora import get_path, set_path  # lora resolves NF4 kernels: import late

    out = params
    for path in paths:
        kernel = get_path(params if source is None else source, path)
        if kernel is not None and can_quantize(tuple(kernel.shape)):
            out = set_path(out, path, quantize_nf4(kernel))
    return out


def dequantized_over(quantized: Any, original: Any) -> Any:
    """`original` (host params) with every leaf that is an NF4 dict in `quantized` replaced by its float32
    dequantisation: the weights a QLoRA run actually trained against. Computed in numpy, one layer at a time:
    on an accelerator the float32 copy of a stacked kernel and its temporaries (several times the NF4 model)
    would set the run's peak memory."""
    if is_quantized(quantized):
        layers = [{k: np.asarray(v[i]) for k, v in quantized.items()} for i in range(original.shape[0])]
        return np.stack([_dequantize(layer, tuple(original.shape[1:]), np.float32, np) for layer in layers])
    if isinstance(quantized, dict):
        return {k: dequantized_over(v, original[k]) for k, v in quantized.items()}
    return original


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (quantised dicts included)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))
