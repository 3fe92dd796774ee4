#!/usr/bin/env python
"""Time picochat-jax's jitted train step on one shape, optionally against a PyTorch peer on the same card.

One measurement = `build_trainer` on a mesh, synthetic random tokens, warm-up steps (compilation) excluded,
timed steps synchronised with `block_until_ready` (after every step, or after windows of `--sync-every` steps
so the host dispatches ahead as the training driver does), the median step reported as tokens/s, model
TFLOP/s (ModelConfig.flops_per_token) and MFU against a bf16 matmul rate measured in the same process, plus
the device's peak memory.

    python tools/bench_train.py --scale h100-100m --peer torch --json-out bench.json
    python tools/bench_train.py --scale h100-100m --variant xla:attention=xla --variant cudnn:attention=cudnn
    python tools/bench_train.py --d-model 64 --layers 2 --heads 4 --kv-heads 2 --d-ff 128 --vocab 256 \\
        --seq-len 64 --batch-size 8 --steps 3          # CPU smoke run

With several `--variant NAME:key=value,...` (keys: any option below, dashes or underscores) or `--peer`,
each measurement runs in its own process: XLA_FLAGS take effect per variant, peak memory is per variant,
a variant that crashes is reported rather than ending the sweep, and the torch peer never shares the
card's memory with XLA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE_FLAGS = {  # flag -> ModelConfig field
    "d_model": "d_model", "layers": "n_layers", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "d_ff": "d_ff", "vocab": "vocab_size", "seq_len": "max_seq_len",
}
DATASHEET_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("shape (a --scale, then these override it)")
    shape.add_argument("--scale", default=None, help="named scale from configs/ (e.g. h100-100m, h200-1b)")
    for flag in SHAPE_FLAGS:
        shape.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    shape.add_argument("--qk-norm", choices=["scale", "on", "off"], default="scale",
                       help="off = the torch peer's exact architecture (Llama has no QK-norm); scale = as configured")
    shape.add_argument("--batch-size", type=int, default=None, help="global batch (default: the scale's base batch)")
    shape.add_argument("--grad-accum", type=int, default=1)
    opt = p.add_argument_group("optimisations (each can be switched to measure what it buys)")
    opt.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    opt.add_argument("--remat", choices=["scale", "none", "full", "dots", "dots_all"], default="scale",
                     help="scale = the scale's train.remat as its trainer resolves it for this device and "
                          "micro-batch (none without --scale)")
    opt.add_argument("--attention", choices=["auto", "xla", "cudnn", "pallas"], default="auto",
                     help="auto = cuDNN flash attention on GPU in bf16, XLA elsewhere")
    opt.add_argument("--ce-chunk", type=int, default=0,
                     help="cross-entropy from the hidden state in chunks of ~N tokens (0 = whole-batch logits)")
    opt.add_argument("--scan-unroll", type=int, default=0,
                     help="decoder layers per scan iteration (0 = what training uses: all of them on GPU, 1 elsewhere)")
    opt.add_argument("--segments", type=int, default=0,
                     help="pack documents of mean length N per row (segment-masked attention, as base "
                          "pretraining does); 0 = plain causal rows like the torch peer")
    opt.add_argument("--zipf", type=float, default=0.0,
                     help="draw token ids from a Zipf law with this exponent (e.g. 1.1, like real text) instead of "
                          "uniformly: repeated ids make the embedding gradient's scatter-add contend")
    opt.add_argument("--positions", action="store_true",
                     help="with --segments: per-segment positions restarting at each document, as the shard "
                          "loader (data/shards.py) feeds base pretraining")
    opt.add_argument("--fuse-projections", choices=["on", "off"], default="on",
                     help="q/k/v and gate/up as one matmul each (what training uses unless the mesh has a tensor axis)")
    opt.add_argument("--norm-rope", choices=["auto", "xla", "pallas", "mosaic"], default="auto",
                     help="QK-norm + RoPE: auto = the fused Pallas kernels on GPU (model/norm_rope_kernel.py), "
                          "XLA elsewhere; mosaic = their Mosaic GPU port (model/norm_rope_mgpu.py)")
    opt.add_argument("--rms-norm", choices=["auto", "xla", "pallas", "mosaic"], default="auto",
                     help="the pre-norms' backward: auto = the Pallas kernel on GPU (model/rms_norm_kernel.py), "
                          "XLA elsewhere; mosaic = its Mosaic GPU port (model/rms_norm_mgpu.py)")
    opt.add_argument("--swiglu-grad", choices=["auto", "packed", "split", "mosaic"], default="auto",
                     help="the SwiGLU MLP's gate/up backward: packed = one (N, 2F) gradient from XLA, split = d_gate "
                          "and d_up apart (ops.swiglu_gate_up), mosaic = the packed gradient from the Mosaic GPU "
                          "kernel (model/swiglu_mgpu.py); auto = mosaic on GPU (split on shapes it does not take)")
    opt.add_argument("--embed-grad", choices=["auto", "scatter", "scatter_f32", "onehot"], default="auto",
                     help="how the embedding gradient is summed (model/ops.py EMBED_GRAD_IMPLS): auto = float32 "
                          "scatter")
    opt.add_argument("--xla-flags", choices=["none", "gpu"], default="none",
                     help="gpu = picochat_jax.train.step.GPU_XLA_FLAGS added to XLA_FLAGS")
    opt.add_argument("--extra-xla-flags", default="", help="more XLA flags, verbatim")
    run = p.add_argument_group("run")
    run.add_argument("--mode", choices=["step", "loop", "check-attention"], default="step",
                     help="step = time the jitted step alone; loop = run the real train() driver (grain "
                          "prefetch, host->device copies, metrics) and report its own tokens/s; "
                          "check-attention = compare every attention kernel against float32 XLA, then exit")
    run.add_argument("--steps", type=int, default=20, help="timed steps")
    run.add_argument("--sync-every", type=positive_int, default=1,
                     help="synchronise after windows of N steps and take the median window / N (1 = after every "
                          "step); N > 1 lets the host queue the next step while this one runs, as the training "
                          "driver does between log steps. The torch peer is timed the same way")
    run.add_argument("--profile", action="store_true",
                     help="trace 3 more steps with jax.profiler and add GPU kernel time by kernel and category")
    run.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    run.add_argument("--mesh", default=None, help="DATAxFSDP[xTENSOR] (default: all devices on the data axis)")
    run.add_argument("--matmul-size", type=int, default=None,
                     help="n of the n^3 bf16 matmul that calibrates MFU (default 8192 on GPU, 512 elsewhere; 0 = skip)")
    run.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                     help="measure this variant (repeatable); keys are the options above")
    run.add_argument("--peer", choices=["none", "torch"], default="none",
                     help="torch = also time transformers' LlamaForCausalLM "
                          "(torch.compile, bf16 autocast, fused AdamW)")
    run.add_argument("--peer-arch", choices=["llama", "qwen3"], default="llama",
                     help="llama = transformers' LlamaForCausalLM (the baseline); qwen3 = Qwen3ForCausalLM, the same "
                          "shape plus QK-norm, like h100-100m")
    run.add_argument("--peer-no-compile", action="store_true", help="eager peer (CPU smoke runs)")
    run.add_argument("--peer-clip", action="store_true", help="peer also clips grad norm (our step always does)")
    run.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    run.add_argument("--json-out", type=Path, default=None)
    run.add_argument("--label", default=None, help="name of the single measurement in the table")
    run.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # write the bare result JSON
    return p


# ----------------------------------------------------------------------------------------------- one measurement


def model_config(args: argparse.Namespace) -> Any:
    from picochat_jax.config import ModelConfig, load_scale, with_overrides

    overrides = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    if args.qk_norm != "scale":
        overrides["qk_norm"] = args.qk_norm == "on"
    if args.scale:
        return with_overrides(load_scale(args.scale).model, **overrides)
    missing = [f"--{flag.replace('_', '-')}" for flag, field in SHAPE_FLAGS.items() if overrides[field] is None]
    if missing:
        raise SystemExit(f"without --scale, give the whole shape; missing {' '.join(missing)}")
    overrides.setdefault("qk_norm", True)
    return ModelConfig(**overrides, norm="rmsnorm", norm_eps=1e-6, activation="swiglu", tie_embeddings=True)


def bench_remat(args: argparse.Namespace, cfg: Any, rows: int) -> str:
    """The remat policy a measurement runs: --remat, or with `scale` what training at this scale would use for
    `rows` per device."""
    if args.remat != "scale":
        return args.remat
    if not args.scale:
        return "none"
    from picochat_jax.config import load_scale
    from picochat_jax.model.transformer import resolve_remat

    return resolve_remat(load_scale(args.scale).base.remat, cfg, rows, cfg.max_seq_len, args.precision)


def default_batch(args: argparse.Namespace) -> int:
    if args.batch_size:
        return args.batch_size
    if args.scale:
        from picochat_jax.config import load_scale

        return load_scale(args.scale).base.batch_size
    return 8


def zipf_ids(rng: Any, vocab: int, shape: Any, exponent: float) -> Any:
    """int32 ids of `shape` drawn from a Zipf law of `exponent` over ranks, the frequent ranks spread over the
    vocabulary by a random permutation (as real text's frequent tokens are)."""
    import numpy as np

    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    ranks = rng.choice(vocab, shape, p=p / p.sum())
    return rng.permutation(vocab)[ranks].astype(np.int32)


def synthetic_batches(cfg: Any, batch: int, accum: int, seq: int, segments: int, count: int = 4,
                      seed: int = 0, positions: bool = False, zipf: float = 0.0) -> list[dict[str, Any]]:
    """Random tokens (never zeros: they can run faster than real data), optional packed-document ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        shape = (accum, batch, seq)
        if zipf > 0:
            ids = zipf_ids(rng, cfg.vocab_size, (2, *shape), zipf)
        else:
            ids = rng.integers(0, cfg.vocab_size, (2, *shape), dtype=np.int32)
        b = {"inputs": ids[0], "targets": ids[1], "loss_mask": np.ones(shape, np.float32)}
        if segments > 0:
            starts = rng.random(shape) < 1.0 / segments
            starts[..., 0] = True
            b["segment_ids"] = np.cumsum(starts, axis=-1).astype(np.int32)
            if positions:
                index = np.broadcast_to(np.arange(seq), shape)
                first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
                b["positions"] = (index - first).astype(np.int32)
        out.append(b)
    return out


def matmul_tflops(n: int, reps: int = 20) -> float | None:
    """bf16 n^3 matmul rate through a jitted jnp.dot, launches queued back to back, synchronised once.

    bf16 in, bf16 out (cuBLAS accumulates in float32 either way), like the torch peer's `a @ b`. An earlier
    version asked for a float32 result and cast it down; it read 697-718 TFLOP/s where the peer's read
    772-788 on the same H100 (docs/performance.md), most likely that extra pass over the output.
    """
    if n <= 0:
        return None
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        outs = [mm(a, b) for _ in range(reps)]
        jax.block_until_ready(outs)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
        del outs
    return max(rates)


def device_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__}


def peak_memory_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None  # CPU backends keep no allocator statistics
    return stats["peak_bytes_in_use"] / 2**30


def timed_windows(run_step: Callable[[], Any], sync: Callable[[], Any], steps: int, sync_every: int) -> list[float]:
    """Seconds per step of each window of `sync_every` calls of `run_step`, `sync` called once at the window's
    end; `steps // sync_every` windows, at least one. Shared by our step and the torch peer, so both are timed
    alike."""
    times = []
    for _ in range(max(1, steps // sync_every)):
        t = time.perf_counter()
        for _ in range(sync_every):
            run_step()
        sync()
        times.append((time.perf_counter() - t) / sync_every)
    return times


def time_steps(step: Any, state: Any, batches: list[Any], warmup: int, steps: int,
               t0: float | None = None, sync_every: int = 1) -> tuple[Any, list[float], float, float, float]:
    """Run `warmup` untimed steps (the first compiles), then `steps` timed ones in windows of `sync_every`,
    each window synchronised at its end (at least one window).

    Returns (state, seconds per step of each window, seconds to the end of the first step since `t0`, first
    loss, last loss); a non-finite last loss raises: a configuration that does not train has no speed worth
    reporting.
    """
    import jax

    t0 = time.perf_counter() if t0 is None else t0
    state, metrics = step(state, batches[0])
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    first_loss = float(metrics["loss"])
    for i in range(1, warmup):
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    i = warmup

    def one_step() -> None:
        nonlocal state, metrics, i
        state, metrics = step(state, batches[i % len(batches)])
        i += 1

    times = timed_windows(one_step, lambda: jax.block_until_ready((state, metrics)), steps, sync_every)
    last_loss = float(metrics["loss"])
    if not math.isfinite(last_loss):
        raise RuntimeError(f"loss is {last_loss}: this configuration does not train")
    return state, times, compile_s, first_loss, last_loss


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, compile and time the train step for one configuration, in this process."""
    import jax
    import numpy as np

    from picochat_jax.config import TrainConfig, load_scale
    from picochat_jax.model.ops import (
        resolve_attention_impl,
        resolve_embed_grad_impl,
        resolve_norm_rope_impl,
        resolve_rms_norm_impl,
        resolve_swiglu_grad_impl,
    )
    from picochat_jax.model.transformer import compute_dtype, count_params, training_model
    from picochat_jax.parallel import check_batch_fits, make_mesh, parse_mesh
    from picochat_jax.train.optim import make_optimizer
    from picochat_jax.train.step import build_trainer

    cfg = model_config(args)
    seq = cfg.max_seq_len
    batch = default_batch(args)
    mesh_shape = parse_mesh(args.mesh)
    rows = check_batch_fits(batch, mesh_shape)
    info = device_info()
    n = args.matmul_size if args.matmul_size is not None else (8192 if info["platform"] == "gpu" else 512)
    mm_rate = matmul_tflops(n)

    base = load_scale(args.scale).base if args.scale else load_scale("smoke").base
    train_cfg = TrainConfig(**{**base.__dict__, "steps": 10_000, "warmup_steps": 10, "batch_size": batch,
                               "grad_accum_steps": args.grad_accum, "precision": args.precision,
                               "remat": "none"})
    remat = bench_remat(args, cfg, rows)
    model = training_model(cfg, args.precision, remat, mesh_shape.tensor,
                           None if args.attention == "auto" else args.attention, args.scan_unroll)
    if args.fuse_projections == "off":
        model = model.clone(fuse_projections=False)
    if args.norm_rope != "auto":
        model = model.clone(norm_rope_impl=args.norm_rope)
    if args.rms_norm != "auto":
        model = model.clone(rms_norm_impl=args.rms_norm)
    if args.embed_grad != "auto":
        model = model.clone(embed_grad_impl=args.embed_grad)
    if args.swiglu_grad != "auto":
        model = model.clone(swiglu_grad_impl=args.swiglu_grad)
    unroll = model.scan_unroll
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, optimizer, schedule, np.ones(cfg.vocab_size, np.float32), make_mesh(mesh_shape),
                            ce_chunk_tokens=args.ce_chunk)
    batches = [trainer.put_batch(b) for b in synthetic_batches(cfg, batch, args.grad_accum, seq, args.segments,
                                                                positions=args.positions, zipf=args.zipf)]

    t0 = time.perf_counter()
    state = trainer.init(jax.random.key_data(jax.random.key(0)))
    timed = time_steps(trainer.step, state, batches, args.warmup, args.steps, t0, args.sync_every)
    state, times, compile_s, first_loss, last_loss = timed
    profile = None
    if args.profile:
        state, profile = profile_steps(trainer.step, state, batches, n=max(3, args.sync_every))

    step_s = statistics.median(times)
    tokens = batch * args.grad_accum * seq
    fpt = cfg.flops_per_token(seq)
    model_tflops = tokens / step_s * fpt / 1e12 / mesh_shape.size
    kind = info["device_kind"].lower()
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in kind), None)
    return {
        "label": args.label or "jax",
        **info,
        "shape": {"scale": args.scale, **{f: getattr(cfg, f) for f in SHAPE_FLAGS.values()},
                  "batch_size": batch, "grad_accum": args.grad_accum, "params": count_params(state.params)},
        "options": {"precision": args.precision, "remat": remat, "attention": args.attention,
                    "attention_resolved": resolve_attention_impl(
                        None if args.attention == "auto" else args.attention,
                        compute_dtype(args.precision), cfg.resolved_head_dim),
                    "ce_chunk": args.ce_chunk, "scan_unroll": unroll, "segments": args.segments,
                    "positions": args.positions, "zipf": args.zipf,
                    "fuse_projections": model.fuse_projections, "qk_norm": cfg.qk_norm,
                    "norm_rope": resolve_norm_rope_impl(model.norm_rope_impl, cfg.qk_norm, cfg.position == "rope",
                                                        batch * seq, cfg.resolved_head_dim),
                    "rms_norm": resolve_rms_norm_impl(model.rms_norm_impl, cfg.norm, batch * seq, cfg.d_model),
                    "embed_grad": resolve_embed_grad_impl(model.embed_grad_impl),
                    "swiglu_grad": resolve_swiglu_grad_impl(model.swiglu_grad_impl, batch * seq, cfg.d_ff,
                                                            dtype=compute_dtype(args.precision)),
                    "mesh": str(mesh_shape), "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "steps": args.steps, "sync_every": args.sync_every, "warmup": args.warmup, "compile_s": compile_s,
        "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "tokens_per_sec": tokens / step_s, "flops_per_token": fpt,
        "model_tflops_per_device": model_tflops, "matmul_size": n, "matmul_tflops": mm_rate,
        "mfu": (model_tflops / mm_rate) if mm_rate else None,
        "mfu_datasheet": (model_tflops / sheet) if sheet else None,
        "peak_mem_gib": peak_memory_gib(), "first_loss": first_loss, "last_loss": last_loss,
        "profile": profile,
    }


KERNEL_CATEGORIES = (  # first match wins; kernel names as cuBLAS/cuDNN/XLA/Triton emit them
    ("attention", re.compile(r"cudnn|fmha|flash|attention|mha", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|gmma|sm90_|dot", re.I)),
    ("scatter/gather", re.compile(r"scatter|gather", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy|dynamic_update_slice|dynamic_slice", re.I)),
    ("reduce", re.compile(r"reduce|reduction", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|input_|triton|convert|add|multiply", re.I)),
)


def profile_steps(step: Any, state: Any, batches: list[Any], n: int = 3) -> tuple[Any, dict[str, Any]]:
    """Trace `n` steps; GPU kernel time per step by kernel name and by coarse category."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            for i in range(n):
                state, metrics = step(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - start
        traces = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
        summary = summarize_trace(traces[-1], n) if traces else {"note": "no trace written"}
    # Wall clock of the traced window (dispatch of the first step to the last result): against the kernels'
    # span it shows how long the device waits before the first kernel and after the last.
    summary["wall_ms_per_step"] = wall / n * 1e3
    return state, summary


def summarize_trace(path: Path, steps: int) -> dict[str, Any]:
    import gzip

    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and re.search(r"GPU|device", str(e.get("args", {}).get("name", "")), re.I)}
    by_name: dict[str, list[float]] = {}
    first, last = float("inf"), 0.0
    intervals: list[tuple[float, float, str]] = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        entry = by_name.setdefault(str(e.get("name", "?")), [0.0, 0])
        entry[0] += float(e.get("dur", 0.0))
        entry[1] += 1
        begin, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        intervals.append((begin, end, str(e.get("name", "?"))))
        first, last = min(first, begin), max(last, end)
    if not by_name:
        return {"note": "no device kernel events in the trace (CPU backend?)"}
    categories: dict[str, float] = {}
    for name, (dur, _) in by_name.items():
        cat = next((c for c, rx in KERNEL_CATEGORIES if rx.search(name)), "other")
        categories[cat] = categories.get(cat, 0.0) + dur / steps / 1e3
    busy = sum(d for d, _ in by_name.values()) / steps / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
    return {"kernel_ms_per_step": busy, "span_ms_per_step": (last - first) / steps / 1e3,
            **idle_gaps(intervals, steps),
            "by_category_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:160], "ms_per_step": d / steps / 1e3, "calls_per_step": c / steps}
                            for n, (d, c) in top]}


def idle_gaps(intervals: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict[str, Any]:
    """Time inside the kernels' span when no kernel ran on any stream (trace microseconds in, ms out): the
    total a step, and the longest gaps with the kernels either side."""
    gaps: list[tuple[float, str, str]] = []
    reach, reach_name = None, ""
    for begin, end, name in sorted(intervals):
        if reach is not None and begin > reach:
            gaps.append((begin - reach, reach_name, name))
        if reach is None or end > reach:
            reach, reach_name = end, name
    gaps.sort(reverse=True)
    return {"idle_ms_per_step": sum(g for g, _, _ in gaps) / steps / 1e3,
            "longest_idle_gaps": [{"ms": g / 1e3, "after": a[:100], "before": b[:100]} for g, a, b in gaps[:top]]}


def measure_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Run `picochat_jax.train.loop.train` on synthetic packed rows: throughput as a real run sees it.

    Logged every 10 steps; the driver's summary averages the windows after the first (which compiles).
    """
    import numpy as np

    from picochat_jax.config import TrainConfig, load_scale
    from picochat_jax.parallel import check_batch_fits, parse_mesh
    from picochat_jax.train.loop import train

    cfg = model_config(args)
    batch, seq = default_batch(args), cfg.max_seq_len
    rows = synthetic_batches(cfg, batch * 8, 1, seq, args.segments, count=1)[0]
    examples = {k: v[0] for k, v in rows.items()}
    if "segment_ids" not in examples:
        examples["segment_ids"] = np.ones_like(examples["inputs"])
    windows = max(1, -(-args.steps // 10))
    base = load_scale(args.scale).base if args.scale else load_scale("smoke").base
    remat = bench_remat(args, cfg, check_batch_fits(batch, parse_mesh(args.mesh)))
    train_cfg = TrainConfig(**{**base.__dict__, "steps": 1 + 10 * windows, "warmup_steps": 10, "batch_size": batch,
                               "grad_accum_steps": args.grad_accum, "precision": args.precision,
                               "remat": remat if remat in ("none", "full", "dots") else "none",
                               "log_every": 10, "eval_every": 0, "checkpoint_every": 0})
    with tempfile.TemporaryDirectory() as out:
        result = train(stage="bench", model_cfg=cfg, train_cfg=train_cfg, train_rows=examples,
                       val_rows=None, out_dir=Path(out), mesh_shape=parse_mesh(args.mesh),
                       token_bytes=np.ones(cfg.vocab_size, np.float32), tokenizer_path=None, progress=False,
                       attention_impl=None if args.attention == "auto" else args.attention,
                       ce_chunk_tokens=args.ce_chunk)
    summary = result.summary
    fpt = cfg.flops_per_token(seq)
    tok_s = summary["tokens_per_sec"]
    info = device_info()
    n = args.matmul_size if args.matmul_size is not None else (8192 if info["platform"] == "gpu" else 512)
    mm_rate = matmul_tflops(n)
    tflops = tok_s * fpt / 1e12 / summary["devices"]
    return {"label": args.label or "loop", **info, "mode": "loop", "steps": summary["steps"],
            "options": {"precision": args.precision, "remat": train_cfg.remat, "attention": args.attention,
                        "ce_chunk": args.ce_chunk, "segments": args.segments, "mesh": summary["mesh"]},
            "tokens_per_sec": tok_s, "step_ms": batch * args.grad_accum * seq / tok_s * 1e3,
            "flops_per_token": fpt, "model_tflops_per_device": tflops, "matmul_tflops": mm_rate,
            "mfu": tflops / mm_rate if mm_rate else None, "peak_mem_gib": peak_memory_gib(),
            "first_loss": summary["first_loss"], "last_loss": summary["final_loss"], "wall_s_loop": summary["wall_sec"]}


def check_attention(seed: int = 0) -> dict[str, Any]:
    """Every attention kernel this backend runs, against float32 XLA: output and gradient relative errors.

    Shapes follow h100-100m's heads (12 query, 4 KV, head_dim 64) at a short length, with and without
    packed-document segment ids; operands in bf16 for the fused kernels, as training runs them.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from picochat_jax.model.ops import attend

    rng = np.random.default_rng(seed)
    B, T, H, K, D = 2, 256, 12, 4, 64
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, D)), jnp.float32) for n in (H, K, K))
    seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 1 / 48, axis=1), jnp.int32)
    causal = jnp.tril(jnp.ones((T, T), bool))
    impls = ["cudnn", "pallas"] if jax.default_backend() == "gpu" else ["pallas"]
    out: dict[str, Any] = {}
    for with_seg in (False, True):
        mask = (causal[None] & (seg[:, :, None] == seg[:, None, :]))[:, None] if with_seg else None

        def loss_ref(q, k, v, mask=mask):
            return jnp.sum(jnp.sin(attend(q, k, v, mask, None, "xla")))

        ref_o = attend(q, k, v, mask, None, "xla")
        ref_g = jax.grad(loss_ref, argnums=(0, 1, 2))(q, k, v)
        for impl in impls:
            name = f"{impl}{'+segments' if with_seg else ''}"
            s = seg if with_seg else None

            def loss(q, k, v, impl=impl, s=s):
                return jnp.sum(jnp.sin(attend(q, k, v, None, s, impl).astype(jnp.float32)))

            try:
                lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
                o = jax.jit(lambda q, k, v, impl=impl, s=s: attend(q, k, v, None, s, impl))(*lo)
                g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*lo)
                rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
                out[name] = {"out_rel_err": rel(o, ref_o),
                             "grad_rel_err": max(rel(a, b) for a, b in zip(g, ref_g, strict=True))}
            except Exception as exc:  # report and go on: one unsupported kernel must not hide the others
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return out


# ----------------------------------------------------------------------------------------------- orchestration


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name:attention=xla,ce_chunk=8192' -> ('name', ['--attention', 'xla', '--ce-chunk', '8192'])."""
    name, _, body = spec.partition(":")
    if not name:
        raise SystemExit(f"--variant needs NAME:key=value,...; got {spec!r}")
    switches = {opt for a in build_parser()._actions if a.nargs == 0 for opt in a.option_strings}
    argv: list[str] = []
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {name}: {item!r} is not key=value")
        flag = f"--{key.strip().replace('_', '-')}"
        if flag in switches:  # on/off options: key=1|true turns them on, anything else leaves them off
            argv += [flag] if value.strip().lower() in ("1", "true", "yes", "on") else []
        else:  # --flag=value: a value that itself starts with "--" (XLA flags) must not read as an option
            argv.append(f"{flag}={value.strip()}")
    build_parser().parse_args(argv)  # reject unknown keys before any child starts
    return name, argv


def base_argv(argv: list[str]) -> list[str]:
    """The command line minus orchestration-only options, handed to every child."""
    drop_with_value = {"--variant", "--peer", "--peer-arch", "--json-out", "--label", "--timeout"}
    drop_flag = {"--peer-no-compile", "--peer-clip"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop_with_value:
            skip = "=" not in a
            continue
        if key in drop_flag:
            continue
        out.append(a)
    return out


def run_child(cmd: list[str], json_path: Path, timeout: int, env: dict[str, str]) -> dict[str, Any]:
    print(f"$ {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0 or not json_path.exists():
        lines = proc.stderr.strip().splitlines()
        print("\n".join(lines[-15:]), file=sys.stderr, flush=True)
        # The exception line, not JAX's trailing note about filtered frames.
        cause = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)),
                     lines[-1] if lines else "no output")
        return {"error": f"exit {proc.returncode}: {cause}"}
    result = json.loads(json_path.read_text())
    result["wall_s"] = time.perf_counter() - t
    return result


def child_env(xla_flags: str, extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if xla_flags == "gpu" or extra:
        from picochat_jax.train.step import GPU_XLA_FLAGS, apply_gpu_xla_flags

        flags = (GPU_XLA_FLAGS if xla_flags == "gpu" else ()) + tuple(extra.split())
        apply_gpu_xla_flags(flags, env)
    return env


def orchestrate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Peer first (its CUDA memory is gone before XLA starts), then each variant; the report is rewritten
    after every child so a sweep cut short by a time limit still leaves what it measured."""
    from picochat_jax.fileio import save_json

    common = base_argv(argv)
    variants = [parse_variant(v) for v in args.variant] or [(args.label or "jax", [])]
    report: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "results": [], "peer": None,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.peer == "torch":
            cfg = model_config(args)
            peer_json = Path(tmp) / "peer.json"
            cmd = [sys.executable, str(REPO / "tools" / "torch_baseline.py"),
                   "--d-model", str(cfg.d_model), "--layers", str(cfg.n_layers), "--heads", str(cfg.n_heads),
                   "--kv-heads", str(cfg.n_kv_heads), "--d-ff", str(cfg.d_ff), "--vocab", str(cfg.vocab_size),
                   "--seq-len", str(cfg.max_seq_len), "--batch-size", str(default_batch(args)),
                   "--steps", str(args.steps), "--sync-every", str(args.sync_every),
                   "--warmup", str(max(args.warmup, 3)),
                   "--precision", args.precision, "--arch", args.peer_arch, "--json-out", str(peer_json)]
            if args.matmul_size is not None:
                cmd += ["--matmul-size", str(args.matmul_size)]
            if args.peer_no_compile:
                cmd.append("--no-compile")
            if args.peer_clip:
                cmd.append("--clip")
            report["peer"] = run_child(cmd, peer_json, args.timeout, dict(os.environ))
            if args.json_out:
                save_json(args.json_out, report)
        for name, extra in variants:
            out = Path(tmp) / f"{len(report['results'])}.json"
            vargs = build_parser().parse_args(common + extra)
            cmd = [sys.executable, str(Path(__file__).resolve()), *common, *extra, "--label", name,
                   "--child", "--json-out", str(out)]
            result = run_child(cmd, out, args.timeout, child_env(vargs.xla_flags, vargs.extra_xla_flags))
            result.setdefault("label", name)
            report["results"].append(result)
            _add_ratios(report)
            if args.json_out:
                save_json(args.json_out, report)
    return report


def _add_ratios(report: dict[str, Any]) -> None:
    peer_rate = (report["peer"] or {}).get("tokens_per_sec")
    for r in report["results"]:
        if peer_rate and r.get("tokens_per_sec"):
            r["vs_peer"] = r["tokens_per_sec"] / peer_rate


def fmt(v: Any, spec: str) -> str:
    """A table cell: `v` formatted, or "-" when it was not measured."""
    return "-" if v is None else format(v, spec)


def table_head(head: str) -> list[str]:
    """A markdown table's header row and separator."""
    return [head, "|---" * (head.count("|") - 1) + "|"]


def table(report: dict[str, Any]) -> str:
    lines = table_head("| run | tokens/s | step ms | model TFLOP/s | MFU (measured matmul) | MFU (datasheet) | "
                       "peak GiB | sync every | vs torch (x) | loss first→last |")
    peer = report.get("peer")
    rows = list(report["results"]) + ([dict(peer, label=f"torch peer ({peer.get('arch', 'llama')})")] if peer else [])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('label', '?')} | failed: {r['error'][:80]} ||||||||")
            continue
        tflops = r.get("model_tflops_per_device", r.get("model_tflops"))
        loss = f"{fmt(r.get('first_loss'), '.3f')}→{fmt(r.get('last_loss'), '.3f')}"
        lines.append(f"| {r['label']} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | {fmt(tflops, '.3g')} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('mfu_datasheet'), '.1%')} | "
                     f"{fmt(r.get('peak_mem_gib'), '.1f')} | {fmt(r.get('sync_every'), 'd')} | "
                     f"{fmt(r.get('vs_peer'), '.2f')} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.mode == "check-attention":
        result = {"device": device_info(), "check_attention": check_attention()}
        if args.json_out:
            from picochat_jax.fileio import save_json

            save_json(args.json_out, result)
        print(json.dumps(result, indent=2), flush=True)
        return result
    if args.variant or args.peer != "none":
        report = orchestrate(args, argv)
    else:
        if args.xla_flags == "gpu" or args.extra_xla_flags:
            os.environ.update({"XLA_FLAGS": child_env(args.xla_flags, args.extra_xla_flags)["XLA_FLAGS"]})
        result = measure_loop(args) if args.mode == "loop" else measure(args)
        report = {"command": shlex.join([sys.executable, *sys.argv]), "results": [result], "peer": None,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.json_out:
        from picochat_jax.fileio import save_json

        save_json(args.json_out, report["results"][0] if args.child else report)
    print(table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
