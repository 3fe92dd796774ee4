"""LoRA adapters for the scanned decoder, as a plain pytree next to the frozen base params.

Every block kernel has a leading layer axis (L, in, out), so one adapter per target projection covers all
layers: A (L, in, r), B (L, r, out). The effective kernel is W + (alpha / r) * A @ B, formed layer by
layer inside the jitted loss (`attach`, `resolve_kernel`); gradients reach only the adapters, so the
optimizer state holds only adapter moments and the base weights stay frozen (stored in bf16, or NF4 for
QLoRA: model/quant.py). `merge_host` produces the same kernels on the host for export. The train step that
uses them is train/step.py's (`LoraParams`, `build_trainer(..., lora_cfg=...)`).

Adapter dropout would act on each projection's *input activations*, which the merged-kernel form never
sees, so dropout > 0 is rejected rather than silently ignored.

    lcfg = LoraConfig(rank=16, alpha=32, targets=parse_targets("q_proj,v_proj"))
    adapters = init_adapters(base, lcfg, jax.random.key(0))
    logits = model.apply({"params": attach(base, adapters, lcfg)}, tokens)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax.model import quant
from picochat_jax.model.ops import AdaptedKernel, FrozenKernel

Array = jax.Array
Adapters = dict[str, dict[str, Array]]

# Our projection names are HF's; the short forms are accepted too.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'q_proj,v,down_proj' -> ('q_proj', 'v_proj', 'down_proj'); unknown names raise listing the valid ones."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in filter(None, names):
        full = name if name.endswith("_proj") else f"{name}_proj"
        if full not in TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; choose from {', '.join(TARGETS)} "
                             "(or q, k, v, o, gate, up, down)")
        if full not in out:
            out.append(full)
    if not out:
        raise ValueError("--lora-targets names no projection")
    return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.dropout != 0.0:
            raise ValueError(f"--lora-dropout {self.dropout}: LoRA dropout is not supported (adapters are merged "
                             "into the kernels inside the loss, so there are no adapter-path activations to drop); "
                             "use --lora-dropout 0")
        parse_targets(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def kernel_path(target: str) -> tuple[str, ...]:
    return ("layers", _MODULE[target], target, "kernel")


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    """The leaf or subtree of nested dicts at `path`, or None where the path does not exist."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def present_targets(params: Any, cfg: LoraConfig) -> tuple[str, ...]:
    """The configured targets this model has (non-gated MLPs have no gate_proj); none at all is an error."""
    found = tuple(t for t in cfg.targets if get_path(params, kernel_path(t)) is not None)
    if not found:
        raise ValueError(f"none of the LoRA targets {', '.join(cfg.targets)} exist in this model")
    return found


def init_adapters(params: Any, cfg: LoraConfig, rng: Array) -> Adapters:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0: the adapted model starts
    exactly equal to the base. Only the kernels' shapes are read."""
    shapes = tuple((t, tuple(get_path(params, kernel_path(t)).shape)) for t in present_targets(params, cfg))
    return _fresh_adapters(shapes, cfg.rank, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fresh_adapters(shapes: tuple[tuple[str, tuple[int, ...]], ...], rank: int, rng: Array) -> Adapters:
    adapters: Adapters = {}
    for i, (target, (L, d_in, d_out)) in enumerate(shapes):
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (L, d_in, rank), jnp.float32, -bound, bound)
        adapters[target] = {"a": a, "b": jnp.zeros((L, rank, d_out), jnp.float32)}
    return adapters


def set_path(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of nested dicts `tree` with the leaf at `path` replaced; untouched branches are shared."""
    if not path:
        return value
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def attach(params: Any, adapters: Adapters, cfg: LoraConfig) -> Any:
    """Base params with every adapted kernel replaced by {"base": W, "a": A, "b": B, "scale": (L,)}: the
    decoder's scan hands each layer its slice and `resolve_kernel` forms W + (alpha/r) A B there, so the
    merged kernels of all layers never exist at once (and a quantised W is expanded one layer at a time)."""
    out = params
    for target, adapter in adapters.items():
        path = kernel_path(target)
        layers = adapter["a"].shape[0]
        out = set_path(out, path, {"base": get_path(params, path), "a": adapter["a"], "b": adapter["b"],
                                   "scale": jnp.full((layers,), cfg.scale, jnp.float32)})
    return out


def resolve_kernel(value: Any, shape: tuple[int, int]) -> Array | AdaptedKernel:
    """One layer's (in, out) kernel from what a projection is handed: an array, an NF4 dict
    (model/quant.py) or an `attach`ed adapter over either. Adapters and NF4 kernels become an
    `ops.AdaptedKernel` over the kernel as stored (an NF4 kernel alone: rank 0, it is frozen): the matmul
    trains A and B through the rank-r path and dequantizes in its forward and backward, see `ops.lora_matmul`."""
    if isinstance(value, dict) and "base" in value:
        return AdaptedKernel(FrozenKernel.of(value["base"], shape), value["a"],
                             value["scale"] * value["b"].astype(jnp.float32))
    if quant.is_quantized(value):
        return AdaptedKernel.frozen_only(FrozenKernel.of(value, shape))
    return value


def merge_host(params: Any, adapters: Adapters, cfg: LoraConfig) -> Any:
    """Base params with every adapted kernel replaced by W + (alpha/r) A B, on host numpy arrays (export): no
    device memory, float32; what `attach` computes layer by layer inside the step."""
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    adapters = jax.device_get(adapters)
    for target, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        layers = params["layers"][_MODULE[target]][target]
        params["layers"][_MODULE[target]][target] = {**layers, "kernel": layers["kernel"] + cfg.scale * (a @ b)}
    return params


def count_adapter_params(adapters: Adapters) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(adapters)))
