"""The pure train step and its sharded, jitted form.

`train_step(state, batch) -> (state, metrics)` is one `jax.jit` with explicit in/out shardings and the state
donated. A batch holds (grad_accum, batch, seq) arrays; micro-batches run under `lax.scan` and the loss is
normalised by the token count of the *whole* accumulated batch, so accumulation is exactly a bigger batch.
"""

from __future__ import annotations

import math
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
from picochat_jax.model.transformer import Decoder, _dummy_tokens

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    rng: Array  # raw uint32 key data, so it checkpoints like any array


def token_losses(model: Decoder, params: Any, batch: Batch) -> Array:
    """Per-token cross-entropy in float32, shape (B, T)."""
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])


def loss_sums(model: Decoder, params: Any, batch: Batch, token_bytes: Array) -> tuple[Array, Array, Array]:
    """(sum of masked CE, masked tokens, masked target bytes) for one micro-batch."""
    mask = batch["loss_mask"]
    ce = token_losses(model, params, batch)
    return jnp.sum(ce * mask), jnp.sum(mask), jnp.sum(token_bytes[batch["targets"]] * mask)


def make_step_fn(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 token_bytes: np.ndarray) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def micro(carry, mb):
            grads_acc, ce_acc, bytes_acc = carry

            def objective(p):
                ce_sum, _, nbytes = loss_sums(model, p, mb, token_bytes)
                return ce_sum / total_tokens, (ce_sum, nbytes)

            grads, (ce_sum, nbytes) = jax.grad(objective, has_aux=True)(state.params)
            grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
            return (grads_acc, ce_acc + ce_sum, bytes_acc + nbytes), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, ce_sum, nbytes), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce_sum / total_tokens,
            "bpb": ce_sum / (math.log(2) * jnp.maximum(nbytes, 1.0)),
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "tokens": total_tokens,
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step_fn


def make_eval_fn(model: Decoder, token_bytes: np.ndarray) -> Callable[[Any, Batch], tuple[Array, Array, Array]]:
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def eval_fn(params: Any, batch: Batch) -> tuple[Array, Array, Array]:
        def micro(carry, mb):
            sums = loss_sums(model, params, mb, token_bytes)
            return tuple(c + s for c, s in zip(carry, sums)), None

        sums, _ = jax.lax.scan(micro, (0.0, 0.0, 0.0), batch)
        return sums

    return eval_fn


@dataclass
class ShardedTrainer:
    """Everything compiled for one (model, optimizer, mesh): init, step and eval, with their shardings."""

    mesh: Mesh
    state_shardings: TrainState
    init: Callable[[Array, Any], TrainState]
    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]
    evaluate: Callable[[Any, Batch], tuple[Array, Array, Array]]

    def put_batch(self, batch: dict[str, np.ndarray]) -> Batch:
        return {k: jax.device_put(v, parallel.batch_sharding(self.mesh, v.ndim, batch_dim=1)) for k, v in batch.items()}

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for orbax."""
        shapes = jax.eval_shape(self.init, jnp.zeros((2,), jnp.uint32))
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )


def build_trainer(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  token_bytes: np.ndarray, mesh: Mesh) -> ShardedTrainer:
    # Shardings come from the logical axis names on the *boxed* params: optax's state mirrors the params
    # tree, boxes included, so one get_partition_spec call covers params and optimizer moments.
    def boxed_state(rng_data):
        boxed = model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model.cfg))["params"]
        return TrainState(jnp.zeros((), jnp.int32), boxed, optimizer.init(boxed), rng_data)

    abstract_boxed = jax.eval_shape(boxed_state, jnp.zeros((2,), jnp.uint32))
    logical_specs = nn.get_partition_spec(abstract_boxed)
    abstract_plain = nn.meta.unbox(abstract_boxed)
    state_shardings = parallel.tree_shardings(logical_specs, abstract_plain, mesh)
    replicated = parallel.replicated(mesh)

    def fresh_state(rng_data: Array) -> TrainState:
        params = nn.meta.unbox(model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model.cfg))["params"])
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng_data)

    def state_from_params(rng_data: Array, params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng_data)

    # Fresh params are born sharded; given params (SFT from a base checkpoint) are resharded on the way in.
    jit_fresh = jax.jit(fresh_state, in_shardings=replicated, out_shardings=state_shardings)
    jit_from_params = jax.jit(state_from_params, in_shardings=(replicated, state_shardings.params),
                              out_shardings=state_shardings)

    def init(rng_data: Array, params: Any | None = None) -> TrainState:
        return jit_fresh(rng_data) if params is None else jit_from_params(rng_data, params)

    # Every batch leaf is (grad_accum, batch, seq): one sharding, used as a pytree prefix for the batch dict.
    batch_in = parallel.batch_sharding(mesh, 3, batch_dim=1)
    compiled_step = jax.jit(make_step_fn(model, optimizer, schedule, token_bytes),
                            in_shardings=(state_shardings, batch_in),
                            out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    compiled_eval = jax.jit(make_eval_fn(model, token_bytes), in_shardings=(state_shardings.params, batch_in),
                            out_shardings=replicated)

    def step(state: TrainState, batch: Batch):
        with mesh:
            return compiled_step(state, batch)

    def evaluate(params: Any, batch: Batch):
        with mesh:
            return compiled_eval(params, batch)

    return ShardedTrainer(mesh, state_shardings, init, step, evaluate)
