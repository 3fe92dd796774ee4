"""The small frame our Pallas Mosaic GPU kernels share: one program (a warpgroup) per block of rows, running
pipelines over blocks (heads, column chunks) in which the TMA copies of the next block overlap the current
block's step (`plgpu.emit_pipeline`). `plgpu` is imported where it is used, so importing the model never depends
on the Mosaic GPU bindings of the installed jaxlib.

Pallas' GPU interpreter cannot run such pipelines (it rejects their predicated copies), so in interpret mode
(CPU tests) the same kernel body runs as an interpreted Pallas call over the programs, each pipeline a Python
loop over its steps on the same blocks, the WGMMA layouts left out. The steps, index maps and carries are the
compiled kernel's; only the copies differ. `tests/test_kernels.py` also lowers every kernel for CUDA on the CPU,
which checks the layouts and the pipelines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
IndexMap = Callable[[Any, Any], tuple[Any, ...]]

BLOCK_ROWS = 64  # the WGMMA layout's row tile: a warpgroup's 4 warps own 16 rows each


@dataclasses.dataclass(frozen=True)
class Block:
    """A block of an operand or a result: its shape and its index (in blocks) for (program, step)."""

    shape: tuple[int, ...]
    index: IndexMap


def load(ref, columns: Any = None, interpret: bool = False) -> Array:
    """A (rows, columns) block in shared memory as float32 registers in the WGMMA layout, where a row or a
    column sum is a supported reduction and broadcasting a row statistic back is free."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    view = ref if columns is None else ref.at[:, columns]
    if interpret:
        return view[...].astype(jnp.float32)
    return plgpu.load(view, (), layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)


def row_zeros(rows: int, interpret: bool) -> Array:
    """A float32 zero per row, in the layout of a WGMMA array's row sums (a pipeline carry)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    zeros = jnp.zeros((rows,), jnp.float32)
    return zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA.reduce(1))


def broadcast_rows(row_values: Array, shape: tuple[int, int]) -> Array:
    return jax.lax.broadcast_in_dim(row_values, shape, [0])


def pipeline(step: Callable[..., Any], steps: int, program: Any, inputs: Sequence[tuple[Any, Block]],
             outputs: Sequence[tuple[Any, Block]], interpret: bool, init_carry: Any = None,
             concurrency: int = 2) -> Any:
    """`step(indices, *input blocks, *output blocks[, carry])` over `steps` steps of one program, with
    `concurrency` steps' blocks in shared memory at once; returns the final carry when `init_carry` is given."""
    if not interpret:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        def specs(pairs):
            return [pl.BlockSpec(b.shape, lambda s, b=b: b.index(program, s)) for _, b in pairs]

        return plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs(inputs), out_specs=specs(outputs),
                                   max_concurrent_steps=min(concurrency, steps), init_carry=init_carry)(
            *(ref for ref, _ in inputs), *(ref for ref, _ in outputs))
    carry = init_carry
    for s in range(steps):
        views = [ref.at[tuple(pl.ds(i * n, n) for i, n in zip(b.index(program, s), b.shape, strict=True))]
                 for ref, b in (*inputs, *outputs)]
        if init_carry is None:
            step((s,), *views)
        else:
            carry = step((s,), *views, carry)
    return carry


def launch(body: Callable[..., None], operands: Sequence[Array], out_type: Sequence[jax.ShapeDtypeStruct],
           programs: int, interpret: bool) -> list[Array]:
    """`body(program, *operand refs, *result refs)` as one Mosaic GPU kernel of `programs` programs."""
    if not interpret:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        def kernel(*refs) -> None:
            body(jax.lax.axis_index("programs"), *refs)

        return plgpu.kernel(kernel, out_type=list(out_type), grid=(programs,), grid_names=("programs",))(*operands)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(lambda *refs: body(pl.program_id(0), *refs), grid=(programs,),
                          in_specs=[anywhere] * len(operands), out_specs=[anywhere] * len(out_type),
                          out_shape=list(out_type), interpret=True)(*operands)


def staged(views: Sequence[Any], fn: Callable[..., Any], interpret: bool) -> Any:
    """`fn(*copies)` with each of `views` (blocks of operands in GMEM, the same for every step of a program)
    copied once into shared memory, rather than fetched again by every step of a pipeline."""
    if interpret:
        return fn(*views)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scoped(*refs):
        *copies, barriers = refs
        for n, (src, dst) in enumerate(zip(views, copies, strict=True)):
            plgpu.copy_gmem_to_smem(src, dst, barriers.at[n])
        for n in range(len(views)):
            plgpu.barrier_wait(barriers.at[n])
        return fn(*copies)

    return pl.run_scoped(scoped, *(plgpu.SMEM(v.shape, v.dtype) for v in views),
                         plgpu.Barrier(num_barriers=len(views)))
