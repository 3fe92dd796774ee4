"""NF4 storage for QLoRA: the quantiser's error bounds, exact levels, double-quantised scales, and that the
decoder computes the same logits from NF4 kernels (expanded inside the scan) as from their dequantisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax.config import ModelConfig
from picochat_jax.hf.families import param_shapes
from picochat_jax.model import lora, quant
from picochat_jax.model.transformer import make_model

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def test_nf4_round_trip_error_is_bounded_by_the_level_spacing():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0.0, 0.05, (3, 64, 96)).astype(np.float32)
    q = quant.quantize_nf4(kernel)
    assert q["nf4"].dtype == np.uint8 and q["nf4"].shape == (3, 64 * 96 // 2)
    assert q["absmax_q"].dtype == np.int8 and q["absmax_scale"].shape == (3, 1)
    back = np.asarray(quant.dequantize_nf4(q, (64, 96)))
    assert back.shape == kernel.shape
    blocks = np.abs(kernel).reshape(3, -1, quant.BLOCK).max(-1, keepdims=True)
    widest_gap = np.max(np.diff(quant.NF4_LEVELS))
    err = np.abs(back - kernel).reshape(3, -1, quant.BLOCK)
    # Half the widest level gap, plus the absmax's own int8 error (at most half a step of its block scale).
    assert np.all(err <= blocks * (widest_gap / 2) + np.abs(kernel).max() / 127 + 1e-7)
    rel_rms = np.sqrt(np.mean((back - kernel) ** 2)) / kernel.std()
    assert 0.02 < rel_rms < 0.15  # ~4 bits: close, not exact
    # Per layer, one slice of the dict dequantises that layer alone (how the scan hands it to a projection).
    layer1 = {k: v[1] for k, v in q.items()}
    np.testing.assert_array_equal(np.asarray(quant.dequantize_nf4(layer1, (64, 96))), back[1])


def test_values_on_the_levels_with_one_absmax_round_trip_exactly():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 16, (2, 32, 64))
    idx[..., 0] = 15  # every block holds +1 * absmax, so every absmax is 0.25 and the centred scales are 0
    kernel = (quant.NF4_LEVELS[idx] * 0.25).astype(np.float32)
    back = np.asarray(quant.dequantize_nf4(quant.quantize_nf4(kernel), (32, 64)))
    np.testing.assert_array_equal(back, kernel)


def test_double_quantised_absmax_keeps_the_block_scales():
    rng = np.random.default_rng(2)
    kernel = (rng.normal(size=(1, 512, 64)) * rng.uniform(0.01, 1.0, (1, 512, 1))).astype(np.float32)
    q = quant.quantize_nf4(kernel)
    absmax = np.abs(kernel).reshape(1, -1, quant.BLOCK).max(-1)
    assert q["absmax_q"].shape == (1, 512) and q["absmax_scale"].shape == (1, 2)
    recovered = (q["absmax_q"].astype(np.float32).reshape(1, -1, 256) * q["absmax_scale"][..., None]).reshape(1, -1)
    recovered += q["absmax_offset"][:, None]
    spread = np.abs(absmax - absmax.mean()).max()
    assert np.abs(recovered - absmax).max() <= spread / 254 + 1e-6
    bits = 8 * quant.nbytes(q) / kernel.size
    assert 4.0 < bits < 4.2  # 4 + 8/64 + 32/16384 (+ one offset per layer)


def test_decoder_on_nf4_kernels_equals_decoder_on_their_dequantisation():
    rng = np.random.default_rng(3)
    base = jax.tree_util.tree_map(lambda shape: np.asarray(rng.normal(0.0, 0.2, shape), np.float32),
                                  param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    quantized = quant.quantize_tree(base, [lora.kernel_path(t) for t in lora.TARGETS])
    assert all(quant.is_quantized(quantized["layers"]["mlp"][p]["kernel"]) for p in ("gate_proj", "up_proj"))
    assert quantized["embed_tokens"] is base["embed_tokens"]  # embeddings and norms stay as they are
    dequantized = quant.dequantized_over(quantized, base)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)))
    for fuse in (True, False):  # fused q/k/v (one matmul) and separate projections
        model = make_model(CFG, fuse_projections=fuse)
        got = model.apply({"params": quantized}, tokens)
        want = model.apply({"params": jax.tree_util.tree_map(jnp.asarray, dequantized)}, tokens)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = make_model(CFG).apply({"params": jax.tree_util.tree_map(jnp.asarray, base)}, tokens)
    assert float(jnp.abs(got - full).max()) > 1e-4  # quantisation does change the model, a little
    # Adapters attach over NF4 kernels as over float ones.
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "down_proj"))
    adapters = lora.init_adapters(base, cfg, jax.random.key(0))
    adapters = {t: {"a": ab["a"], "b": ab["b"] + 0.1} for t, ab in adapters.items()}
    got = make_model(CFG).apply({"params": lora.attach(quantized, adapters, cfg)}, tokens)
    merged = lora.merge_host(dequantized, adapters, cfg)
    want = make_model(CFG).apply({"params": jax.tree_util.tree_map(jnp.asarray, merged)}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernels_that_do_not_split_into_blocks_stay_float():
    odd = {"layers": {"attn": {"q_proj": {"kernel": np.ones((1, 5, 7), np.float32)}}}}
    assert quant.quantize_tree(odd, [lora.kernel_path("q_proj")]) == odd


def test_the_lora_backward_keeps_nf4_kernels_as_stored():
    """`ops.lora_matmul` carries a frozen kernel from the forward pass to the backward as stored (NF4 codes)
    and dequantizes it in each, so the differentiated program holds no stacked float copy of every layer's
    kernels (XLA:CPU kept such a copy alive between the passes: tools/lora_step_memory.py)."""
    rng = np.random.default_rng(4)
    base = jax.tree_util.tree_map(lambda shape: np.asarray(rng.normal(0.0, 0.2, shape), np.float32),
                                  param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    quantized = jax.tree_util.tree_map(jnp.asarray, quant.quantize_tree(base, [lora.kernel_path(t)
                                                                              for t in lora.TARGETS]))
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "o_proj", "down_proj"))
    adapters = lora.init_adapters(base, cfg, jax.random.key(0))
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)))
    model = make_model(CFG)

    def loss(adapters):
        return jnp.mean(model.apply({"params": lora.attach(quantized, adapters, cfg)}, tokens) ** 2)

    grads = jax.grad(loss)(adapters)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["q_proj"]["b"]).max()) > 0  # the rank-r path trains the adapters
    program = jax.jit(jax.grad(loss)).lower(adapters).as_text()
    L, d, ff, qkv = CFG.n_layers, CFG.d_model, CFG.d_ff, CFG.d_model + 2 * CFG.n_kv_heads * (CFG.d_model // CFG.n_heads)
    stacked_float_kernels = [f"tensor<{L}x{i}x{o}xf32>" for i, o in ((d, qkv), (d, d), (d, 2 * ff), (ff, d))]
    assert not [t for t in stacked_float_kernels if t in program]


def test_the_host_dequantisation_equals_the_steps_and_never_touches_the_device():
    """`dequantized_over` (QLoRA's merge base for export, DPO's start) runs in numpy: on an accelerator its
    float32 copy of each stacked kernel plus temporaries set the whole QLoRA run's peak memory (measured on an
    H200: 2.18 GiB against bf16 LoRA's 1.95 under checkpointing)."""
    rng = np.random.default_rng(4)
    base = jax.tree_util.tree_map(lambda shape: np.asarray(rng.normal(0.0, 0.2, shape), np.float32),
                                  param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    quantized = quant.quantize_tree(base, [lora.kernel_path(t) for t in lora.TARGETS])
    with jax.transfer_guard_host_to_device("disallow"):  # any jnp op on these host arrays would raise
        on_host = quant.dequantized_over(quantized, base)
    for module, name in (("mlp", "down_proj"), ("attn", "q_proj")):
        got = on_host["layers"][module][name]["kernel"]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        in_step = quant.dequantize_nf4(quantized["layers"][module][name]["kernel"], got.shape[1:])
        np.testing.assert_allclose(got, np.asarray(in_step), rtol=1e-6, atol=0)
