"""The Pallas kernels (QK-norm + RoPE; the pre-norm backward), run in interpret mode on CPU, against the XLA path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picochat_jax.config import ModelConfig
from picochat_jax.model import norm_rope_kernel, norm_rope_mgpu, ops, rms_norm_kernel, rms_norm_mgpu, swiglu_mgpu
from picochat_jax.model.transformer import make_model
from picochat_jax.parallel import MeshShape, make_mesh, per_shard_rows
from picochat_jax.train.step import build_trainer

TINY = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                   qk_norm=True)


def _packed_inputs(B: int, T: int, H: int, K: int, D: int, dtype=jnp.float32, per_row_positions: bool = False):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    qkv = jax.random.normal(keys[0], (B, T, (H + 2 * K) * D)).astype(dtype)
    q_scale = 1 + 0.2 * jax.random.normal(keys[1], (D,))
    k_scale = 1 + 0.2 * jax.random.normal(keys[2], (D,))
    positions = jnp.broadcast_to(jnp.arange(T) + 3, (B, T))
    if per_row_positions:  # packed documents: positions restart at each document, differently in every row
        positions = positions % jax.random.randint(keys[3], (B, 1), 5, T)
    rope = ops.rope_tables(positions, ops.rope_inv_freq(D, 10000.0, None))
    return qkv, q_scale, k_scale, rope


KERNEL_MODULES = {"pallas": norm_rope_kernel, "mosaic": norm_rope_mgpu}  # Triton, and its Mosaic GPU port


@pytest.mark.parametrize("impl", ["pallas", "mosaic"])
@pytest.mark.parametrize("B,T,per_row_positions", [(2, 16, False), (1, 48, False), (2, 32, False), (4, 64, True)])
def test_kernels_equal_the_xla_path_forward_and_backward(B, T, per_row_positions, impl):
    H, K, D = 4, 2, 32
    if not KERNEL_MODULES[impl].supported(B * T, D):
        pytest.skip(f"{impl} kernels take no {B * T}-token shape")
    qkv, q_scale, k_scale, rope = _packed_inputs(B, T, H, K, D, per_row_positions=per_row_positions)

    def heads(impl):
        return lambda x, qs, ks: ops.heads_from_qkv(x, qs, ks, rope, H, K, 1e-6, impl)

    want, want_vjp = jax.vjp(heads("xla"), qkv, q_scale, k_scale)
    got, got_vjp = jax.vjp(heads(impl), qkv, q_scale, k_scale)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    cotangents = tuple(jax.random.normal(jax.random.PRNGKey(i + 7), w.shape) for i, w in enumerate(want))
    for w, g in zip(want_vjp(cotangents), got_vjp(cotangents), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["pallas", "mosaic"])
def test_kernels_in_bf16_stay_within_rounding_of_the_float32_path(impl):
    B, T, H, K, D = 2, 32, 4, 2, 64
    qkv, q_scale, k_scale, rope = _packed_inputs(B, T, H, K, D, jnp.bfloat16)
    want = ops.heads_from_qkv(qkv.astype(jnp.float32), q_scale, k_scale, rope, H, K, 1e-6, "xla")
    got = ops.heads_from_qkv(qkv, q_scale, k_scale, rope, H, K, 1e-6, impl)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3e-2, rtol=1e-2)


def test_resolution_picks_the_kernels_only_where_they_apply():
    assert ops.resolve_norm_rope_impl(None, True, True, 1024, 64, platform="gpu") == "mosaic"
    assert ops.resolve_norm_rope_impl("auto", True, True, 1024, 64, platform="tpu") == "xla"
    assert ops.resolve_norm_rope_impl("auto", True, True, 1024, 64, platform="cpu") == "xla"
    assert ops.resolve_norm_rope_impl("pallas", True, True, 1024, 64, platform="cpu") == "pallas"
    assert ops.resolve_norm_rope_impl("pallas", False, True, 1024, 64) == "xla"  # no QK-norm scale
    assert ops.resolve_norm_rope_impl("pallas", True, False, 1024, 64) == "xla"  # learned positions
    assert ops.resolve_norm_rope_impl(None, True, True, 7, 64, platform="gpu") == "xla"  # decode rows
    assert ops.resolve_norm_rope_impl(None, True, True, 1024, 40, platform="gpu") == "xla"
    assert ops.resolve_norm_rope_impl(None, True, True, 96, 64, platform="gpu") == "xla"  # not whole 64-token blocks
    assert ops.resolve_norm_rope_impl("pallas", True, True, 96, 64, platform="gpu") == "pallas"  # Triton's 32 tiles
    assert norm_rope_kernel.block_tokens(96) == 16 and norm_rope_kernel.block_tokens(96, 64) == 32
    with pytest.raises(ValueError, match="norm/rope implementation"):
        ops.resolve_norm_rope_impl("triton", True, True, 1024, 64)


@pytest.mark.parametrize("impl", ["pallas", "mosaic"])
@pytest.mark.parametrize("shape", [(2, 16, 64), (1, 64, 96), (4, 32, 768)])
def test_rms_norm_backward_kernel_equals_autodiff_with_the_residual_gradient(shape, impl):
    if impl == "mosaic" and not rms_norm_mgpu.supported(shape[0] * shape[1], shape[-1]):
        pytest.skip(f"the Mosaic GPU kernel takes no {shape} shape")
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(keys[0], shape) * 3
    scale = 1 + 0.2 * jax.random.normal(keys[1], shape[-1:])
    d_pass, dy = jax.random.normal(keys[2], shape), jax.random.normal(keys[3], shape)

    def reference(x, scale):
        return x, rms_norm_kernel.rms_norm(x, scale, 1e-6, jnp.float32)

    (x_out, y), kernel_vjp = jax.vjp(lambda x, s: rms_norm_kernel.residual_rms_norm(x, s, 1e-6, jnp.float32, impl),
                                     x, scale)
    (want_x, want_y), want_vjp = jax.vjp(reference, x, scale)
    np.testing.assert_array_equal(x_out, want_x)
    np.testing.assert_array_equal(y, want_y)
    for got, want in zip(kernel_vjp((d_pass, dy)), want_vjp((d_pass, dy)), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_rms_norm_resolution():
    assert ops.resolve_rms_norm_impl(None, "rmsnorm", 32768, 768, platform="gpu") == "mosaic"
    assert ops.resolve_rms_norm_impl(None, "rmsnorm", 32768, 768, platform="cpu") == "xla"
    assert ops.resolve_rms_norm_impl("pallas", "layernorm", 32768, 768) == "xla"
    assert ops.resolve_rms_norm_impl("pallas", "rmsnorm", 32768, 100) == "xla"  # no power-of-two chunk
    assert rms_norm_kernel.column_chunk(768) == 256 and rms_norm_kernel.column_chunk(96) == 32
    assert ops.resolve_rms_norm_impl("mosaic", "rmsnorm", 32768, 768, platform="gpu") == "mosaic"
    assert ops.resolve_rms_norm_impl("mosaic", "rmsnorm", 32768, 96) == "xla"  # no 64-column chunks


def test_mosaic_kernels_lower_for_cuda_without_a_gpu():
    """The Mosaic GPU kernels' layouts, pipelines and TMA blocks are checked when they lower to Mosaic GPU's
    MLIR, which runs on any host (interpret mode runs their steps, not their pipelines): the step's shape, both
    directions."""
    B, T, H, K, D = 2, 128, 12, 4, 64
    qkv, q_scale, k_scale, rope = _packed_inputs(B, T, H, K, D, jnp.bfloat16)
    heads = ops.heads_from_qkv(qkv, q_scale, k_scale, rope, H, K, 1e-6, "xla")

    def both(x, qs, ks, cotangents):
        out = norm_rope_mgpu.norm_rope_forward(x, qs, ks, rope, H, K, 1e-6, interpret=False)
        return out, norm_rope_mgpu.norm_rope_backward(x, qs, ks, rope, *cotangents, H, K, 1e-6, interpret=False)

    text = jax.jit(both).trace(qkv, q_scale, k_scale, heads).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2  # one kernel each way
    x = qkv[..., :768]
    norm_grad = jax.jit(lambda x, s: rms_norm_mgpu.rms_norm_backward(x, s, x, x, 1e-6, interpret=False))
    assert "stablehlo.custom_call @mosaic_gpu" in norm_grad.trace(x, jnp.ones(768)).lower(
        lowering_platforms=("cuda",)).as_text()


def test_mosaic_resolution_counts_one_batch_shard_under_a_mesh():
    from picochat_jax.parallel import traced_under

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (the fake CPU devices of tests/conftest.py)")

    def resolved(x):
        return ops.resolve_norm_rope_impl("mosaic", True, True, per_shard_rows(x.shape[0]) * x.shape[1], 64,
                                          platform="gpu")

    x = jnp.zeros((8, 32))
    assert resolved(x) == "mosaic"  # 256 tokens
    for mesh, want in ((MeshShape(1, 2, 1), "mosaic"), (MeshShape(2, 4, 1), "xla")):  # 128 or 32 tokens a shard
        seen = []
        jax.jit(traced_under(make_mesh(mesh), lambda x, seen=seen: seen.append(resolved(x)) or x)).trace(x)
        assert seen == [want], mesh


def test_mosaic_resolution():
    assert ops.resolve_norm_rope_impl("mosaic", True, True, 1024, 64, platform="gpu") == "mosaic"
    assert ops.resolve_norm_rope_impl("mosaic", True, True, 96, 64, platform="gpu") == "xla"  # not 64-token blocks
    assert ops.resolve_norm_rope_impl("mosaic", True, True, 1024, 40, platform="gpu") == "xla"
    assert ops.resolve_norm_rope_impl(None, True, True, 1024, 256, platform="gpu") == "xla"  # Gemma's heads: SMEM


# the default (Mosaic GPU) kernels in the default block, the Triton ones in the parallel-residual block
@pytest.mark.parametrize("parallel_residual,norm_rope", [(False, "mosaic"), (True, "pallas")])
def test_decoder_with_kernels_computes_the_same_loss_and_gradients(parallel_residual, norm_rope):
    # d_ff 128: one whole column chunk for the SwiGLU kernel (the Triton case takes the split XLA backward)
    swiglu = "mosaic" if norm_rope == "mosaic" else "split"
    model = make_model(dataclasses.replace(TINY, parallel_residual=parallel_residual, d_ff=128))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, TINY.vocab_size)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]

    def loss(params, model):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    # float32 matmuls in full precision: on a GPU the default (TF32) rounds away the 1e-6 this test checks.
    with jax.default_matmul_precision("highest"):
        want, want_grad = jax.value_and_grad(loss)(params, model.clone(norm_rope_impl="xla", rms_norm_impl="xla",
                                                                       swiglu_grad_impl="packed"))
        got, got_grad = jax.value_and_grad(loss)(params, model.clone(norm_rope_impl=norm_rope, rms_norm_impl=norm_rope,
                                                                     swiglu_grad_impl=swiglu))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), got_grad, want_grad)


@pytest.mark.slow
def _one_step(model, examples: dict, train_cfg, mesh_shape: MeshShape) -> tuple:
    """(params, metrics) after one train step of `model` on the first batch of `examples` over `mesh_shape`."""
    from picochat_jax.data.loader import BatchSource
    from picochat_jax.train.optim import make_optimizer

    tx, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, tx, schedule, np.ones(model.cfg.vocab_size), make_mesh(mesh_shape))
    state = trainer.init(jax.random.key_data(jax.random.key(0)))
    batch = BatchSource(examples, train_cfg.batch_size, 1, seed=0).batch(0)
    state, metrics = trainer.step(state, trainer.put_batch(batch))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_sharded_step_with_kernels_matches_the_single_device_xla_step():
    """Under a data/fsdp mesh the kernels run per batch shard (shard_map) and the scale gradients are summed.
    The Mosaic GPU kernels take whole 64-token blocks of a shard: 2 rows of 32 tokens on each of 8 devices."""
    from picochat_jax.config import load_scale

    train_cfg = dataclasses.replace(load_scale("smoke").base, steps=2, batch_size=16, grad_accum_steps=1,
                                    warmup_steps=1, learning_rate=1e-2)
    rng = np.random.default_rng(0)
    stream = (rng.integers(0, 64, (16, 1)) + np.arange(33)) % 64
    examples = {"inputs": stream[:, :-1].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
                "loss_mask": np.ones((16, 32), np.float32), "segment_ids": np.zeros((16, 32), np.int32)}

    def model(impl: str):
        return make_model(dataclasses.replace(TINY, d_ff=128)).clone(
            norm_rope_impl=impl, rms_norm_impl=impl, swiglu_grad_impl="packed" if impl == "xla" else impl)

    ref_params, ref_metrics = _one_step(model("xla"), examples, train_cfg, MeshShape(1, 1, 1))
    params, metrics = _one_step(model("mosaic"), examples, train_cfg, MeshShape(2, 4, 1))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    # Adam's first step moves each weight by about lr * sign(grad), so float32 summation-order noise in a
    # near-zero gradient shows up as ~1e-5 in a few weights (lr here is 1e-2).
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


# ------------------------------------------------------------------------------------ TPU splash attention


SPLASH = dataclasses.replace(TINY, max_seq_len=256)


def test_splash_attention_equals_the_xla_path_with_packed_documents_and_gqa():
    """The TPU splash kernel (Pallas interpret mode here) gives the XLA path's output and gradients, with segment
    ids keeping packed documents apart and GQA heads repeated."""
    rng = np.random.default_rng(0)
    B, T, H, K, D = 2, 256, 4, 2, 64
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.float32) for n in (H, K, K))
    segments = jnp.asarray(np.stack([np.repeat([0, 1, 2], [100, 100, 56]), np.repeat([0, 1], [37, 219])]))
    same_doc = segments[:, :, None] == segments[:, None, :]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    mask = (causal[None] & same_doc)[:, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    splash = loss(lambda q, k, v: ops.attend(q, k, v, None, segments, "splash"))
    xla = loss(lambda q, k, v: ops.attend(q, k, v, mask, None, "xla"))
    np.testing.assert_allclose(ops.attend(q, k, v, None, segments, "splash"), ops.attend(q, k, v, mask, None, "xla"),
                               atol=2e-5)
    for got, want in zip(jax.grad(splash, (0, 1, 2))(q, k, v), jax.grad(xla, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-4)
    assert ops.resolve_attention_impl(None, jnp.bfloat16, 64, platform="tpu") == "splash"
    # A length the kernel's 128-token tiles do not divide falls back to the XLA path, still document-masked.
    short = ops.attend(q[:, :100], k[:, :100], v[:, :100], None, segments[:, :100], "splash")
    np.testing.assert_allclose(short, ops.attend(q[:, :100], k[:, :100], v[:, :100], mask[:, :, :100, :100], None,
                                                 "xla"), atol=2e-5)


def test_splash_step_on_a_mesh_matches_the_single_device_xla_step():
    """`attention_impl: splash` on an 8-device data x fsdp mesh (the kernel runs per batch shard) takes the train
    step of the single-device XLA decoder on packed rows: same loss, gradient norm and updated params."""
    from picochat_jax.config import load_scale

    train_cfg = dataclasses.replace(load_scale("smoke").base, steps=2, batch_size=8, grad_accum_steps=1,
                                    warmup_steps=1, learning_rate=1e-2)
    rng = np.random.default_rng(0)
    stream = (rng.integers(0, 64, (16, 1)) + np.arange(129)) % 64
    segments = np.repeat([[0] * 70 + [1] * 58], 16, 0).astype(np.int32)
    examples = {"inputs": stream[:, :-1].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
                "loss_mask": np.ones((16, 128), np.float32), "segment_ids": segments}

    ref_params, ref_metrics = _one_step(make_model(SPLASH, attention_impl="xla"), examples, train_cfg,
                                        MeshShape(1, 1, 1))
    params, metrics = _one_step(make_model(SPLASH, attention_impl="splash"), examples, train_cfg, MeshShape(2, 4, 1))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


def test_tpu_plan_counts_state_activations_and_picks_a_mesh(load_tool):
    from picochat_jax.config import load_scale

    plan = load_tool("tpu_plan")
    scale = load_scale("h200-1b")
    n = scale.model.num_params()
    row = plan.plan_one(scale, plan.CHIPS["v5e"], 8, 2, 4, 0.5)
    assert row["params"] == n and row["state_gib"] == pytest.approx(16 * n / 4 / 2**30)
    tokens = 16 / 8 * scale.model.max_seq_len  # the chip's rows of one micro-batch
    d, L = scale.model.d_model, scale.model.n_layers
    assert row["activations_gib_no_remat"] == pytest.approx(tokens * L * 34 * d / 2**30)
    assert row["activations_gib_remat_full"] == pytest.approx(tokens * L * 2 * d / 2**30)
    assert plan.micro_batch(16, 8, 64) == (64, 2) and plan.micro_batch(16, 8, 256) is None
    rows = {(r["tpu"], r["chips"]): r for r in plan.plan(["h200-1b"], ["v5e", "v5p"], [1, 8, 32], 0.5)}
    assert not rows[("v5e", 1)]["chosen"]  # 17 GiB of state on a 16 GiB chip
    assert rows[("v5e", 8)]["chosen"] and int(rows[("v5e", 8)]["mesh"].split("x")[1]) >= 2  # needs fsdp
    assert rows[("v5p", 8)]["mesh"] == "8x1" and rows[("v5p", 32)]["micro_batch"] == 32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 256), (1, 128, 384)])
def test_swiglu_backward_kernel_equals_the_xla_backward(shape, dtype):
    """The Mosaic GPU kernel's steps (interpret mode) give `swiglu_packed`'s XLA gradient: both halves, every chunk."""
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    gate_up = (jax.random.normal(keys[0], (*shape[:-1], 2 * shape[-1])) * 3).astype(dtype)
    d_out = jax.random.normal(keys[1], shape).astype(dtype)
    _, xla_vjp = jax.vjp(lambda g: ops.swiglu_packed(g, "xla"), gate_up)
    out, kernel_vjp = jax.vjp(lambda g: ops.swiglu_packed(g, "mosaic"), gate_up)
    np.testing.assert_array_equal(out, ops.swiglu_packed(gate_up, "xla"))
    (got,), (want,) = kernel_vjp(d_out), xla_vjp(d_out)
    assert got.dtype == dtype and got.shape == gate_up.shape
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_swiglu_backward_kernel_lowers_for_cuda_without_a_gpu():
    gate_up = jnp.ones((4, 512, 4096), jnp.bfloat16)
    grad = jax.jit(lambda g, d: swiglu_mgpu.swiglu_backward(g, d, interpret=False))
    text = grad.trace(gate_up, gate_up[..., :2048]).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_swiglu_grad_resolution():
    assert ops.resolve_swiglu_grad_impl(None, 32768, 2048, platform="cpu") == "packed"
    assert ops.resolve_swiglu_grad_impl("auto", 32768, 2048, platform="gpu") == "mosaic"
    assert ops.resolve_swiglu_grad_impl("auto", 96, 2048, platform="gpu") == "split"
    assert ops.resolve_swiglu_grad_impl("mosaic", 32768, 2048) == "mosaic"
    assert ops.resolve_swiglu_grad_impl("mosaic", 96, 2048) == "split"  # not whole 64-row blocks
    assert ops.resolve_swiglu_grad_impl("mosaic", 32768, 5632 + 64) == "split"  # not whole 128-column chunks
    assert ops.resolve_swiglu_grad_impl("mosaic", 32768, 5632 + 64, dtype=jnp.float32) == "mosaic"  # 64 in float32
    assert swiglu_mgpu.default_chunk(2) == 128 and swiglu_mgpu.default_chunk(4) == 64
    with pytest.raises(ValueError, match="SwiGLU-gradient"):
        ops.resolve_swiglu_grad_impl("fast", 64, 128)
