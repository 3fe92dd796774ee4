"""Decoder behaviour: every scale builds, packed documents stay isolated, remat changes nothing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picochat_jax.config import ModelConfig, available_scales, load_scale
from picochat_jax.model.transformer import count_params, init_params, logical_axes, make_model, training_model

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                   qk_norm=True, tie_embeddings=False)


def test_every_named_scale_loads_and_counts_its_params():
    names = available_scales()
    for required in ("smoke", "pico", "small", "medium", "h100-pilot", "h100-100m", "h200-1b"):
        assert required in names
    for name in names:
        cfg = load_scale(name).model
        shapes = jax.eval_shape(lambda r, c=cfg: init_params(make_model(c), r), jax.random.key(0))
        assert count_params(shapes) == cfg.num_params(), name
    assert 100e6 < load_scale("h100-100m").model.num_params() < 115e6
    assert 1.0e9 < load_scale("h200-1b").model.num_params() < 1.3e9


@pytest.mark.parametrize("options", [
    {},
    {"norm": "layernorm", "position": "learned", "activation": "gelu", "qkv_bias": True, "out_bias": True,
     "mlp_bias": True, "tie_embeddings": True, "qk_norm": False},
    {"activation": "relu2", "parallel_residual": True, "scaled_residual_init": True},
])
def test_packed_documents_never_attend_across_boundaries(options):
    cfg = dataclasses.replace(TINY, **options)
    model = make_model(cfg)
    params = init_params(model, jax.random.key(1))
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 64, 10), rng.integers(0, 64, 6)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b]))[None]
    segments = jnp.asarray([[0] * 10 + [1] * 6])
    positions = jnp.asarray([list(range(10)) + list(range(6))])
    apply = jax.jit(model.apply)
    got = apply({"params": params}, packed, positions=positions, segment_ids=segments)
    alone_b = apply({"params": params}, jnp.asarray(doc_b)[None])
    alone_a = apply({"params": params}, jnp.asarray(doc_a)[None])
    np.testing.assert_allclose(got[0, 10:], alone_b[0], atol=1e-5)
    np.testing.assert_allclose(got[0, :10], alone_a[0], atol=1e-5)
    # and without segment ids the second document does see the first
    mixed = apply({"params": params}, packed, positions=positions)
    assert not np.allclose(mixed[0, 10:], alone_b[0], atol=1e-3)


def test_remat_and_bf16_keep_the_math():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    base = make_model(TINY)
    params = init_params(base, jax.random.key(0))

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, tokens) ** 2)

    g0 = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
    for policy in ("full", "dots"):
        remat_model = make_model(TINY, remat=policy)
        g1 = jax.jit(jax.grad(lambda p, m=remat_model: loss(m, p)))(params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
    lo = jax.jit(make_model(TINY, precision="bf16").apply)({"params": params}, tokens)
    hi = jax.jit(base.apply)({"params": params}, tokens)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(lo, hi, atol=0.05)


def test_params_carry_logical_axes_for_sharding():
    specs = logical_axes(make_model(TINY))
    assert tuple(specs["embed_tokens"]) == ("vocab", "embed")
    assert tuple(specs["layers"]["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")


def test_remat_auto_recomputes_large_activations_on_cpu_only():
    from picochat_jax.model.transformer import CPU_REMAT_ABOVE_BYTES, activation_bytes, resolve_remat

    pico, smoke = load_scale("pico").model, load_scale("smoke").model
    assert activation_bytes(pico, 8, 256, "fp32") > CPU_REMAT_ABOVE_BYTES > activation_bytes(smoke, 8, 128, "fp32")
    assert [resolve_remat("auto", pico, 8, 256, "fp32", p) for p in ("cpu", "gpu", "tpu")] == ["full", "none", "none"]
    assert resolve_remat("auto", smoke, 8, 128, "fp32", "cpu") == "none"  # cache-sized: recomputing is pure cost
    assert resolve_remat("auto", pico, 1, 256, "fp32", "cpu") == "none"  # a small per-device micro-batch
    assert [resolve_remat(r, pico, 8, 256, "fp32", "cpu") for r in ("none", "dots", "full")] == ["none", "dots", "full"]
    assert load_scale("pico").base.remat == "auto"  # the shipped default
    assert training_model(pico, "fp32", "auto", 1, rows=8, seq_len=256).remat == "full"  # this suite runs on CPU
    assert training_model(smoke, "fp32", "auto", 1, rows=8, seq_len=128).remat == "none"
