"""Meshes and sharding rules.

`--mesh DATAxFSDP[xTENSOR]` builds a 3-axis `jax.sharding.Mesh` ("data", "fsdp", "tensor"). Params declare
logical axis names (see model/layers.py); LOGICAL_RULES maps them onto mesh axes. The batch is split over
data*fsdp; params are split over fsdp (ZeRO-3 style) on `embed` and over tensor on heads/mlp/vocab.
A dimension a mesh axis does not divide stays replicated on that axis, so any scale runs on any mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "pos": None,
    "norm": None,
    "layers": None,
}


@dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_parallelism(self) -> int:
        return self.data * self.fsdp

    def __str__(self) -> str:
        return f"{self.data}x{self.fsdp}x{self.tensor}"


def parse_mesh(spec: str | None, n_devices: int | None = None) -> MeshShape:
    """'1x8' -> data=1, fsdp=8; '1x4x2' adds tensor=2. None -> every device on the data axis."""
    n = jax.device_count() if n_devices is None else n_devices
    if not spec:
        return MeshShape(n, 1, 1)
    try:
        dims = [int(p) for p in spec.lower().split("x")]
    except ValueError:
        raise ValueError(f"--mesh must look like DATAxFSDP[xTENSOR] (e.g. 1x8, 2x4, 1x4x2), got {spec!r}") from None
    if len(dims) not in (2, 3) or any(d < 1 for d in dims):
        raise ValueError(f"--mesh must look like DATAxFSDP[xTENSOR] with positive sizes, got {spec!r}")
    shape = MeshShape(dims[0], dims[1], dims[2] if len(dims) == 3 else 1)
    if shape.size != n:
        raise ValueError(f"--mesh {spec} needs {shape.size} devices but {n} are visible ({jax.devices()[0].platform})")
    return shape


def make_mesh(shape: MeshShape, devices: list[Any] | None = None) -> Mesh:
    devices = list(jax.devices()[: shape.size] if devices is None else devices)
    if len(devices) != shape.size:
        raise ValueError(f"mesh {shape} needs {shape.size} devices, got {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(shape.data, shape.fsdp, shape.tensor)
    return Mesh(grid, MESH_AXES)


def _mesh_axes_for(logical: str | None, mesh: Mesh, dim: int) -> tuple[str, ...] | str | None:
    target = LOGICAL_RULES.get(logical) if logical else None
    if target is None:
        return None
    names = (target,) if isinstance(target, str) else target
    size = int(np.prod([mesh.shape[a] for a in names]))
    if size == 1:
        return None
    if dim % size:
        return None  # not divisible: replicate this dimension rather than fail
    return target


def logical_to_sharding(logical_spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    names = tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))
    axes = [_mesh_axes_for(n, mesh, d) for n, d in zip(names, shape, strict=True)]
    return NamedSharding(mesh, PartitionSpec(*axes))


def tree_shardings(logical_specs: Any, abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree given its logical PartitionSpecs and shapes."""
    return jax.tree_util.tree_map(
        lambda spec, leaf: logical_to_sharding(spec, leaf.shape, mesh),
        logical_specs,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Split the batch dimension over data*fsdp; other dims replicated."""
    axes: list[Any] = [None] * ndim
    axes[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*axes))


def active_batch_axes() -> tuple[str, ...]:
    """The batch mesh axes of more than one device, when traced under a mesh (`traced_under`); else ()."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def per_shard_rows(rows: int) -> int:
    """How many of `rows` batch rows each device holds under the traced mesh (`per_batch_shard` hands a kernel
    only its own shard, so a kernel's shape checks must use this count)."""
    axes = active_batch_axes()
    if not axes:
        return rows
    mesh = jax.sharding.get_abstract_mesh()
    return rows // math.prod(mesh.shape[a] for a in axes)


def shard_activation_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (batch) dim to the batch axes, leaving its other dims to the partitioner.

    Without this an FSDP mesh (params split on `embed` over `fsdp`) lets XLA keep the weights still and move
    the activations instead: the compiled h100-100m step all-gathered and all-reduced whole-batch activations
    (logits included) rather than gathering each layer's params. A no-op outside a multi-device mesh.
    """
    axes = active_batch_axes()
    if not axes:
        return x
    spec = PartitionSpec(axes, *([PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def per_batch_shard(fn: Callable[..., tuple[jax.Array, ...]], batched_args: tuple[bool, ...],
                    batched_outs: tuple[bool, ...]) -> Callable[..., tuple[jax.Array, ...]]:
    """`fn` run on each device's batch shard under a multi-device mesh (`jax.shard_map`), for code with no
    partitioning rule such as a Pallas call. Arguments and outputs flagged batched are split on dim 0 over the
    batch axes; the others are replicated, and each unbatched output (a per-shard partial sum) is summed
    over the shards. Outside a multi-device mesh, `fn` itself."""
    axes = active_batch_axes()
    if not axes:
        return fn

    def on_shard(*args: jax.Array) -> tuple[jax.Array, ...]:
        outs = fn(*args)
        return tuple(o if batched else jax.lax.psum(o, axes) for o, batched in zip(outs, batched_outs, strict=True))

    def spec(batched: bool) -> PartitionSpec:
        return PartitionSpec(axes) if batched else PartitionSpec()

    return jax.shard_map(on_shard, in_specs=tuple(map(spec, batched_args)), out_specs=tuple(map(spec, batched_outs)),
                         check_vma=False)


def gather_whole(x: jax.Array) -> jax.Array:
    """Replicate `x` (e.g. the embedding table before a lookup) under a multi-device mesh: gathering the
    (bf16) table once beats resharding every looked-up row between the embed and batch axes."""
    if not active_batch_axes():
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def traced_under(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` traced with `mesh` as the abstract mesh in context, for model code that must see it: the Pallas
    kernels (model/norm_rope_kernel.py) have no partitioning rule and run per batch shard via shard_map."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def check_batch_fits(global_batch: int, shape: MeshShape) -> int:
    """The rows each device gets of a global batch, which must split evenly over data*fsdp."""
    if global_batch % shape.batch_parallelism:
        raise ValueError(
            f"batch size {global_batch} must be divisible by data*fsdp = {shape.batch_parallelism} (mesh {shape})"
        )
    return global_batch // shape.batch_parallelism
