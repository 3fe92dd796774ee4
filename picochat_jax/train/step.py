"""The one train step, for every kind of training, and its sharded, jitted form.

A step is an objective (the loss: causal LM here, DPO in train/dpo.py) plus a trainable-params filter (every
param, or LoRA adapters over a frozen base) plus one gradient-accumulation scan. `build_trainer` compiles it
for a mesh: one `jax.jit` with explicit in/out shardings and the state donated, one batch placement
(`put_batch`), one init. Base pretraining, SFT, DPO, native LoRA and hf-sft (full and LoRA) all build it;
train/loop.py is the one driver around it. A batch holds (grad_accum, batch, ...) arrays; the loss is
normalised by the denominator of the *whole* accumulated batch, so accumulation is exactly a bigger batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from picochat_jax import parallel
from picochat_jax.model import lora, quant
from picochat_jax.model.loss import loss_sums
from picochat_jax.model.transformer import Decoder, dummy_tokens, logical_axes

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    rng: Array  # raw uint32 key data, so it checkpoints like any array


# --------------------------------------------------------------------------------------------- objectives
# An objective is the loss a step minimises: `denominator(batch)` over the whole accumulated batch, and
# `sums(params, micro_batch) -> (numerator, metric sums)`. The step divides by the denominator *inside* the
# gradient, so accumulation is exactly a bigger batch; `metrics(sums, denominator)` turns summed metrics
# into the logged ones. Base pretraining and SFT use CausalLM; DPO plugs in its own (train/dpo.py).


@dataclass(frozen=True)
class CausalLM:
    """Masked next-token cross-entropy (bits per byte reported too)."""

    model: Decoder
    token_bytes: Any  # float32 (vocab,): UTF-8 bytes per token, the denominator of bits per byte
    ce_chunk_tokens: int = 0

    def denominator(self, batch: Batch) -> Array:
        return jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def sums(self, params: Any, mb: Batch) -> tuple[Array, dict[str, Array]]:
        ce, tokens, nbytes = loss_sums(self.model, params, mb, jnp.asarray(self.token_bytes, jnp.float32),
                                       self.ce_chunk_tokens)
        return ce, {"ce": ce, "tokens": tokens, "bytes": nbytes}

    def metrics(self, sums: dict[str, Array], denominator: Array) -> dict[str, Array]:
        return {"loss": sums["ce"] / denominator, "bpb": sums["ce"] / (math.log(2) * jnp.maximum(sums["bytes"], 1.0)),
                "tokens": denominator}


# --------------------------------------------------------------------------------------------- trainables
# What the optimizer updates: every param, or LoRA adapters next to a frozen base. `params_of(trainable,
# frozen)` is what the model applies; only `trainable` is differentiated and has optimizer state.


@dataclass(frozen=True)
class FullParams:
    def params_of(self, trainable: Any, frozen: Any) -> Any:
        return trainable


@dataclass(frozen=True)
class LoraParams:
    """Adapters A, B per target projection; the effective kernels W + (alpha/r) A B are formed layer by layer
    inside the loss (`lora.attach`)."""

    cfg: lora.LoraConfig

    def params_of(self, trainable: Any, frozen: Any) -> Any:
        return lora.attach(frozen, trainable, self.cfg)


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def make_step_fn(objective: Any, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 trainable: Any = FullParams()) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The one train step: `step(state, frozen, batch) -> (state, metrics)`. Batch leaves are
    (grad_accum, batch, ...); micro-batches run under `lax.scan`."""

    def step_fn(state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        denominator = objective.denominator(batch)

        def grads_and_sums(mb: Batch) -> tuple[Any, dict[str, Array]]:
            def loss(params: Any) -> tuple[Array, dict[str, Array]]:
                numerator, sums = objective.sums(trainable.params_of(params, frozen), mb)
                return numerator / denominator, sums

            return jax.grad(loss, has_aux=True)(state.params)

        if jax.tree_util.tree_leaves(batch)[0].shape[0] == 1:
            # No accumulation: no zero-filled gradient buffers and adds (a full pass over the float32
            # gradients each), which XLA keeps even for a one-trip scan.
            grads, sums = grads_and_sums(jax.tree_util.tree_map(lambda x: x[0], batch))
        else:
            def micro(carry: tuple, mb: Batch) -> tuple[tuple, None]:
                g, s = grads_and_sums(mb)
                return (_tree_add(carry[0], g), _tree_add(carry[1], s)), None

            first = jax.tree_util.tree_map(lambda x: x[0], batch)
            sum_shapes = jax.eval_shape(lambda: grads_and_sums(first)[1])
            zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
                     jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes))
            (grads, sums), _ = jax.lax.scan(micro, zeros, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**objective.metrics(sums, denominator), "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step_fn


def make_eval_fn(objective: Any, trainable: Any = FullParams()) -> Callable[[Any, Any, Batch], dict[str, Array]]:
    """`evaluate(trainable_params, frozen, batch) -> metric sums` over (n, batch, ...) micro-batches."""

    def eval_fn(params: Any, frozen: Any, batch: Batch) -> dict[str, Array]:
        full = trainable.params_of(params, frozen)
        first = jax.tree_util.tree_map(lambda x: x[0], batch)
        sum_shapes = jax.eval_shape(lambda: objective.sums(full, first)[1])
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes)
        sums, _ = jax.lax.scan(lambda c, mb: (_tree_add(c, objective.sums(full, mb)[1]), None), zeros, batch)
        return sums

    return eval_fn


@dataclass
class ShardedTrainer:
    """Everything compiled for one (objective, trainable filter, optimizer, mesh): init, step and eval with
    their shardings, the one batch placement, and the host view of the full params."""

    mesh: Mesh
    state_shardings: TrainState
    init: Callable[..., TrainState]
    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]
    evaluate: Callable[[Any, Batch], dict[str, Array]]
    full_params: Callable[[Any], Any]  # trainable params -> host params of the whole model (merged for LoRA)

    def put_batch(self, batch: dict[str, np.ndarray], batch_dim: int = 1) -> Batch:
        """Global host batch -> sharded device arrays. Every process computes the same global batch (a pure
        function of seed and step) and materialises only its addressable shards, so this is also correct
        on multi-host meshes (one process per host after `jax.distributed.initialize`)."""
        out = {}
        for k, v in batch.items():
            sharding = parallel.batch_sharding(self.mesh, v.ndim, batch_dim=batch_dim)
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    def evaluate_batches(self, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The objective's metric sums over host batches (e.g. `data.loader.eval_batches`), as floats."""
        totals: dict[str, float] = {}
        for batch in batches:
            for k, v in jax.device_get(self.evaluate(params, self.put_batch(batch))).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return totals

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for orbax."""
        shapes = jax.eval_shape(self.init, jnp.zeros((2,), jnp.uint32))
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )


def _batch_shardings(mesh: Mesh, batch: Batch) -> Any:
    return {k: parallel.batch_sharding(mesh, v.ndim, batch_dim=1) for k, v in batch.items()}


def build_trainer(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  token_bytes: np.ndarray | None, mesh: Mesh, *, ce_chunk_tokens: int = 0, objective: Any = None,
                  lora_cfg: lora.LoraConfig | None = None, base_params: Any = None,
                  base_dtype: Any = jnp.float32, base_quantize: str = "none") -> ShardedTrainer:
    """Compile init/step/eval for `mesh`.

    `objective` defaults to CausalLM (with `ce_chunk_tokens` > 0 the loss runs in chunks of about that many
    tokens, see `model.loss.chunked_token_losses`: the same numbers, less memory). With `lora_cfg`, the trainable params
    are adapters over `base_params` (frozen, stored in `base_dtype` or, with `base_quantize="4bit"`, as NF4:
model/quant.py; sharded by their logical axes); otherwise
    every param trains, with shardings from the logical axis names and `init(rng, params)` resharding given
    params (SFT from a base checkpoint) on the way in.
    """
    objective = objective or CausalLM(model, np.asarray(token_bytes, np.float32), ce_chunk_tokens)
    replicated = parallel.replicated(mesh)
    if lora_cfg is None:
        trainable: Any = FullParams()
        frozen = None
        frozen_shardings: Any = replicated  # a prefix for the empty pytree

        # Shardings come from the logical axis names on the *boxed* params: optax's state mirrors the params
        # tree, boxes included, so one get_partition_spec call covers params and optimizer moments.
        def boxed_state(rng_data: Array) -> TrainState:
            boxed = model.init(jax.random.wrap_key_data(rng_data), dummy_tokens(model.cfg))["params"]
            return TrainState(jnp.zeros((), jnp.int32), boxed, optimizer.init(boxed), rng_data)

        abstract_boxed = jax.eval_shape(boxed_state, jnp.zeros((2,), jnp.uint32))
        state_shardings = parallel.tree_shardings(nn.get_partition_spec(abstract_boxed),
                                                  nn.meta.unbox(abstract_boxed), mesh)

        def fresh_state(rng_data: Array) -> TrainState:
            params = nn.meta.unbox(model.init(jax.random.wrap_key_data(rng_data), dummy_tokens(model.cfg))["params"])
            return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng_data)

        def state_from_params(rng_data: Array, params: Any) -> TrainState:
            return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng_data)

        # Fresh params are born sharded; given params are resharded on the way in.
        jit_fresh = jax.jit(fresh_state, in_shardings=replicated, out_shardings=state_shardings)
        jit_from_params = jax.jit(state_from_params, in_shardings=(replicated, state_shardings.params),
                                  out_shardings=state_shardings)

        def init(rng_data: Array, params: Any | None = None) -> TrainState:
            return jit_fresh(rng_data) if params is None else jit_from_params(rng_data, params)

        full_params: Callable[[Any], Any] = jax.device_get
    else:
        if base_params is None:
            raise ValueError("LoRA training needs the frozen base params")
        trainable = LoraParams(lora_cfg)
        # The frozen base is only read, so bf16 runs keep it in bf16: half the memory, no master copy needed.
        host_base = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(base_dtype), base_params)
        frozen_shardings = parallel.tree_shardings(logical_axes(model), host_base, mesh)
        if base_quantize == "4bit":
            # QLoRA: every block projection stored as NF4 (quantised from the float32 weights, on the host),
            # expanded one layer at a time inside the step. Quantised kernels are replicated over the mesh.
            host_base = quant.quantize_tree(host_base, [lora.kernel_path(t) for t in lora.TARGETS],
                                            source=base_params)
            frozen_shardings = _quantized_shardings(frozen_shardings, host_base, replicated)
        elif base_quantize != "none":
            raise ValueError(f"--quantize must be one of {', '.join(quant.QUANTIZE_CHOICES)}, got {base_quantize!r}")
        frozen = jax.device_put(host_base, frozen_shardings)

        def lora_state(rng_data: Array) -> TrainState:
            adapters = lora.init_adapters(base_params, lora_cfg, jax.random.wrap_key_data(rng_data))
            return TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters), rng_data)

        # Adapters are small: every device holds them (and their optimizer moments) whole.
        abstract = jax.eval_shape(lora_state, jnp.zeros((2,), jnp.uint32))
        state_shardings = jax.tree_util.tree_map(lambda _: replicated, abstract)

        def init(rng_data: Array, params: Any | None = None) -> TrainState:
            if params is not None:
                raise ValueError("LoRA adapters start fresh; the base params were given to build_trainer")
            return jax.device_put(lora_state(rng_data), state_shardings)

        def full_params(adapters: Any) -> Any:
            # QLoRA merges into the dequantised base: the model exactly as trained and evaluated. Built on the
            # host when an export asks, so no float copy of the base is held while training.
            base = base_params if base_quantize == "none" else quant.dequantized_over(host_base, base_params)
            return lora.merge_host(base, adapters, lora_cfg)

    step_fn = parallel.traced_under(mesh, make_step_fn(objective, optimizer, schedule, trainable))
    eval_fn = parallel.traced_under(mesh, make_eval_fn(objective, trainable))
    compiled: dict[tuple, Any] = {}

    def jitted(kind: str, batch: Batch) -> Any:
        """One program per batch layout (key set and ranks), with every batch leaf split over data*fsdp."""
        key = (kind, tuple(sorted((k, v.ndim) for k, v in batch.items())))
        if key not in compiled:
            batch_in = _batch_shardings(mesh, batch)
            if kind == "step":
                compiled[key] = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, batch_in),
                                        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
            else:
                compiled[key] = jax.jit(eval_fn, in_shardings=(state_shardings.params, frozen_shardings, batch_in),
                                        out_shardings=replicated)
        return compiled[key]

    def evaluate(params: Any, batch: Batch) -> dict[str, Array]:
        return jitted("eval", batch)(params, frozen, batch)

    return ShardedTrainer(mesh, state_shardings, init, _BoundStep(jitted, frozen), evaluate, full_params)


def _quantized_shardings(shardings: Any, tree: Any, replicated: Any) -> Any:
    """`shardings` for a params tree in which some kernels became NF4 dicts (those are replicated)."""
    if quant.is_quantized(tree):
        return {k: replicated for k in tree}
    if isinstance(tree, dict):
        return {k: _quantized_shardings(shardings[k], v, replicated) for k, v in tree.items()}
    return shardings


@dataclass(frozen=True)
class _BoundStep:
    """`trainer.step(state, batch)` with the frozen params bound; `.lower(state, batch)` shows the program."""

    jitted: Callable[[str, Batch], Any]
    frozen: Any

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        return self.jitted("step", batch)(state, self.frozen, batch)

    def lower(self, state: Any, batch: Batch) -> Any:
        return self.jitted("step", batch).lower(state, self.frozen, batch)


# XLA:GPU flags worth having for training on one or more NVIDIA GPUs. Opt-in (XLA reads XLA_FLAGS once, when
# the backend starts, and a flag can be unknown to another jaxlib), so nothing sets them at import.
GPU_XLA_FLAGS: tuple[str, ...] = (
    # Schedules independent work (collectives, copies) to overlap compute; a no-op cost on one GPU.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
)


def apply_gpu_xla_flags(flags: tuple[str, ...] = GPU_XLA_FLAGS, env: dict[str, str] | None = None) -> str:
    """Append `flags` to XLA_FLAGS in `env` (default os.environ) unless already named there; returns the value.

    Call before the first JAX computation: flags set after the backend started are silently ignored.
    """
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in current.split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in present]
    env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env["XLA_FLAGS"]
