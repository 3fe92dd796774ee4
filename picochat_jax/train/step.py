"""The pure train step and its sharded, jitted form.

`train_step(state, batch) -> (state, metrics)` is one `jax.jit` with explicit in/out shardings and the state
donated. A batch holds (grad_accum, batch, seq) arrays; micro-batches run under `lax.scan` and the loss is
normalised by the token count of the *whole* accumulated batch, so accumulation is exactly a bigger batch.
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
from picochat_jax.model.transformer import Decoder, _dummy_tokens

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    rng: Array  # raw uint32 key data, so it checkpoints like any array


def token_losses(model: Decoder, params: Any, batch: Batch, ce_chunk_tokens: int = 0) -> Array:
    """Per-token cross-entropy in float32, shape (B, T).

    With `ce_chunk_tokens` > 0 the (B, T, V) float32 logits never exist at once: see `chunked_token_losses`.
    """
    hidden = model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                         return_hidden=True)
    if ce_chunk_tokens > 0:
        return chunked_token_losses(model, params, hidden, batch["targets"], ce_chunk_tokens)
    return model.apply({"params": params}, hidden, batch["targets"], method=Decoder.token_cross_entropy)


def ce_chunk_rows(batch: int, seq: int, chunk_tokens: int) -> int:
    """Rows per cross-entropy chunk: the largest divisor of `batch` with at most `chunk_tokens` tokens."""
    rows = max(1, min(batch, chunk_tokens // max(seq, 1)))
    while batch % rows:
        rows -= 1
    return rows


def chunked_token_losses(model: Decoder, params: Any, hidden: Array, targets: Array, chunk_tokens: int) -> Array:
    """Cross-entropy from the final hidden state, a few rows at a time, logits recomputed in the backward.

    Only one chunk's (rows, T, V) float32 logits is live in the forward and in the backward, instead of the
    whole batch's (1 GB at 64x512x8192; 4 GB at 16x2048x32768): the price is one extra vocab matmul.
    """
    B, T, D = hidden.shape
    rows = ce_chunk_rows(B, T, chunk_tokens)
    n = B // rows

    @jax.checkpoint
    def chunk_ce(h: Array, y: Array) -> Array:
        return model.apply({"params": params}, h, y, method=Decoder.token_cross_entropy)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, Array]:
        return carry, chunk_ce(*xs)

    _, ce = jax.lax.scan(body, None, (hidden.reshape(n, rows, T, D), targets.reshape(n, rows, T)))
    return ce.reshape(B, T)


def loss_sums(model: Decoder, params: Any, batch: Batch, token_bytes: Array,
              ce_chunk_tokens: int = 0) -> tuple[Array, Array, Array]:
    """(sum of masked CE, masked tokens, masked target bytes) for one micro-batch."""
    mask = batch["loss_mask"]
    ce = token_losses(model, params, batch, ce_chunk_tokens)
    return jnp.sum(ce * mask), jnp.sum(mask), jnp.sum(token_bytes[batch["targets"]] * mask)


def make_step_fn(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                 token_bytes: np.ndarray, ce_chunk_tokens: int = 0,
                 ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def micro(carry, mb):
            grads_acc, ce_acc, bytes_acc = carry

            def objective(p):
                ce_sum, _, nbytes = loss_sums(model, p, mb, token_bytes, ce_chunk_tokens)
                return ce_sum / total_tokens, (ce_sum, nbytes)

            grads, (ce_sum, nbytes) = jax.grad(objective, has_aux=True)(state.params)
            grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
            return (grads_acc, ce_acc + ce_sum, bytes_acc + nbytes), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        if jax.tree_util.tree_leaves(batch)[0].shape[0] == 1:
            # No accumulation: skip the zero-filled gradient buffers and the adds (a full pass over the
            # float32 gradients each), which XLA keeps even for a one-trip scan.
            (grads, ce_sum, nbytes), _ = micro((zeros, 0.0, 0.0), jax.tree_util.tree_map(lambda x: x[0], batch))
        else:
            (grads, ce_sum, nbytes), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce_sum / total_tokens,
            "bpb": ce_sum / (math.log(2) * jnp.maximum(nbytes, 1.0)),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": total_tokens,
        }
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step_fn


def make_eval_fn(model: Decoder, token_bytes: np.ndarray,
                 ce_chunk_tokens: int = 0) -> Callable[[Any, Batch], tuple[Array, Array, Array]]:
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def eval_fn(params: Any, batch: Batch) -> tuple[Array, Array, Array]:
        def micro(carry, mb):
            sums = loss_sums(model, params, mb, token_bytes, ce_chunk_tokens)
            return tuple(c + s for c, s in zip(carry, sums, strict=True)), None

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
        """Global host batch -> sharded device arrays. Every process computes the same global batch (a pure
        function of seed and step) and materialises only its addressable shards, so this is also correct
        on multi-host meshes (one process per host after `jax.distributed.initialize`)."""
        out = {}
        for k, v in batch.items():
            sharding = parallel.batch_sharding(self.mesh, v.ndim, batch_dim=1)
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
        return out

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for orbax."""
        shapes = jax.eval_shape(self.init, jnp.zeros((2,), jnp.uint32))
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )


def build_trainer(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  token_bytes: np.ndarray, mesh: Mesh, *, ce_chunk_tokens: int = 0) -> ShardedTrainer:
    """Compile init/step/eval for `mesh`. `ce_chunk_tokens` > 0 computes the loss in chunks of about that
    many tokens (see `chunked_token_losses`): the same numbers, less memory."""
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
    compiled_step = jax.jit(parallel.traced_under(mesh, make_step_fn(model, optimizer, schedule, token_bytes,
                                                                     ce_chunk_tokens)),
                            in_shardings=(state_shardings, batch_in),
                            out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    compiled_eval = jax.jit(parallel.traced_under(mesh, make_eval_fn(model, token_bytes, ce_chunk_tokens)),
                            in_shardings=(state_shardings.params, batch_in), out_shardings=replicated)

    return ShardedTrainer(mesh, state_shardings, init, compiled_step, compiled_eval)


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
