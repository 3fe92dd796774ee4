#!/usr/bin/env python
"""Serving throughput and latency through HTTP: `picochat serve` (continuous batching) under 1, 16 and 64
concurrent streams, against transformers `generate` with a static KV cache and torch.compile (batch 64,
direct, no HTTP) on the same model and prompts.

    python tools/bench_serve.py --json-out serve.json                       # GPU: Qwen2.5-0.5B shape
    python tools/bench_serve.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 512 --streams 1,4 --requests-per-stream 1 --prompt-len 8 --min-out 4 --max-out 12 \\
        --max-len 64 --max-batch 4 --peer none --precision fp32              # CPU smoke run

The model is a random-init Qwen2ForCausalLM of the given shape (seed 0, saved in bf16 to a temp folder, with a
word-level tokenizer of one word per id so every id detokenizes; nothing is downloaded). Prompts are random ids
of `--prompt-len` tokens; each request asks for a `max_tokens` drawn uniformly from [min-out, max-out]
(seeded), greedy. For each concurrency level c, c client tasks each send `--requests-per-stream` streamed
`/v1/completions` requests back to back; the figures are output tokens/s over the level's wall time, time to
first token (send -> first text) and inter-token latency (gap between stream events divided by the tokens they
carry), p50 and p99. The peer generates the same prompts in one static batch of 64 for max-out tokens (its
first call compiles and is not timed) and is credited only each request's own length: useful tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The model shape flags, Qwen2.5-0.5B's by default (tools/bench_decode.py takes the same)."""
    shape = p.add_argument_group("shape (default: Qwen2.5-0.5B)")
    shape.add_argument("--layers", type=int, default=24)
    shape.add_argument("--hidden", type=int, default=896)
    shape.add_argument("--intermediate", type=int, default=4864)
    shape.add_argument("--heads", type=int, default=14)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--vocab", type=int, default=151936)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    load = p.add_argument_group("load")
    load.add_argument("--streams", default="1,16,64", help="comma-separated concurrency levels")
    load.add_argument("--requests-per-stream", type=int, default=2)
    load.add_argument("--prompt-len", type=int, default=128)
    load.add_argument("--min-out", type=int, default=16)
    load.add_argument("--max-out", type=int, default=512)
    load.add_argument("--seed", type=int, default=0)
    server = p.add_argument_group("server")
    server.add_argument("--max-len", type=int, default=1024, help="served context (KV-cache slots' length)")
    server.add_argument("--max-batch", type=int, default=64)
    server.add_argument("--chunk-tokens", type=int, default=None, help="the server's --chunk-tokens (default: its own)")
    server.add_argument("--prefill-rows", type=int, default=None, help="the server's --prefill-rows (default: its own)")
    server.add_argument("--compile-cache", type=Path, default=None,
                        help="JAX persistent compilation cache folder for the server (JAX_COMPILATION_CACHE_DIR): "
                             "a second server of the same shape starts without compiling")
    server.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="start the server without compiling every prompt bucket and decode window first")
    server.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    run = p.add_argument_group("run")
    run.add_argument("--peer", choices=["hf", "none"], default="hf")
    run.add_argument("--peer-batch", type=int, default=64)
    run.add_argument("--timeout", type=int, default=300, help="seconds for the server to come up, and per level")
    run.add_argument("--json-out", type=Path, default=None)
    run.add_argument("--peer-child", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def save_model(folder: Path, args: argparse.Namespace) -> Path:
    """A random Qwen2ForCausalLM (bf16 safetensors) with a word-level tokenizer covering every id."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.max_len, 2048),
                      tie_word_embeddings=True, rope_theta=1_000_000.0, eos_token_id=0, pad_token_id=0,
                      bos_token_id=None)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    # Token N is the word "▁wN": every generated token puts exactly one "w" in the streamed text (how it is counted).
    tok = Tokenizer(models.WordLevel({f"\u2581w{i}": i for i in range(args.vocab)}, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # the server requires one; unused here
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\u2581w0", pad_token="\u2581w0",
                            chat_template=template).save_pretrained(folder)
    return folder


def workload(args: argparse.Namespace, count: int) -> tuple[list[list[int]], list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, args.vocab, (count, args.prompt_len)).tolist()
    lengths = rng.integers(args.min_out, args.max_out + 1, count).tolist()
    return prompts, lengths


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _one(client: Any, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    sent = time.perf_counter()
    first = None
    gaps: list[float] = []
    tokens = 0
    last = sent
    async with client.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            text = json.loads(line[6:])["choices"][0].get("text") or ""
            n = text.count("w")  # one "wN" word per token (see save_model)
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - sent
            else:
                gaps.extend([(now - last) / n] * n)
            tokens += n
            last = now
    return {"ttft": first, "gaps": gaps, "tokens": tokens, "asked": max_tokens}


async def _level(base: str, model: str, streams: int, prompts: list[list[int]], lengths: list[int]) -> dict:
    import httpx

    queue = list(zip(prompts, lengths, strict=True))
    results: list[dict[str, Any]] = []

    async def worker(client: Any) -> None:
        while queue:
            prompt, n = queue.pop()
            results.append(await _one(client, model, prompt, n))

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    out = sum(r["tokens"] for r in results)
    return {"streams": streams, "requests": len(results), "output_tokens": out, "asked_tokens": sum(lengths),
            "wall_s": wall, "output_tokens_per_sec": out / wall,
            "ttft_ms_p50": 1e3 * _pct(ttft, 50), "ttft_ms_p99": 1e3 * _pct(ttft, 99),
            "itl_ms_p50": 1e3 * (_pct(gaps, 50) or 0.0), "itl_ms_p99": 1e3 * (_pct(gaps, 99) or 0.0)}


def run_ours(args: argparse.Namespace, folder: Path, levels: list[int]) -> dict[str, Any]:
    import httpx

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "picochat_jax.cli", "serve", "--hf-model", str(folder), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--precision", args.precision,
           "--model-name", "bench", "--log-level", "warning"]
    if args.chunk_tokens is not None:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    if args.prefill_rows is not None:
        cmd += ["--prefill-rows", str(args.prefill_rows)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.compile_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(args.compile_cache.resolve())
    if not args.warmup:  # the server then compiles each prompt bucket and decode window at its first use
        cmd.append("--no-warmup")
    log = open(Path(folder) / "server.log", "wb")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited: " + (Path(folder) / "server.log").read_text()[-2000:])
            try:
                if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError("the server did not come up in time")
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        # One untimed request per prompt bucket compiles the prefill the levels will use.
        warm_prompts, _ = workload(args, 1)
        asyncio.run(_level(base, "bench", 1, warm_prompts, [args.min_out]))
        out = {"startup_s": startup, "command": shlex.join(cmd), "levels": []}
        for c in levels:
            prompts, lengths = workload(args, c * args.requests_per_stream)
            out["levels"].append(asyncio.run(_level(base, "bench", c, prompts, lengths)))
            print(json.dumps(out["levels"][-1]), flush=True)
        out["health"] = httpx.get(base + "/health", timeout=5, trust_env=False).json()
        return out
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def run_peer(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """transformers generate, static cache, torch.compile, one batch of `peer_batch` prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    # CUDA graphs ("reduce-overhead") broke inside generate on torch 2.11 (an output overwritten by the next
    # replay): plain compilation.
    model.forward = torch.compile(model.forward, fullgraph=True)
    prompts, lengths = workload(args, args.peer_batch)
    ids = torch.tensor(prompts, device=device)
    kwargs = {"max_new_tokens": args.max_out, "min_new_tokens": args.max_out, "do_sample": False,
              "cache_implementation": "static", "pad_token_id": 0}
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kwargs)  # compiles
        compile_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    import transformers

    return {"framework": "transformers generate (static cache, torch.compile)", "device": device,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "batch": args.peer_batch, "max_new_tokens": args.max_out, "wall_s": wall, "compile_s": compile_s,
            "generated_tokens": generated, "useful_tokens": sum(lengths),
            "useful_tokens_per_sec": sum(lengths) / wall, "raw_tokens_per_sec": generated / wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.peer_child:
        result = run_peer(args, args.peer_child)
        print("PEER " + json.dumps(result), flush=True)
        return result
    levels = [int(x) for x in args.streams.split(",")]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "command": shlex.join([sys.executable, *sys.argv]), "options": {
                                  k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report["options"].pop("peer_child", None)
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        folder = save_model(Path(tmp) / "model", args)
        report["ours"] = run_ours(args, folder, levels)
        if args.peer == "hf":
            cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                   "--peer-child", str(folder)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * 3)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("PEER ")), None)
            report["peer"] = json.loads(line[5:]) if line else {"error": proc.stderr[-3000:]}
    top = next((lv for lv in report["ours"]["levels"] if lv["streams"] == max(levels)), None)
    peer = report.get("peer") or {}
    if top and peer.get("useful_tokens_per_sec"):
        report["ratio_at_most_streams"] = top["output_tokens_per_sec"] / peer["useful_tokens_per_sec"]
    if args.json_out:
        from picochat_jax.fileio import save_json

        save_json(args.json_out, report)
    print(json.dumps({k: report.get(k) for k in ("ratio_at_most_streams",)}), flush=True)
    return report


if __name__ == "__main__":
    main()
