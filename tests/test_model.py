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


@pytest.mark.parametrize("impl", ["scatter_f32", "onehot"])
def test_embedding_gradient_ways_match_the_exact_sum(impl, monkeypatch):
    from picochat_jax.model import ops

    monkeypatch.setattr(ops, "_ONEHOT_BLOCK_ELEMENTS", 40 * 5)  # 5 tokens a one-hot block: several blocks + pad
    table = jax.random.normal(jax.random.key(0), (40, 8))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 7)), jnp.int32)
    weights = jax.random.normal(jax.random.key(1), (3, 7, 8))
    exact = np.zeros((40, 8), np.float32)
    np.add.at(exact, np.asarray(tokens).reshape(-1), np.asarray(weights).reshape(-1, 8))

    def loss(t, kind):
        return jnp.sum(ops.embed_lookup(t, tokens, jnp.float32, kind) * weights)

    np.testing.assert_allclose(jax.grad(loss)(table, impl), exact, atol=1e-5)
    np.testing.assert_allclose(loss(table, impl), loss(table, "scatter"), rtol=1e-6)


def test_bf16_embedding_gradient_sums_repeated_ids_in_float32():
    """A frequent id's gradient is thousands of rows: summed in bf16 (jnp.take's own backward) it drifts by
    percents; the float32 ways keep it to the final rounding."""
    from picochat_jax.model import ops

    tokens = jnp.zeros((4096,), jnp.int32).at[::7].set(1)
    dy = (jax.random.normal(jax.random.key(0), (4096, 16)) + 1.0).astype(jnp.bfloat16)
    exact = np.asarray(jax.ops.segment_sum(dy.astype(jnp.float32), tokens, num_segments=4))

    def grad(kind):
        fn = jax.vjp(lambda t: ops.embed_lookup(t, tokens, jnp.bfloat16, kind), jnp.zeros((4, 16), jnp.float32))[1]
        return np.asarray(fn(dy)[0])

    def worst_relative_error(kind):
        return float(np.max(np.abs(grad(kind)[:2] - exact[:2]) / np.abs(exact[:2])))

    assert worst_relative_error("scatter_f32") < 1e-6 and worst_relative_error("onehot") < 1e-2 ** 1.5
    assert worst_relative_error("scatter") > 1e-2
    assert ops.resolve_embed_grad_impl(None) == "scatter_f32"
    with pytest.raises(ValueError, match="embedding-gradient"):
        ops.resolve_embed_grad_impl("sorted")
