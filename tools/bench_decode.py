#!/usr/bin/env python
"""The decode engine's step alone, no HTTP: milliseconds per decode step of `SlotBatch` (continuous batching)
and `Engine.run` (a static batch), per way of compiling the layer loop.

    python tools/bench_decode.py --json-out decode.json          # GPU: Qwen2.5-0.5B shape, 64 slots
    python tools/bench_decode.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 512 \\
        --slots 4 --prompt-len 8 --windows 32,64 --max-len 64 --chunks 2 --unroll 1,2 --precision fp32   # CPU

The model is a random-init native model of a Qwen2-like shape (RoPE, GQA, q/k/v bias, tied embeddings). For each
`--unroll` value (N = layers per scan iteration of the stacked layers; `loop` = the layers as a loop over per-layer
params and caches, `Decoder.layer_loop`; 0 = the engine's default for this backend) it fills `--slots`
slots with `--prompt-len`-token prompts, then times `--chunks` decode chunks of `--chunk-tokens` steps at each
attention window in `--windows` with every slot live, and with one slot live; then `Engine.run` on the same
prompts as one static batch. Each program runs once untimed first; its compile time is reported.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # bench_serve's shape flags


def build_parser() -> argparse.ArgumentParser:
    from bench_serve import add_shape_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--windows", default="256,512,1024", help="attention windows (cache positions read) to time")
    p.add_argument("--chunk-tokens", type=int, default=8)
    p.add_argument("--chunks", type=int, default=10,
                   help="timed chunks per window (prompt + (chunks + 1) x chunk-tokens should fit the smallest)")
    p.add_argument("--unroll", default="1,0",
                   help="layers per scan iteration of the stacked layers, `loop` for the per-layer loop, or 0 for "
                        "the backend default (the loop on GPU, as serve)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--profile", action="store_true",
                   help="trace 3 chunks at the largest window (all slots live) and print the top kernels by time")
    p.add_argument("--json-out", type=Path, default=None)
    return p


def kernel_table(trace_dir: Path, top: int = 25) -> list[dict[str, Any]]:
    """Device-side events of a `jax.profiler` Perfetto trace summed by name: [{name, ms, calls}], longest first."""
    import gzip

    totals: dict[str, list[float]] = {}
    for path in trace_dir.rglob("*.trace.json.gz"):
        with gzip.open(path) as f:
            events = json.loads(f.read()).get("traceEvents", [])
        pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("name") == "process_name"}
        for e in events:
            if e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), ""):
                row = totals.setdefault(e["name"], [0.0, 0])
                row[0] += e.get("dur", 0) / 1e3
                row[1] += 1
        if not totals:
            print("no GPU events; processes:", sorted(set(pids.values()))[:20], flush=True)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": name[:120], "ms": round(ms, 3), "calls": calls} for name, (ms, calls) in rows]


def model_config(args: argparse.Namespace) -> Any:
    from picochat_jax.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, d_model=args.hidden, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, d_ff=args.intermediate, max_seq_len=args.max_len,
                       qkv_bias=True, tie_embeddings=True, rope_theta=1_000_000.0)


def _timed(fn: Any, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of the next `repeats`)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - t0) / repeats


def engine_options(variant: str) -> dict[str, Any]:
    """Engine keywords of an `--unroll` value: "loop", "0" (the backend default) or N (a stacked scan)."""
    if variant == "loop":
        return {"layer_loop": True}
    unroll = int(variant)
    return {"scan_unroll": unroll} if unroll == 0 else {"scan_unroll": unroll, "layer_loop": False}


def bench_variant(args: argparse.Namespace, params: Any, cfg: Any, unroll: str) -> dict[str, Any]:
    import jax
    import numpy as np

    from picochat_jax.generate import Engine, SamplingParams

    engine = Engine(params, cfg, args.max_len, args.precision, max_batch=args.slots,
                    chunk_tokens=args.chunk_tokens, **engine_options(unroll))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.slots, args.prompt_len)).tolist()
    # Replies never end inside the timed chunks: no stop token, and room for every timed step.
    reply = args.max_len - args.prompt_len
    sampling = SamplingParams(max_new_tokens=reply)
    steps = args.chunk_tokens
    out: dict[str, Any] = {"unroll": unroll, "scan_unroll": engine.model.scan_unroll,
                           "layer_loop": engine.model.layer_loop, "slots": {}}
    for live in sorted({args.slots, 1}, reverse=True):
        slots = engine.slots([], args.slots)
        rows, admit_s = [], []
        for window in (int(w) for w in args.windows.split(",")):
            # Fresh replies for each window, so the timed steps stay inside it.
            t0 = time.perf_counter()
            for i in range(live):
                if slots.live[i]:
                    slots.release(i)
                slots.admit(i, prompts[i], sampling)
            jax.block_until_ready(slots.tok)
            admit_s.append(round(time.perf_counter() - t0, 3))
            first, mean = _timed(lambda w=window, s=slots: s.collect(s._launch(steps, w)), args.chunks)
            rows.append({"window": window, "first_call_s": round(first, 3), "ms_per_step": round(1e3 * mean / steps, 3),
                         "tokens_per_s": round(live * steps / mean)})
            print(json.dumps({"unroll": unroll, "live": live, **rows[-1]}), flush=True)
        out["slots"][str(live)] = {"admit_s": admit_s, "windows": rows}
        if args.profile and live == args.slots:
            import tempfile

            window = int(args.windows.split(",")[-1])
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                for _ in range(3):
                    slots.collect(slots._launch(steps, window))
                jax.profiler.stop_trace()
                out["profile"] = {"window": window, "chunks": 3, "kernels": kernel_table(Path(trace_dir))}
            for row in out["profile"]["kernels"]:
                print(json.dumps(row), flush=True)
    new = min(reply, 256)
    rows_sampling = [SamplingParams(max_new_tokens=new)] * args.slots

    def static() -> None:
        for _ in engine.run(prompts, rows_sampling, [], chunk_tokens=new):
            pass

    first, mean = _timed(static, 3)
    out["engine_run"] = {"batch": args.slots, "new_tokens": new, "first_call_s": round(first, 3),
                         "ms_per_step": round(1e3 * mean / new, 3), "tokens_per_s": round(args.slots * new / mean)}
    print(json.dumps({"unroll": unroll, "engine_run": out["engine_run"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import jax

    from picochat_jax.model.transformer import init_params, make_model

    cfg = model_config(args)
    params = init_params(make_model(cfg), jax.random.key(0))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "command": shlex.join([sys.executable, *sys.argv]), "options": vars(args) | {
                                  "json_out": str(args.json_out)},
                              "device": str(jax.devices()[0]), "jax": jax.__version__, "variants": []}
    for unroll in args.unroll.split(","):
        report["variants"].append(bench_variant(args, params, cfg, unroll))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
