"""LoRA over the scanned params: merge math (per layer inside the scan and on the host), frozen base,
adapter-only optimizer state, and that it learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from picochat_jax.config import ModelConfig
from picochat_jax.hf.families import param_shapes
from picochat_jax.model import lora
from picochat_jax.model.transformer import make_model
from picochat_jax.train.step import CausalLM, LoraParams, TrainState, make_eval_fn, make_step_fn

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


def random_params(cfg: ModelConfig, seed: int = 0):
    """The Decoder's exact param tree filled from numpy (no init compile: tests stay fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda shape: jnp.asarray(rng.normal(0.0, 0.2, shape), jnp.float32),
                                  param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def base():
    return random_params(CFG)


def test_parse_targets_accepts_hf_and_short_names():
    assert lora.parse_targets("q_proj, v ,down_proj,q") == ("q_proj", "v_proj", "down_proj")
    assert lora.parse_targets(["gate", "up_proj"]) == ("gate_proj", "up_proj")
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        lora.parse_targets("q_proj,qkv")


def test_dropout_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="--lora-dropout 0"):
        lora.LoraConfig(dropout=0.1)
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)


def test_fresh_adapters_leave_the_model_unchanged(base):
    cfg = lora.LoraConfig(rank=4, alpha=8)
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    assert set(adapters) == set(lora.TARGETS)
    q = adapters["q_proj"]
    assert q["a"].shape == (2, 32, 4) and q["b"].shape == (2, 4, 32) and float(jnp.abs(q["b"]).max()) == 0.0
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)))
    model = make_model(CFG)
    attached = model.apply({"params": lora.attach(base, adapters, cfg)}, tokens)
    np.testing.assert_array_equal(attached, model.apply({"params": base}, tokens))


def test_merge_adds_scaled_low_rank_update_per_layer(base):
    cfg = lora.LoraConfig(rank=4, alpha=12, targets=("k_proj", "down_proj"))
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    adapters = {t: {"a": ab["a"], "b": jnp.asarray(rng.normal(size=ab["b"].shape), jnp.float32)}
                for t, ab in adapters.items()}
    merged = lora.merge_host(base, adapters, cfg)
    for layer in range(CFG.n_layers):
        a, b = np.asarray(adapters["k_proj"]["a"][layer]), np.asarray(adapters["k_proj"]["b"][layer])
        want = np.asarray(base["layers"]["attn"]["k_proj"]["kernel"][layer]) + 3.0 * a @ b  # alpha / r = 3
        np.testing.assert_allclose(merged["layers"]["attn"]["k_proj"]["kernel"][layer], want, rtol=1e-5, atol=1e-6)
    attn, mlp = merged["layers"]["attn"], merged["layers"]["mlp"]
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], base["layers"]["attn"]["q_proj"]["kernel"])
    assert not np.array_equal(mlp["down_proj"]["kernel"], base["layers"]["mlp"]["down_proj"]["kernel"])
    # Attached adapters (merged layer by layer inside the scan) compute what the host-merged kernels compute;
    # the base tree is not modified and untargeted leaves are the very same arrays.
    attached = lora.attach(base, adapters, cfg)
    assert attached["layers"]["attn"]["q_proj"]["kernel"] is base["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(attached["layers"]["attn"]["k_proj"]["kernel"], dict)
    assert not isinstance(base["layers"]["attn"]["k_proj"]["kernel"], dict)
    model = make_model(CFG)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8)))
    np.testing.assert_allclose(model.apply({"params": attached}, tokens),
                               model.apply({"params": jax.tree_util.tree_map(jnp.asarray, merged)}, tokens),
                               rtol=1e-5, atol=1e-5)


def test_absent_targets_are_skipped_but_none_is_an_error():
    gelu_cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16,
                           norm="layernorm", position="learned", activation="gelu")
    params = random_params(gelu_cfg)
    assert lora.present_targets(params, lora.LoraConfig(targets=("gate_proj", "up_proj"))) == ("up_proj",)
    with pytest.raises(ValueError, match="none of the LoRA targets"):
        lora.present_targets(params, lora.LoraConfig(targets=("gate_proj",)))


@pytest.mark.slow
def test_lora_step_trains_adapters_only(base):
    cfg = lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"))
    model = make_model(CFG)
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(adapters)
    # Only adapter moments: Adam's mu/nu mirror the adapter tree, the base has no optimizer state at all.
    assert jax.tree_util.tree_structure(opt_state[0].mu) == jax.tree_util.tree_structure(adapters)
    state = TrainState(jnp.zeros((), jnp.int32), adapters, opt_state, jax.random.key_data(jax.random.key(0)))
    objective = CausalLM(model, np.zeros(CFG.vocab_size, np.float32))
    step = jax.jit(make_step_fn(objective, optimizer, optax.constant_schedule(3e-2), LoraParams(cfg)))
    evaluate = jax.jit(make_eval_fn(objective, LoraParams(cfg)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 4, 17))  # (grad_accum, batch, seq+1)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "loss_mask": np.ones((2, 4, 16), np.float32)}
    base_before = jax.tree_util.tree_map(np.array, base)
    before = evaluate(adapters, base, batch)
    ce0, n = before["ce"], before["tokens"]
    for _ in range(20):
        state, metrics = step(state, base, batch)
    ce1 = evaluate(state.params, base, batch)["ce"]
    assert float(ce1 / n) < float(ce0 / n) - 0.3
    assert int(state.step) == 20 and np.isfinite(float(metrics["grad_norm"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, base_before)  # frozen
    assert set(state.params) == {"q_proj", "v_proj", "up_proj"}


def test_lora_gradient_matches_the_merged_kernel_gradient(base):
    """d loss / dB = (alpha/r) A^T (d loss / dW_eff): adapters get exactly the low-rank projection of the
    full-weight gradient, so merging inside the loss trains them like PEFT's side path."""
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("o_proj",))
    model = make_model(CFG)
    adapters = lora.init_adapters(base, cfg, jax.random.key(3))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)))

    def loss_of_params(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def adapter_grads(ad):
        return jax.grad(lambda x: loss_of_params(lora.attach(base, x, cfg)))(ad)

    merged = jax.tree_util.tree_map(jnp.asarray, lora.merge_host(base, adapters, cfg))
    g_adapters = adapter_grads(adapters)
    g_w = jax.grad(loss_of_params)(merged)["layers"]["attn"]["o_proj"]["kernel"]
    want = cfg.scale * jnp.einsum("lir,lio->lro", adapters["o_proj"]["a"], g_w)
    np.testing.assert_allclose(g_adapters["o_proj"]["b"], want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fuse", [True, False])
def test_rank_r_backward_equals_autodiff_through_the_merged_kernels(base, fuse):
    """Adapters attached to every projection (fused q|k|v and gate|up, or one matmul each): the custom
    backward of ops.lora_matmul gives the gradients autodiff gives through W + (alpha/r) A B."""
    cfg = lora.LoraConfig(rank=3, alpha=6)
    model = make_model(CFG, fuse_projections=fuse)
    rng = np.random.default_rng(5)
    adapters = {t: {"a": ab["a"], "b": jnp.asarray(rng.normal(0, 0.1, ab["b"].shape), jnp.float32)}
                for t, ab in lora.init_adapters(base, cfg, jax.random.key(2)).items()}
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 9)))

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def merged_in_jax(ad):
        out = base
        for t, ab in ad.items():
            w = lora.get_path(base, lora.kernel_path(t))
            out = lora.set_path(out, lora.kernel_path(t), w + cfg.scale * jnp.einsum("lir,lro->lio", ab["a"], ab["b"]))
        return out

    ours = jax.jit(jax.grad(lambda ad: loss(lora.attach(base, ad, cfg))))(adapters)
    want = jax.jit(jax.grad(lambda ad: loss(merged_in_jax(ad))))(adapters)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ours, want)
