"""SwiGLU's backward as a Pallas Mosaic GPU kernel: the packed gradient d[gate | up] from the fused gate/up
projection's output [gate | up] and the cotangent of silu(gate) * up, in one pass.

XLA's elementwise kernels read each input more than once here: written as one packed gradient, every output
element re-reads its row's gate, up and cotangent for the other half, and XLA kept a float32 product of the two
halves in memory between two kernels; written as two gradients, XLA made two kernels that each read the
inputs (docs/performance.md). A program here owns a block of 64 rows and pipelines over column chunks: each step
reads one chunk of gate, up and the cotangent and writes the same chunk of both gradient halves.
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

_CONCURRENCY = 2
# Columns per step: five (64, chunk) blocks a step, two steps in flight, within the H200's 227 KiB of shared
# memory: 128 columns of bf16 (160 KiB), 64 of float32. bf16 at 128 columns was the fastest tuning
# (tools/bench_kernels.py, docs/performance.md).
_SMEM_BYTES = 232448


def default_chunk(itemsize: int, concurrency: int = _CONCURRENCY) -> int:
    chunk = 128
    while chunk > 32 and concurrency * 5 * mgpu.BLOCK_ROWS * chunk * itemsize > _SMEM_BYTES:
        chunk //= 2
    return chunk


def supported(n_rows: int, width: int, itemsize: int = 2, chunk: int | None = None) -> bool:
    """Whether the kernel takes `n_rows` rows of `width` = d_ff in a dtype of `itemsize` bytes: whole 64-row
    blocks and whole column chunks."""
    return n_rows % mgpu.BLOCK_ROWS == 0 and width % (chunk or default_chunk(itemsize)) == 0


def _local_backward(gate_up: Array, d_out: Array, interpret: bool, columns: int, concurrency: int) -> Array:
    *lead, packed = gate_up.shape
    width = packed // 2
    rows = gate_up.size // packed
    chunk = (mgpu.BLOCK_ROWS, columns)
    chunks = width // columns
    first_half = Block(chunk, lambda i, c: (i, c))
    second_half = Block(chunk, lambda i, c: (i, c + chunks))

    def step(_, gate_ref, up_ref, d_out_ref, d_gate_ref, d_up_ref) -> None:
        gate = mgpu.load(gate_ref, interpret=interpret)
        up = mgpu.load(up_ref, interpret=interpret)
        d = mgpu.load(d_out_ref, interpret=interpret)
        sig = 1.0 / (1.0 + jnp.exp(-gate))
        d_sig = d * sig
        d_gate_ref[...] = (d_sig * up * (1.0 + gate * (1.0 - sig))).astype(d_gate_ref.dtype)
        d_up_ref[...] = (d_sig * gate).astype(d_up_ref.dtype)

    def body(i, gate_up, d_out, d_gate_up) -> None:
        mgpu.pipeline(step, chunks, i, [(gate_up, first_half), (gate_up, second_half), (d_out, first_half)],
                      [(d_gate_up, first_half), (d_gate_up, second_half)], interpret, concurrency=concurrency)

    out_type = [jax.ShapeDtypeStruct((rows, packed), gate_up.dtype)]
    (d_gate_up,) = mgpu.launch(body, (gate_up.reshape(rows, packed), d_out.reshape(rows, width)), out_type,
                               rows // mgpu.BLOCK_ROWS, interpret)
    return d_gate_up.reshape(*lead, packed)


def swiglu_backward(gate_up: Array, d_out: Array, interpret: bool | None = None, chunk: int | None = None,
                    concurrency: int = _CONCURRENCY) -> Array:
    """d gate_up (in gate_up's dtype) of `ops.swiglu_packed` for the cotangent `d_out` of its output. `chunk`
    (columns per step, default `default_chunk`) and `concurrency` (chunks in flight) are tuning knobs."""
    columns = chunk or default_chunk(jnp.dtype(gate_up.dtype).itemsize, concurrency)
    local = functools.partial(_local_backward, interpret=default_interpret(interpret), columns=columns,
                              concurrency=concurrency)
    (d_gate_up,) = per_batch_shard(lambda g, d: (local(g, d),), (True, True), (True,))(gate_up, d_out)
    return d_gate_up
