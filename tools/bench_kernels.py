#!/usr/bin/env python
"""Time the Pallas kernels alone, per tuning (tokens/rows per program, warps), against the XLA path they replace.

For one layer call at a training shape (default: h100-100m, 64 x 512 tokens, bf16):
  - QK-norm + RoPE (`model/norm_rope_kernel.py`): forward, backward, and XLA's forward / forward+backward;
  - the pre-norm backward (`model/rms_norm_kernel.py`): the kernel and XLA's autodiff of the same function;
  - SwiGLU's packed backward (`model/swiglu_mgpu.py`, Mosaic GPU) against `ops.swiglu_packed`'s XLA backward.
Each figure is the median over windows of back-to-back calls, synchronised once per window, with the HBM traffic
the kernel cannot avoid (every operand read once, every result written once) and the rate that implies.

    python tools/bench_kernels.py --json-out kernels.json                    # on a GPU
    python tools/bench_kernels.py --batch 2 --seq 32 --interpret --windows 2 # CPU smoke (interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's timing loop, also when loaded by path

from bench_train import timed_windows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("batch", 64), ("seq", 512), ("heads", 12), ("kv-heads", 4), ("head-dim", 64),
                          ("d-model", 768), ("d-ff", 2048), ("windows", 10), ("calls", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--blocks", default="16,32,64", help="tokens (rows) per program to try, powers of two")
    p.add_argument("--warps", default="2,4,8", help="num_warps values to try")
    p.add_argument("--mosaic-concurrency", default="2,3,4", help="Mosaic GPU kernels: blocks in flight to try")
    p.add_argument("--mosaic-chunks", default="64,128", help="Mosaic GPU pre-norm backward: columns per step to try")
    p.add_argument("--swiglu-chunks", default="64,128,256", help="Mosaic GPU SwiGLU backward: columns per step to try")
    p.add_argument("--kernels", default="norm_rope,rms_norm,swiglu", help="which kernels to time")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke runs)")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def time_call(fn: Any, args: tuple, windows: int, calls: int) -> float:
    """Median milliseconds per call of a jitted `fn(*args)` over `windows` windows of `calls` calls."""
    import jax

    out = [jax.block_until_ready(fn(*args))]  # compile

    def call() -> None:
        out[0] = fn(*args)

    return statistics.median(timed_windows(call, lambda: jax.block_until_ready(out[0]), windows * calls, calls)) * 1e3


def _row(name: str, ms: float, traffic_bytes: int, **tuning: Any) -> dict[str, Any]:
    return {"kernel": name, **tuning, "ms": ms, "traffic_mb": traffic_bytes / 1e6,
            "gb_per_s": traffic_bytes / (ms / 1e3) / 1e9}


def _ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",") if v]


def _mosaic_row(name: str, fn: Any, args: tuple, a: argparse.Namespace, traffic: int, **tuning: Any) -> dict:
    """A Mosaic GPU kernel's row; a tuning that does not fit (too much shared memory) is reported, not fatal."""
    try:
        return _row(name, time_call(fn, args, a.windows, a.calls), traffic, impl="mosaic", **tuning)
    except Exception as err:  # noqa: BLE001 - any compile or launch failure of one tuning
        return {"kernel": name, "impl": "mosaic", **tuning, "ms": None, "error": f"{type(err).__name__}: {err}"[:300]}


def bench_norm_rope(a: argparse.Namespace, tunings: list[tuple[int, int]]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from picochat_jax.model import norm_rope_kernel, norm_rope_mgpu, ops

    B, T, H, K, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    qkv = jax.random.normal(keys[0], (B, T, (H + 2 * K) * D), jnp.bfloat16)
    q_scale, k_scale = (1 + 0.1 * jax.random.normal(k, (D,)) for k in keys[1:3])
    rope = ops.rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), ops.rope_inv_freq(D, 10000.0, None))
    dq, dk, dv = (jax.random.normal(k, (B, T, n, D), jnp.bfloat16) for k, n in zip(keys[3:], (H, K, K), strict=True))
    packed = qkv.size * 2
    rows = []

    def xla_heads(x, qs, ks):
        return ops.heads_from_qkv(x, qs, ks, rope, H, K, 1e-6, "xla")

    fwd = jax.jit(xla_heads)
    fwd_bwd = jax.jit(lambda x, qs, ks: jax.vjp(xla_heads, x, qs, ks)[1]((dq, dk, dv)))
    rows.append(_row("norm_rope_fwd", time_call(fwd, (qkv, q_scale, k_scale), a.windows, a.calls), 2 * packed,
                     impl="xla"))
    rows.append(_row("norm_rope_fwd+bwd", time_call(fwd_bwd, (qkv, q_scale, k_scale), a.windows, a.calls),
                     5 * packed, impl="xla"))
    for block, warps in tunings:
        tune = {"max_block": block, "num_warps": warps, "interpret": a.interpret}
        fwd = jax.jit(functools.partial(norm_rope_kernel.norm_rope_forward, rope=rope, n_heads=H, n_kv_heads=K,
                                        eps=1e-6, **tune))
        bwd = jax.jit(lambda x, qs, ks, dq, dk, dv, tune=tune: norm_rope_kernel.norm_rope_backward(
            x, qs, ks, rope, dq, dk, dv, H, K, 1e-6, **tune))
        # forward: read q|k|v, write q, k, v; backward: read q|k|v and dq, dk, dv, write the packed gradient
        rows.append(_row("norm_rope_fwd", time_call(fwd, (qkv, q_scale, k_scale), a.windows, a.calls), 2 * packed,
                         impl="pallas", max_block=block, num_warps=warps))
        rows.append(_row("norm_rope_bwd", time_call(bwd, (qkv, q_scale, k_scale, dq, dk, dv), a.windows, a.calls),
                         3 * packed, impl="pallas", max_block=block, num_warps=warps))
    if not a.interpret and norm_rope_mgpu.supported(B * T, D):  # the Mosaic GPU port (64-token blocks)
        for concurrency in _ints(a.mosaic_concurrency):
            tune = {"concurrency": concurrency}
            fwd = jax.jit(functools.partial(norm_rope_mgpu.norm_rope_forward, rope=rope, n_heads=H, n_kv_heads=K,
                                            eps=1e-6, **tune))
            bwd = jax.jit(lambda x, qs, ks, dq, dk, dv, tune=tune: norm_rope_mgpu.norm_rope_backward(
                x, qs, ks, rope, dq, dk, dv, H, K, 1e-6, **tune))
            rows.append(_mosaic_row("norm_rope_fwd", fwd, (qkv, q_scale, k_scale), a, 2 * packed, max_block=64,
                                    **tune))
            rows.append(_mosaic_row("norm_rope_bwd", bwd, (qkv, q_scale, k_scale, dq, dk, dv), a, 3 * packed,
                                    max_block=64, **tune))
    return rows


def bench_rms_norm(a: argparse.Namespace, tunings: list[tuple[int, int]]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from picochat_jax.model import rms_norm_kernel, rms_norm_mgpu

    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    shape = (a.batch, a.seq, a.d_model)
    x, dy, d_pass = (jax.random.normal(k, shape, jnp.bfloat16) for k in (keys[0], keys[2], keys[3]))
    scale = 1 + 0.1 * jax.random.normal(keys[1], (a.d_model,))
    traffic = 4 * x.size * 2  # read x, dy, d_pass; write d x

    def reference(x, scale):
        return x, rms_norm_kernel.rms_norm(x, scale, 1e-6, jnp.bfloat16)

    xla = jax.jit(lambda x, s, dy, d_pass: jax.vjp(reference, x, s)[1]((d_pass, dy)))
    rows = [_row("rms_norm_bwd", time_call(xla, (x, scale, dy, d_pass), a.windows, a.calls), traffic, impl="xla")]
    for block, warps in tunings:
        fn = jax.jit(functools.partial(rms_norm_kernel.rms_norm_backward, eps=1e-6, interpret=a.interpret,
                                       max_block=block, num_warps=warps))
        rows.append(_row("rms_norm_bwd", time_call(fn, (x, scale, dy, d_pass), a.windows, a.calls), traffic,
                         impl="pallas", max_block=block, num_warps=warps))
    for chunk, concurrency in itertools.product(_ints(a.mosaic_chunks), _ints(a.mosaic_concurrency)):
        if a.interpret or not rms_norm_mgpu.supported(a.batch * a.seq, a.d_model, chunk):
            continue
        tune = {"chunk": chunk, "concurrency": concurrency}
        fn = jax.jit(functools.partial(rms_norm_mgpu.rms_norm_backward, eps=1e-6, **tune))
        rows.append(_mosaic_row("rms_norm_bwd", fn, (x, scale, dy, d_pass), a, traffic, max_block=64, **tune))
    return rows


def bench_swiglu(a: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from picochat_jax.model import ops, swiglu_mgpu

    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    gate_up = jax.random.normal(keys[0], (a.batch, a.seq, 2 * a.d_ff), jnp.bfloat16)
    d_out = jax.random.normal(keys[1], (a.batch, a.seq, a.d_ff), jnp.bfloat16)
    traffic = 5 * d_out.size * 2  # read gate, up and d_out; write d gate and d up
    xla = jax.jit(lambda g, d: jax.vjp(lambda g: ops.swiglu_packed(g, "xla"), g)[1](d))
    rows = [_row("swiglu_bwd", time_call(xla, (gate_up, d_out), a.windows, a.calls), traffic, impl="xla")]
    for chunk, concurrency in itertools.product(_ints(a.swiglu_chunks), _ints(a.mosaic_concurrency)):
        if a.interpret or not swiglu_mgpu.supported(a.batch * a.seq, a.d_ff, chunk=chunk):
            continue
        tune = {"chunk": chunk, "concurrency": concurrency}
        fn = jax.jit(functools.partial(swiglu_mgpu.swiglu_backward, **tune))
        rows.append(_mosaic_row("swiglu_bwd", fn, (gate_up, d_out), a, traffic, max_block=64, **tune))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| kernel | impl | max block | warps | chunk | in flight | ms / call | traffic MB | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuning = " | ".join(str(r.get(k, "-")) for k in ("max_block", "num_warps", "chunk", "concurrency"))
        if r["ms"] is None:
            lines.append(f"| {r['kernel']} | {r['impl']} | {tuning} | failed: {r['error'][:80]} | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['impl']} | {tuning} | {r['ms']:.4f} | {r['traffic_mb']:.0f} | "
                     f"{r['gb_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    import jax

    tunings = list(itertools.product(_ints(a.blocks), _ints(a.warps)))
    kernels = set(a.kernels.split(","))
    rows = ((bench_norm_rope(a, tunings) if "norm_rope" in kernels else [])
            + (bench_rms_norm(a, tunings) if "rms_norm" in kernels else [])
            + (bench_swiglu(a) if "swiglu" in kernels else []))
    device = jax.devices()[0]
    report = {"device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": {k: getattr(a, k) for k in (
                  "batch", "seq", "heads", "kv_heads", "head_dim", "d_model", "d_ff")}, "rows": rows}
    print(table(rows), flush=True)
    if a.json_out:
        from picochat_jax.fileio import save_json

        save_json(a.json_out, report)
    else:
        print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
