"""The picochat decoder: a pure-functional Flax module whose params are a plain pytree.

Layers are stacked with `nn.scan` (one compiled block, a leading `layers` axis on every block param), which
keeps compile time flat in depth and gives the HF bridge one tensor per weight kind. A decoding engine can run
the same blocks as a Python loop instead (`layer_loop`: params `layers_0`, `layers_1`, ... from
`unstack_layers`, one cache array per layer), so no decode step slices a stacked cache or weight.

    model = Decoder(cfg)
    params = init_params(model, jax.random.key(0))
    logits = model.apply({"params": params}, tokens)                       # training / scoring
    logits, cache = model.apply({"params": params}, tokens, cache=cache,     # KV-cache decoding
                                cache_index=i, kv_valid=valid)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_policies

from picochat_jax.config import ModelConfig
from picochat_jax.model.layers import MLP, Attention, Norm, NormScale, Projection, is_decode_step, write_cache
from picochat_jax.model.ops import (
    causal_mask,
    embed_lookup,
    resolve_attention_impl,
    resolve_embed_grad_impl,
    resolve_rms_norm_impl,
    rope_attention_factor,
    rope_inv_freq,
    rope_tables,
)
from picochat_jax.model.rms_norm_kernel import residual_rms_norm
from picochat_jax.parallel import gather_whole, per_shard_rows, shard_activation_batch

Array = jax.Array

def _logits_f32(x: Array, w: Array) -> Array:
    return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _vocab_logits_lowp(x: Array, w: Array) -> Array:
    return _logits_f32(x, w)


def _vocab_logits_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _vocab_logits_lowp(x, w), (x, w)


def _vocab_logits_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    # Autodiff would run both backward matmuls in float32 (the cotangent of float32 logits meets bf16
    # operands and everything is upcast): two (tokens x V x D) matmuls off the tensor cores' bf16 rate.
    # Cast the cotangent down once, as a bf16 layer's backward would, and accumulate in float32.
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("btv,vd->btd", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("btv,btd->vd", g, x, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_vocab_logits_lowp.defvjp(_vocab_logits_fwd, _vocab_logits_bwd)


def vocab_logits(x: Array, w: Array) -> Array:
    """float32 logits (B, T, V) from hidden x (B, T, D) and a (V, D) table, both in the compute dtype."""
    if x.dtype == jnp.float32:
        return _logits_f32(x, w)
    return _vocab_logits_lowp(x, w)


@jax.custom_vjp
def softmax_cross_entropy(x: Array, w: Array, targets: Array) -> Array:
    """Per-token cross-entropy (B, T) in float32 of the logits x @ w.T, x (B, T, D), w (V, D), int targets.

    Same value as optax's softmax_cross_entropy_with_integer_labels over `vocab_logits`; the custom VJP
    turns the float32 logits straight into the compute-dtype logit gradient (softmax - one_hot) * g in one
    pass, where autodiff writes a float32 gradient over the whole (B, T, V) logits and casts it afterwards.
    """
    return _softmax_ce_fwd(x, w, targets)[0]


def _softmax_ce_fwd(x: Array, w: Array, targets: Array) -> tuple[Array, tuple[Array, ...]]:
    logits = _logits_f32(x, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, (x, w, targets, logits, lse)


def _softmax_ce_bwd(res: tuple[Array, ...], g: Array) -> tuple[Array, Array, None]:
    x, w, targets, logits, lse = res
    one_hot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    dlogits = ((jnp.exp(logits - lse[..., None]) - one_hot) * g[..., None]).astype(x.dtype)
    return (*_vocab_logits_bwd((x, w), dlogits), None)


softmax_cross_entropy.defvjp(_softmax_ce_fwd, _softmax_ce_bwd)


REMAT_POLICIES = {
    "full": checkpoint_policies.nothing_saveable,
    # Save matmul outputs, recompute the cheap elementwise work: most of remat's memory win for little time.
    "dots": checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save every matmul output, attention's batched ones too: less recompute than "dots", more memory.
    "dots_all": checkpoint_policies.dots_saveable,
}


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    fuse_projections: bool = True
    norm_rope_impl: str | None = None
    rms_norm_impl: str | None = None
    swiglu_grad_impl: str | None = None

    @nn.compact
    def __call__(self, x, rope, mask, segment_ids, cache_index, local, cache, layer_local):
        cfg = self.cfg
        if layer_local is not None:  # Gemma: this layer's window and RoPE (local) or the full ones
            local_rope, local_mask = local
            mask = jnp.where(layer_local, local_mask, mask)
            if local_rope is not None:
                rope = tuple(jnp.where(layer_local, lo, gl) for lo, gl in zip(local_rope, rope, strict=True))
        fused_norm = resolve_rms_norm_impl(self.rms_norm_impl, cfg.norm, per_shard_rows(x.shape[0]) * x.shape[1],
                                           x.shape[-1])  # the kernel sees one batch shard

        def pre_norm(x: Array, name: str) -> tuple[Array, Array]:
            """(x, norm(x)); the fused form's backward adds x's own cotangent in the same kernel."""
            if fused_norm in ("pallas", "mosaic"):
                return residual_rms_norm(x, NormScale(x.shape[-1], name=name)(), cfg.norm_eps, self.dtype, fused_norm)
            return x, Norm(cfg.norm, cfg.norm_eps, self.dtype, name=name)(x)

        x, h = pre_norm(x, "input_norm")
        attention = Attention(cfg, self.dtype, self.attention_impl, self.fuse_projections, self.norm_rope_impl,
                              name="attn")
        attn_out, new_cache = attention(h, rope, mask, cache, cache_index, segment_ids)
        mlp = MLP(cfg, self.dtype, self.fuse_projections, self.swiglu_grad_impl, name="mlp")
        if cfg.parallel_residual:
            x, h2 = pre_norm(x, "post_attention_norm")
            x = x + attn_out + mlp(h2)
        elif cfg.sandwich_norm:  # Gemma: the attention and MLP outputs are normed before their residual adds
            attn_out = Norm(cfg.norm, cfg.norm_eps, self.dtype, name="attn_out_norm")(attn_out)
            x, h2 = pre_norm(x + attn_out, "post_attention_norm")
            x = x + Norm(cfg.norm, cfg.norm_eps, self.dtype, name="mlp_out_norm")(mlp(h2))
        else:
            x, h2 = pre_norm(x + attn_out, "post_attention_norm")
            x = x + mlp(h2)
        return x, new_cache


class Decoder(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32  # compute dtype; params are always float32 (master weights)
    remat: str = "none"
    attention_impl: str | None = None
    # Layers per scan iteration. Unrolled, XLA keeps each layer's residuals as plain buffers instead of
    # copying them into (n_layers, ...) stacks: see default_scan_unroll and docs/performance.md.
    scan_unroll: int = 1
    # Several projections of one input (q/k/v, gate/up) as one matmul: see ops.project. Off for
    # tensor-parallel meshes, where it would reshuffle kernels sharded on their output axis.
    fuse_projections: bool = True
    # QK-norm + RoPE: None/"auto" = fused Pallas Mosaic GPU kernels on GPU, XLA elsewhere
    # (ops.resolve_norm_rope_impl); "pallas" = the same kernels on Pallas' deprecated Triton backend.
    norm_rope_impl: str | None = None
    # The pre-norms' backward (with the residual gradient): None/"auto" = a Pallas Mosaic GPU kernel on GPU, see
    # ops.resolve_rms_norm_impl and model/rms_norm_mgpu.py; "pallas" = its Triton form (model/rms_norm_kernel.py).
    rms_norm_impl: str | None = None
    # How the token embedding's gradient is summed: None/"auto" = a float32 scatter (ops.resolve_embed_grad_impl).
    embed_grad_impl: str | None = None
    # How the SwiGLU MLP's fused gate/up projection is differentiated: None/"auto" = the Mosaic GPU kernel on GPU
    # (model/swiglu_mgpu.py), XLA's packed gradient elsewhere (ops.resolve_swiglu_grad_impl).
    swiglu_grad_impl: str | None = None
    # The layers as separate modules called in a Python loop (params `layers_i`, see `unstack_layers`; a cache of
    # one array per layer, see `init_cache`) instead of one scanned block. For decoding on GPU: even a fully
    # unrolled scan reads each layer's weights and cache as slices of (n_layers, ...) stacks, which XLA copies
    # out every decode step (0.4 ms of a 3 ms step at the Qwen2.5-0.5B shape on an H200, docs/performance.md).
    layer_loop: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
        )
        if cfg.position == "learned":
            self.embed_positions = self.param(
                "embed_positions",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("pos", "embed")),
                (cfg.max_seq_len, cfg.d_model),
            )
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        block_args = (cfg, self.dtype, self.attention_impl, self.fuse_projections, self.norm_rope_impl,
                      self.rms_norm_impl, self.swiglu_grad_impl)
        if self.layer_loop:
            self.layers = [block(*block_args) for _ in range(cfg.n_layers)]  # named layers_0, layers_1, ...
        else:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
                length=cfg.n_layers,
                unroll=self.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(*block_args, name="layers")
        self.final_norm = Norm(cfg.norm, cfg.norm_eps, self.dtype, name="final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = Projection(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), False, cfg.init_std,
                                      name="lm_head")

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        kv_valid: Array | None = None,
        return_hidden: bool = False,
    ):
        B, T = tokens.shape
        cfg = self.cfg
        offset = 0 if cache_index is None else cache_index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(T, dtype=jnp.int32), (B, T))
        embed_grad = resolve_embed_grad_impl(self.embed_grad_impl)
        table = self.embed_tokens.astype(self.dtype) if embed_grad == "scatter" else self.embed_tokens
        x = shard_activation_batch(embed_lookup(gather_whole(table), tokens, self.dtype, embed_grad))
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
        if cfg.position == "learned":
            pos = jnp.clip(positions, 0, cfg.max_seq_len - 1)
            x = x + jnp.take(self.embed_positions, pos, axis=0).astype(self.dtype)

        rope = local_rope = None
        if cfg.position == "rope":
            scaling = cfg.rope_scaling_dict
            rope = rope_tables(positions, rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, scaling),
                               rope_attention_factor(scaling))
            if cfg.rope_local_theta is not None:
                local_rope = rope_tables(positions, rope_inv_freq(cfg.resolved_head_dim, cfg.rope_local_theta, None))
        local = layer_local = None
        if cfg.sliding_layers is None:
            mask, layer_segments = self._mask(T, offset, cache, kv_valid, segment_ids, cfg.sliding_window,
                                              explicit=cfg.attn_softcap is not None)
        else:  # per-layer windows: both masks explicit, each layer picks its own inside the scan
            mask, layer_segments = self._mask(T, offset, cache, kv_valid, segment_ids, None, explicit=True)
            local = (local_rope, self._mask(T, offset, cache, kv_valid, segment_ids, cfg.sliding_window, True)[0])
            layer_local = jnp.asarray(cfg.sliding_layers, bool)
        if self.layer_loop:
            x, new_cache = self._loop_layers(x, rope, mask, layer_segments, cache_index, local, cache, layer_local)
        else:
            x, new_cache = self.layers(x, rope, mask, layer_segments, cache_index, local, cache, layer_local)
        if is_decode_step(cache, T):  # the layers returned each one's new row: one write for all of them
            new_cache = {n: write_layer_rows(cache[n], new_cache[n], cache_index) for n in cache}
        x = self.final_norm(x)
        if return_hidden:
            return x
        logits = self.logits_from_hidden(x)
        return logits if cache is None else (logits, new_cache)

    def _loop_layers(self, x: Array, rope: Any, mask: Any, segment_ids: Any, cache_index: Any, local: Any,
                     cache: dict[str, Any] | None, layer_local: Array | None) -> tuple[Array, dict[str, Any] | None]:
        """The blocks one after another, each with its own cache arrays: (x, new cache or None), the cache as
        tuples of per-layer arrays in the scan's layout without its layer axis."""
        outputs = []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else {n: cache[n][i] for n in cache}
            x, layer_out = block(x, rope, mask, segment_ids, cache_index, local, layer_cache,
                                 None if layer_local is None else layer_local[i])
            outputs.append(layer_out)
        if cache is None:
            return x, None
        return x, {n: tuple(out[n] for out in outputs) for n in cache}

    def _mask(self, T: int, offset: Any, cache: dict[str, Array] | None, kv_valid: Array | None,
              segment_ids: Array | None, window: int | None, explicit: bool) -> tuple[Array | None, Array | None]:
        """(boolean attention mask or None, segment ids for the fused kernels or None).

        A key is visible while q - k < window (transformers' sliding-window overlay). Without a mask the
        attention is plain causal; fused kernels mask packed documents themselves from the segment ids.
        """
        if cache is not None:
            B, S = cache_batch_and_length(cache)
            # (1, T) for one cache index, (B, T) when every row has its own (continuous batching).
            q_slot = jnp.reshape(jnp.asarray(offset), (-1, 1)) + jnp.arange(T)[None, :]
            kv_slot = jnp.arange(S)[None, None, :]
            # A decode step's own key is not in the cache yet (layers.is_decode_step): its slot is masked.
            allowed = (kv_slot < q_slot[:, :, None]) if is_decode_step(cache, T) else (kv_slot <= q_slot[:, :, None])
            if window is not None:
                # Left padding sits before a row's tokens, so slot distances are position distances.
                allowed &= q_slot[:, :, None] - kv_slot < window
            valid = jnp.ones((B, S), bool) if kv_valid is None else kv_valid
            return allowed[:, None] & valid[:, None, None, :], None
        if segment_ids is None and window is None and not explicit:
            return None, None
        if window is None and not explicit and resolve_attention_impl(self.attention_impl, self.dtype,
                                                                      self.cfg.resolved_head_dim) != "xla":
            return None, segment_ids  # fused kernels mask documents themselves, without a (B, 1, T, T) mask
        return causal_mask(T, segment_ids, window), None

    def vocab_table(self) -> Array:
        """The (V, D) output projection in the compute dtype: the embedding table when tied."""
        if self.cfg.tie_embeddings:
            return self.embed_tokens.astype(self.dtype)
        kernel, _ = self.lm_head()
        return kernel.T.astype(self.dtype)

    def logits_from_hidden(self, x: Array) -> Array:
        logits = vocab_logits(x.astype(self.dtype), self.vocab_table())
        cap = self.cfg.logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def token_cross_entropy(self, x: Array, targets: Array) -> Array:
        """Per-token cross-entropy (B, T) float32 from the final hidden state (`return_hidden=True`)."""
        if self.cfg.logit_softcap is not None:  # the fused form has no soft-cap: plain autodiff over the logits
            logits = self.logits_from_hidden(x)
            target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jax.nn.logsumexp(logits, axis=-1) - target
        return softmax_cross_entropy(x.astype(self.dtype), self.vocab_table(), targets)


def default_scan_unroll(cfg: ModelConfig, platform: str | None = None) -> int:
    """Full unroll on GPU, a rolled scan elsewhere.

    On an H100 the h100-100m train step ran 1.54x faster fully unrolled (67.9 ms vs 104.3 ms, peak memory
    15.8 vs 29.9 GiB): the rolled loop spent ~25 ms a step copying residuals into and out of per-layer
    stacks. The price is compile time (67 s vs 13 s there). CPU/TPU keep the rolled scan: fast compiles
    for tests, and CPU float32 results stay exactly what they were.
    """
    platform = platform or jax.default_backend()
    return cfg.n_layers if platform in ("gpu", "cuda") else 1


# Above this many bytes of kept activations a CPU train step recomputes instead (`resolve_remat`): the size of a
# server CPU's last-level cache (32 MiB on the 2-core machines CI runs on).
CPU_REMAT_ABOVE_BYTES = 32 * 2**20


def activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, precision: str,
                     attention_scores: bool = True) -> float:
    """Activations a train step keeps for the backward pass without remat, all layers, on one device: Korthikanti
    et al. (2022), s*b*d*(34 + 5*heads*s/d) bytes per layer at 2-byte precision, doubled for float32. The
    5*heads*s/d term is the (heads, s, s) score and softmax tensors: a flash kernel (cuDNN, Pallas, splash) never
    materialises them, so `attention_scores=False` drops it."""
    width = 2 if precision == "bf16" else 4
    s, d = seq_len, cfg.d_model
    scores = 5 * cfg.n_heads * s / d if attention_scores else 0.0
    return cfg.n_layers * s * rows * d * (34 + scores) * width / 2


def saved_dot_bytes(cfg: ModelConfig, rows: int, seq_len: int, precision: str) -> float:
    """What remat "dots" (`dots_with_no_batch_dims_saveable`) keeps, all layers, on one device: each layer's
    input and the outputs of its weight matmuls (q/k/v, the attention output projection, gate and up, down);
    everything else is recomputed in the backward pass."""
    width = 2 if precision == "bf16" else 4
    hd = cfg.resolved_head_dim
    gated = 2 if cfg.activation in ("swiglu", "geglu") else 1
    per_token = cfg.d_model + (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.d_model + gated * cfg.d_ff + cfg.d_model
    return cfg.n_layers * seq_len * rows * per_token * width


def resolve_remat(remat: str, cfg: ModelConfig, rows: int, seq_len: int, precision: str,
                  platform: str | None = None) -> str:
    """The remat policy a training run uses. `auto`: "full" on CPU when the activations the backward pass would
    keep (`activation_bytes` for the per-device micro-batch) exceed CPU_REMAT_ABOVE_BYTES, else "none".

    A CPU step with large activations is bound by memory traffic: recomputing each layer in the backward pass
    costs less than writing its activations (the attention probabilities above all) into the scan's per-layer
    stacks and reading them back. The pico step (8 x 256 tokens, fp32, ~100 MB of activations, 2 cores) ran
    89-98 ms with full remat against 105-109 ms without, with the same losses. Small ones stay in cache and
    recomputing is pure cost: the smoke step (~7 MB) ran 5.1 ms with full remat against 4.3 ms without
    (docs/performance.md). On GPUs and TPUs recomputation is pure cost while memory allows.
    """
    if remat != "auto":
        return remat
    if (platform or jax.default_backend()) != "cpu":
        return "none"
    return "full" if activation_bytes(cfg, rows, seq_len, precision) > CPU_REMAT_ABOVE_BYTES else "none"


def compute_dtype(precision: str) -> Any:
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def make_model(cfg: ModelConfig, precision: str = "fp32", remat: str = "none", attention_impl: str | None = None,
               scan_unroll: int = 1, fuse_projections: bool = True, layer_loop: bool = False) -> Decoder:
    return Decoder(cfg, dtype=compute_dtype(precision), remat=remat, attention_impl=attention_impl,
                   scan_unroll=scan_unroll, fuse_projections=fuse_projections, layer_loop=layer_loop)


def training_model(cfg: ModelConfig, precision: str, remat: str, tensor_parallel: int,
                   attention_impl: str | None = None, scan_unroll: int = 0, rows: int = 1,
                   seq_len: int | None = None) -> Decoder:
    """The Decoder a training run compiles: layers unrolled on GPU (`default_scan_unroll`, unless
    `scan_unroll` > 0 says otherwise) and projections fused unless the mesh splits them over a tensor axis.
    `rows` x `seq_len` is one device's micro-batch, which `remat: auto` sizes its choice by.

    With remat the scan stays rolled: unrolled, XLA either merges the recomputation with the forward pass or
    schedules it early, and the activations are kept anyway (measured on an H200 at the Qwen2.5-0.5B shape:
    the same peak memory and step time with and without hf-sft --gradient-checkpointing)."""
    remat = resolve_remat(remat, cfg, rows, seq_len or cfg.max_seq_len, precision)
    unroll = scan_unroll or (1 if remat != "none" else default_scan_unroll(cfg))
    return make_model(cfg, precision, remat, attention_impl, scan_unroll=unroll,
                      fuse_projections=tensor_parallel == 1)


def dummy_tokens(cfg: ModelConfig) -> Array:
    return jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)


def init_params(model: Decoder, rng: Array) -> dict[str, Any]:
    """Plain (unboxed) float32 params. Jitted: op-by-op init of a scanned model is needlessly slow."""
    variables = jax.jit(model.init)(rng, dummy_tokens(model.cfg))
    return nn.meta.unbox(variables["params"])


def logical_axes(model: Decoder) -> Any:
    """Pytree of PartitionSpecs over *logical* axis names, matching the params tree."""
    abstract = jax.eval_shape(lambda r: model.init(r, dummy_tokens(model.cfg)), jax.random.key(0))
    return nn.get_partition_spec(abstract["params"])


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """A scanned Decoder's params (block params stacked under `layers`) as a `layer_loop` Decoder's: each
    layer's own arrays under `layers_0`, `layers_1`, ... Run once, outside jit: the slices are new buffers."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    n_layers = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return {**rest, **{f"layers_{i}": jax.tree_util.tree_map(lambda p, i=i: p[i], params["layers"])
                       for i in range(n_layers)}}


def write_layer_rows(cache: Array | tuple[Array, ...], rows: Array | tuple[Array, ...],
                     index: Array) -> Array | tuple[Array, ...]:
    """cache (L, B, S, KV, D) with every layer's new rows (L, B, 1, KV, D) written at slot `index`: a scalar,
    or (B,) one per row; or the same per layer, for tuples of (B, S, KV, D) arrays (`Decoder.layer_loop`).
    Inside the decode loop the cache is loop state, so XLA updates it in place. The stacked case is written out
    rather than `jax.vmap(write_cache)` over the layers, which turns a scalar slot into per-layer slicing and
    selects around the update instead of one dynamic-update-slice."""
    if isinstance(cache, tuple):
        return tuple(write_cache(c, r, index) for c, r in zip(cache, rows, strict=True))
    index = jnp.asarray(index)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, rows, index, axis=2)
    return jax.vmap(lambda c, r, i: jax.lax.dynamic_update_slice_in_dim(c, r, i, axis=1),
                    in_axes=(1, 1, 0), out_axes=1)(cache, rows, index)


def init_cache(model: Decoder, batch: int, max_len: int) -> dict[str, Any]:
    """Zeroed keys and values in `model`'s compute dtype and layout: (n_layers, batch, max_len, KV, D) arrays,
    or for a `layer_loop` Decoder tuples of n_layers (batch, max_len, KV, D) arrays. Code that handles both
    indexes the batch and slot axes from the end (-4, -3)."""
    cfg = model.cfg
    shape = (batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    if model.layer_loop:
        return {n: tuple(jnp.zeros(shape, model.dtype) for _ in range(cfg.n_layers)) for n in ("k", "v")}
    return {n: jnp.zeros((cfg.n_layers, *shape), model.dtype) for n in ("k", "v")}


def cache_batch_and_length(cache: dict[str, Any]) -> tuple[int, int]:
    """(rows, slots) of a cache in either layout (`init_cache`)."""
    leaf = jax.tree_util.tree_leaves(cache)[0]
    return leaf.shape[-4], leaf.shape[-3]


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
