"""tools/bench_train.py on CPU with tiny shapes, plus the numerics of the speed work it measures.

Nothing here needs a GPU: the GPU figures live in docs/performance.md with the commands that produced them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picochat_jax.config import ModelConfig
from picochat_jax.model.layers import attend, resolve_attention_impl, swiglu_packed
from picochat_jax.model.loss import ce_chunk_rows, loss_sums
from picochat_jax.model.transformer import (
    Decoder,
    default_scan_unroll,
    init_params,
    make_model,
    softmax_cross_entropy,
    training_model,
    vocab_logits,
)
from picochat_jax.train.step import apply_gpu_xla_flags

TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--d-ff", "64", "--vocab", "128",
        "--seq-len", "32", "--batch-size", "8", "--steps", "3", "--warmup", "2", "--matmul-size", "128"]


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_train")


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def _tiny_cfg(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                       tie_embeddings=tie, qk_norm=True)


@pytest.mark.slow
def test_bench_times_a_tiny_step_on_cpu(bench, tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--precision", "fp32", "--segments", "8", "--json-out", str(out)])
    saved = json.loads(out.read_text())
    (r,) = saved["results"]
    assert r == json.loads(json.dumps(report["results"][0]))
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      norm_eps=1e-6, tie_embeddings=True, qk_norm=True)
    assert r["platform"] == "cpu" and r["options"]["attention_resolved"] == "xla"
    assert r["options"]["scan_unroll"] == 1  # the rolled scan off-GPU, as training uses
    assert r["shape"]["params"] == cfg.num_params()
    assert r["flops_per_token"] == cfg.flops_per_token(32)
    assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    tokens = 8 * 32
    assert r["tokens_per_sec"] == pytest.approx(tokens / (r["step_ms"] / 1e3))
    assert r["model_tflops_per_device"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token"] / 1e12 / 8)
    assert r["matmul_tflops"] > 0 and r["mfu"] == pytest.approx(r["model_tflops_per_device"] / r["matmul_tflops"])
    assert np.isfinite(r["first_loss"]) and np.isfinite(r["last_loss"])
    assert r["first_loss"] == pytest.approx(np.log(128), rel=0.05)  # random init predicts ~uniformly


def test_bench_remat_defaults_to_what_the_scale_trains_with(bench):
    """A bench of a scale measures the step its trainer runs: h200-1b's remat dots, not the bare step."""
    from picochat_jax.parallel import MeshShape, check_batch_fits

    def remat(*flags: str, batch: int = 16, mesh: MeshShape | None = None) -> str:
        args = bench.build_parser().parse_args(list(flags))
        rows = check_batch_fits(batch, mesh or MeshShape(1, 1, 1))
        return bench.bench_remat(args, bench.model_config(args), rows)

    assert remat("--scale", "h200-1b") == "dots"
    assert remat("--scale", "h200-1b", "--remat", "none") == "none"  # an explicit choice wins
    assert remat(*TINY) == "none"  # no scale: the bare step
    # pico's remat is auto: full on this CPU at 8 rows a device, none once the rows are split eight ways
    assert remat("--scale", "pico", "--precision", "fp32", batch=8) == "full"
    assert remat("--scale", "pico", "--precision", "fp32", batch=8, mesh=MeshShape(8, 1, 1)) == "none"


def test_timing_windows_sync_once_per_window_and_count_every_step(bench):
    calls = []

    def step(state, batch):
        calls.append(batch)
        return state + 1, {"loss": jnp.float32(2.0) / (state + 1)}

    state, times, _, first, last = bench.time_steps(step, jnp.int32(0), [0, 1, 2], warmup=2, steps=7,
                                                    sync_every=3)
    assert int(state) == 2 + 6 and len(times) == 2  # two whole windows of three; the odd step is not timed
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1]  # batches cycle on from where the warm-up stopped
    assert first == pytest.approx(2.0) and last == pytest.approx(2.0 / 8)
    _, times, *_ = bench.time_steps(step, jnp.int32(0), [0], warmup=1, steps=2, sync_every=5)
    assert len(times) == 1  # fewer steps than a window: still one window, never an empty median
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--sync-every", "0"])


def test_variant_specs_become_child_flags(bench):
    name, argv = bench.parse_variant("fast:attention=cudnn,ce_chunk=8192, scan-unroll=2,profile=1")
    assert name == "fast"
    assert argv == ["--attention=cudnn", "--ce-chunk=8192", "--scan-unroll=2", "--profile"]
    assert bench.parse_variant("slow:profile=0") == ("slow", [])
    # A value that is itself an option-like string (XLA flags) stays one value.
    name, argv = bench.parse_variant("flags:extra_xla_flags=--xla_gpu_enable_triton_gemm=false,qk_norm=off")
    assert argv == ["--extra-xla-flags=--xla_gpu_enable_triton_gemm=false", "--qk-norm=off"]
    args = bench.build_parser().parse_args(argv)
    assert args.extra_xla_flags == "--xla_gpu_enable_triton_gemm=false" and args.qk_norm == "off"
    with pytest.raises(SystemExit):
        bench.parse_variant("bad:no_such_option=1")
    with pytest.raises(SystemExit):
        bench.parse_variant("bad:attention")
    kept = bench.base_argv(["--scale", "x", "--variant", "a:b=c", "--peer", "torch", "--peer-clip",
                            "--peer-arch", "qwen3", "--json-out=o.json", "--steps", "5"])
    assert kept == ["--scale", "x", "--steps", "5"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_torch_peer_runs_eager_on_cpu(tmp_path, arch, load_tool):
    peer = load_tool("torch_baseline")
    out = tmp_path / "peer.json"
    r = peer.main(["--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--d-ff", "64",
                   "--vocab", "128", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                   "--precision", "fp32", "--no-compile", "--matmul-size", "64", "--arch", arch,
                   "--json-out", str(out)])
    assert json.loads(out.read_text())["tokens_per_sec"] == pytest.approx(r["tokens_per_sec"])
    assert r["tokens_per_sec"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
    # Our parameter count and FLOP convention for the same shape: Llama, or Qwen3 = Llama + QK-norm.
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      tie_embeddings=True, qk_norm=arch == "qwen3")
    assert r["arch"] == arch and r["params"] == cfg.num_params()
    assert r["flops_per_token"] == cfg.flops_per_token(32)


@pytest.mark.slow
@pytest.mark.parametrize("tie,chunks", [(True, (16, 40)), (False, (40,))])
def test_chunked_cross_entropy_matches_whole_batch_logits(tie, chunks):
    cfg = _tiny_cfg(tie)
    model = make_model(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(1)
    B, T = 6, 16
    batch = {"inputs": rng.integers(0, 97, (B, T)).astype(np.int32),
             "targets": rng.integers(0, 97, (B, T)).astype(np.int32),
             "loss_mask": (rng.random((B, T)) < 0.8).astype(np.float32),
             "segment_ids": np.cumsum(rng.random((B, T)) < 0.2, axis=1).astype(np.int32)}
    token_bytes = jnp.asarray(rng.integers(1, 4, 97), jnp.float32)
    grad = jax.jit(jax.value_and_grad(lambda p, c: loss_sums(model, p, batch, token_bytes, c)[0]),
                   static_argnums=1)
    ref_loss, ref_grads = grad(params, 0)
    for chunk in chunks:  # 1 row per chunk; 40 tokens = 2.5 rows, rounded down to 2 (a divisor of B)
        loss, grads = grad(params, chunk)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * max(float(jnp.max(jnp.abs(b))), 1e-3)


def test_ce_chunk_rows_divides_the_batch():
    assert ce_chunk_rows(64, 512, 8192) == 16
    assert ce_chunk_rows(6, 16, 40) == 2
    assert ce_chunk_rows(7, 16, 40) == 1
    assert ce_chunk_rows(4, 512, 1) == 1
    assert ce_chunk_rows(4, 16, 10**6) == 4


def test_layers_unroll_on_gpu_only():
    cfg = _tiny_cfg(True)
    assert default_scan_unroll(cfg) == 1  # CPU here
    assert default_scan_unroll(cfg, platform="gpu") == cfg.n_layers
    assert default_scan_unroll(cfg, platform="tpu") == 1


def test_unrolled_decoder_computes_the_same_function():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                      qk_norm=True)
    rolled, unrolled = make_model(cfg), make_model(cfg, scan_unroll=3)
    params = init_params(rolled, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 16)), jnp.int32)
    a = rolled.apply({"params": params}, tokens)
    b = unrolled.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("activation,bias,qk_norm,position", [
    ("swiglu", False, True, "rope"), ("swiglu", True, False, "rope"), ("relu2", False, True, "learned")])
def test_fused_projections_compute_the_same_function_and_gradients(activation, bias, qk_norm, position):
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                      qk_norm=qk_norm, activation=activation, qkv_bias=bias, mlp_bias=bias, position=position)
    fused, split = make_model(cfg, fuse_projections=True), make_model(cfg, fuse_projections=False)
    params = init_params(fused, jax.random.key(0))
    split_params = init_params(split, jax.random.key(0))
    # Same tree, same initial values: checkpoints and the HF bridge cannot tell the two apart.
    assert jax.tree.structure(params) == jax.tree.structure(split_params)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(split_params),
                                                       strict=True))
    if bias:  # zero-initialised biases would hide a bias mix-up
        params = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / x.size,
                              params)
    if qk_norm:  # ones-initialised norm scales would hide a q/k scale mix-up
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * (1.0 + 0.3 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)))
            if "norm" in jax.tree_util.keystr(path) else x, params)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 16)), jnp.int32)
    a = fused.apply({"params": params}, tokens)
    b = split.apply({"params": params}, tokens)
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
    # The custom VJPs (packed q|k|v and gate|up gradients) against autodiff of the unfused model.
    probe = jnp.asarray(np.random.default_rng(6).standard_normal(a.shape), jnp.float32)
    g_fused, g_split = (jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, tokens) * probe))(params)
                        for m in (fused, split))
    # The K bias's true gradient is zero (softmax ignores a per-query constant), so leaves are compared at a
    # floor of 1e-3 of the whole gradient's norm rather than against their own rounding noise.
    floor = 1e-3 * float(_tree_norm(g_split))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_fused), jax.tree.leaves(g_split), strict=True):
        rel = float(jnp.linalg.norm(x - y)) / max(float(jnp.linalg.norm(y)), floor)
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_swiglu_gradient_matches_autodiff_of_the_split_form(dtype):
    rng = np.random.default_rng(8)
    gate_up = jnp.asarray(rng.standard_normal((2, 5, 12)) * 3, dtype)
    probe = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)

    def split_form(gu):
        gate, up = jnp.split(gu.astype(jnp.float32), 2, axis=-1)
        return jnp.sum(jax.nn.silu(gate) * up * probe)

    ours = jax.grad(lambda gu: jnp.sum(swiglu_packed(gu).astype(jnp.float32) * probe))(gate_up)
    ref = jax.grad(split_form)(gate_up.astype(jnp.float32))
    assert ours.dtype == dtype and ours.shape == gate_up.shape
    rel = float(jnp.linalg.norm(ours.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < (1e-6 if dtype == jnp.float32 else 1e-2), rel


def test_training_model_fuses_projections_unless_the_mesh_has_a_tensor_axis():
    cfg = _tiny_cfg(True)
    assert training_model(cfg, "bf16", "none", tensor_parallel=1).fuse_projections
    assert not training_model(cfg, "bf16", "none", tensor_parallel=2).fuse_projections
    assert training_model(cfg, "bf16", "none", 1).scan_unroll == 1  # CPU: rolled
    assert training_model(cfg, "bf16", "none", 1, scan_unroll=2).scan_unroll == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_cross_entropy_matches_optax_in_value_and_gradient(dtype):
    import optax

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 8, 16)), dtype)
    w = jnp.asarray(rng.standard_normal((50, 16)) / 4, dtype)
    targets = jnp.asarray(rng.integers(0, 50, (3, 8)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 8)), jnp.float32)  # a masked, weighted sum, as the train step takes

    def ours(x, w):
        return jnp.sum(softmax_cross_entropy(x, w, targets) * weights)

    def reference(x, w):
        logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), w.astype(jnp.float32))
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

    (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1))(x, w) for f in (ours, reference))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6 if dtype == jnp.float32 else 1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype  # the logit gradient is cast to the compute dtype once, before the matmuls
        rel = float(jnp.linalg.norm(g.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        assert rel < tol, rel


@pytest.mark.parametrize("tie", [True, False])
def test_train_loss_uses_the_fused_cross_entropy_of_the_logits(tie):
    import optax

    cfg = _tiny_cfg(tie)
    model = make_model(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    ce = model.apply({"params": params}, hidden, targets, method=Decoder.token_cross_entropy)
    ref = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, tokens), targets)
    assert float(jnp.max(jnp.abs(ce - ref))) < 1e-5


def test_attention_choice_follows_platform_and_dtype():
    assert resolve_attention_impl(None, jnp.bfloat16, 64) == "xla"  # these tests run on CPU
    assert resolve_attention_impl("auto", jnp.bfloat16, 64, platform="gpu") == "cudnn"
    assert resolve_attention_impl(None, jnp.float32, 64, platform="gpu") == "xla"
    assert resolve_attention_impl(None, jnp.bfloat16, 20, platform="gpu") == "xla"
    assert resolve_attention_impl(None, jnp.bfloat16, 256, platform="gpu") == "xla"
    assert resolve_attention_impl("pallas", jnp.float32, 64) == "pallas"
    with pytest.raises(ValueError, match="attention implementation"):
        resolve_attention_impl("flash", jnp.bfloat16, 64)


def test_vocab_logits_backward_stays_in_bf16_and_float32_is_untouched():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
    plain = lambda x, w: jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)  # noqa: E731
    assert jnp.array_equal(vocab_logits(x, w), plain(x, w))
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(plain(x, w))), argnums=(0, 1))(x, w)
    g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(vocab_logits(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert jnp.array_equal(a, b)

    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    loss = lambda x, w: jnp.sum(jnp.sin(vocab_logits(x, w)))  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(xb, wb).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
    assert len(dots) == 3 and not any("xf32>, tensor<" in ln.split("->")[0] for ln in dots), dots
    gb = jax.grad(loss, argnums=(0, 1))(xb, wb)
    for a, b in zip(gb, g_ref, strict=True):
        rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert rel < 3e-2


@pytest.mark.slow
def test_segment_masked_flash_kernel_matches_xla():
    """The Pallas kernel (interpreted on CPU) masks documents exactly as the XLA path's boolean mask does."""
    rng = np.random.default_rng(3)
    B, T, H, K, D = 2, 32, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, D)), jnp.float32) for n in (H, K, K))
    seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.15, axis=1), jnp.int32)
    mask = (jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    ref = attend(q, k, v, mask, None, "xla")
    out = attend(q, k, v, None, seg, "pallas")
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
    g_ref = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, None, "xla") ** 2), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, None, seg, "pallas") ** 2), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref, strict=True):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-4


def test_gpu_xla_flags_are_opt_in_and_not_duplicated():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"}
    value = apply_gpu_xla_flags(("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_foo=1"), env)
    assert value == ("--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false "
                     "--xla_gpu_foo=1")  # a flag the user set wins over ours
    assert apply_gpu_xla_flags(("--xla_gpu_foo=1",), env) == value
    assert apply_gpu_xla_flags(("--a=1",), {}) == "--a=1"


def test_collectives_tool_reads_a_meshes_communication_on_cpu(load_tool, capsys):
    """tools/collectives.py on the test session's 8 CPU devices: data parallelism moves only gradients
    (all-reduce), FSDP gathers params too."""
    tool = load_tool("collectives")
    common = ["--scale", "smoke", "--layers", "1", "--batch-size", "8", "--seq-len", "16"]
    data = tool.main([*common, "--mesh", "8x1"])
    fsdp = tool.main([*common, "--mesh", "1x8"])
    assert set(data["bytes"]) == {"all-reduce"}
    assert "all-gather" in fsdp["bytes"]
    assert "bytes by collective" in capsys.readouterr().out
    counted = tool.count_collectives("%x = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce(%a, %b), channel_id=1")
    assert counted["bytes"] == {"all-reduce": 4 * 8 * 4 + 2 * 2}


@pytest.mark.slow
def test_kernel_bench_times_every_tuning_and_the_xla_path_on_cpu(load_tool, tmp_path):
    tool = load_tool("bench_kernels")
    out = tmp_path / "kernels.json"
    report = tool.main(["--batch", "2", "--seq", "32", "--interpret", "--windows", "1", "--calls", "1",
                        "--blocks", "16,32", "--warps", "4", "--json-out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    seen = {(r["kernel"], r["impl"], r.get("max_block")) for r in report["rows"]}
    for block in (16, 32):
        assert {("norm_rope_fwd", "pallas", block), ("norm_rope_bwd", "pallas", block),
                ("rms_norm_bwd", "pallas", block)} <= seen
    assert {("norm_rope_fwd", "xla", None), ("rms_norm_bwd", "xla", None), ("swiglu_bwd", "xla", None)} <= seen
    for r in report["rows"]:
        assert r["ms"] > 0 and r["gb_per_s"] == pytest.approx(r["traffic_mb"] * 1e6 / (r["ms"] / 1e3) / 1e9)


@pytest.mark.slow
def test_bench_data_smoke(tmp_path, load_tool):
    """tools/bench_data.py end to end on a 2 MB corpus: every figure present and sane (not a speed claim)."""
    bench = load_tool("bench_data")
    import sys

    argv = sys.argv
    sys.argv = ["bench_data.py", "--corpus-mb", "2", "--small-mb", "1", "--vocab-size", "512", "--train-steps", "2",
                "--out", str(tmp_path / "out")]
    try:
        bench.main()
    finally:
        sys.argv = argv
    result = json.loads((tmp_path / "out" / "bench_data.json").read_text())
    assert result["tokenize"]["tokens"] == result["raw_encode"]["tokens"] + result["tokenize"]["documents"]  # + BOS
    assert result["loader"]["tokens_per_sec"] > 0 and result["train_base_rss"]["big"]["peak_rss_mb"] > 0
    assert "encode_batch_fast" in (tmp_path / "out" / "bench_data.md").read_text()


def test_remat_keeps_the_layer_scan_rolled(monkeypatch):
    """Unrolled, XLA keeps the activations remat was meant to drop (it merges or hoists the recompute), so a
    remat run stays rolled even where layers are unrolled by default; the compiled program shows the saving."""
    from picochat_jax.model import transformer

    cfg = dataclasses.replace(_tiny_cfg(True), n_layers=4, d_ff=256, max_seq_len=128)
    monkeypatch.setattr(transformer, "default_scan_unroll", lambda c, platform=None: c.n_layers)  # as on a GPU
    assert training_model(cfg, "fp32", "none", 1).scan_unroll == cfg.n_layers
    assert training_model(cfg, "fp32", "full", 1).scan_unroll == 1
    assert training_model(cfg, "fp32", "full", 1, scan_unroll=2).scan_unroll == 2  # an explicit choice wins
    tokens = jnp.zeros((8, 128), jnp.int32)
    params = transformer.init_params(make_model(cfg), jax.random.key(0))

    def temp_bytes(model: transformer.Decoder) -> int:
        grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).mean()))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    unrolled_remat = make_model(cfg, remat="full", scan_unroll=cfg.n_layers)
    assert temp_bytes(training_model(cfg, "fp32", "full", 1)) < 0.8 * temp_bytes(unrolled_remat)


def test_embed_grad_bench_times_each_way_and_shows_the_bf16_sum_drift(load_tool, tmp_path):
    """bench_embed_grad.py: a row per (id distribution, way), with the way's error against the exact sum; on
    Zipf ids the bf16 scatter drifts and the float32 ways do not."""
    tool = load_tool("bench_embed_grad")
    rows = tool.main(["--vocab", "64", "--width", "8", "--tokens", "2048", "--iters", "1",
                      "--json-out", str(tmp_path / "e.json")])
    assert [(r["ids"], r["impl"]) for r in rows] == [(d, i) for d in ("uniform", "zipf1.1")
                                                     for i in ("scatter", "scatter_f32", "onehot")]
    zipf = {r["impl"]: r for r in rows if r["ids"] == "zipf1.1"}
    assert zipf["scatter"]["max_abs_diff"] > 1e-2 * zipf["scatter"]["max_abs_grad"]
    assert zipf["scatter_f32"]["max_abs_diff"] < 1e-5 * zipf["scatter"]["max_abs_grad"]
    assert zipf["onehot"]["max_abs_diff"] < 1e-5 * zipf["scatter"]["max_abs_grad"]
    assert (tmp_path / "e.json").exists()


def test_idle_gaps_count_only_time_when_no_stream_runs_a_kernel(bench):
    # Two streams overlap from 5 to 10; nothing runs 12-20 and 30-31 (microseconds).
    kernels = [(0.0, 10.0, "gemm"), (5.0, 12.0, "nccl"), (20.0, 30.0, "fusion"), (31.0, 40.0, "attention")]
    gaps = bench.idle_gaps(kernels, steps=1)
    assert gaps["idle_ms_per_step"] == pytest.approx(9e-3)
    assert gaps["longest_idle_gaps"] == [{"ms": 8e-3, "after": "nccl", "before": "fusion"},
                                         {"ms": 1e-3, "after": "fusion", "before": "attention"}]
    assert bench.idle_gaps(kernels, steps=3)["idle_ms_per_step"] == pytest.approx(3e-3)
