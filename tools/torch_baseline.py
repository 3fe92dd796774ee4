#!/usr/bin/env python
"""The PyTorch peer for tools/bench_train.py: transformers' LlamaForCausalLM trained the usual fast way.

Random init from a LlamaConfig of the given shape, torch.compile over model + loss, bf16 autocast, fused
AdamW, random tokens. Timed like our step: warm-up (compilation) excluded, `torch.cuda.synchronize()` after
every step (or after windows of `--sync-every` steps), median over the timed steps (windows). Runs in its own
process so its CUDA memory never competes with XLA's, and prints/writes one JSON object.

    python tools/torch_baseline.py --d-model 768 --layers 16 --heads 12 --kv-heads 4 --d-ff 2048 \\
        --vocab 8192 --seq-len 512 --batch-size 64 --json-out peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Repo root on sys.path so `picochat_jax.fileio` imports when run as a script; tools/ for bench_train's timing
# helpers, also when this file is loaded by path (tests).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import positive_int, timed_windows  # noqa: E402


def flops_per_token(d_model: int, layers: int, heads: int, kv_heads: int, d_ff: int, vocab: int, seq_len: int,
                    qk_norm: bool = False) -> float:
    """ModelConfig.flops_per_token of the same shape, so both sides count FLOPs alike."""
    from picochat_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      d_ff=d_ff, max_seq_len=seq_len, tie_embeddings=True, qk_norm=qk_norm)
    return cfg.flops_per_token(seq_len)


def matmul_tflops(torch: Any, device: str, n: int, reps: int = 20) -> float | None:
    """bf16 n^3 matmul rate, launches queued back to back and synchronised once."""
    if n <= 0:
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    _sync(torch, device)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(torch, device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return max(rates)


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shape = dict(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True, rms_norm_eps=1e-6,
        attention_bias=False, hidden_act="silu",
    )
    if args.arch == "qwen3":  # Llama plus per-head RMSNorm on q and k: h100-100m's own architecture
        cfg = transformers.Qwen3Config(**shape, head_dim=args.d_model // args.heads, use_sliding_window=False)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**shape, mlp_bias=False)
        model_cls = transformers.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"  # flash attention through F.scaled_dot_product_attention
    model = model_cls(cfg).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.startswith("cuda"))

    def loss_fn(x: Any, y: Any) -> Any:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    compiled = torch.compile(loss_fn) if args.compile else loss_fn
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        (torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(device),
         torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(device))
        for _ in range(4)
    ]

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=amp_dtype,
                            enabled=args.precision == "bf16"):
            loss = compiled(x, y)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    _sync(torch, device)
    warmup_s = time.perf_counter() - t0
    first_loss = float(loss.detach()) if args.warmup else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    i = 0

    def one_step() -> None:
        nonlocal loss, i
        loss = step(i)
        i += 1

    times = timed_windows(one_step, lambda: _sync(torch, device), args.steps, args.sync_every)
    step_s = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff, args.vocab, args.seq_len,
                          qk_norm=args.arch == "qwen3")
    size = args.matmul_size if args.matmul_size is not None else (8192 if device.startswith("cuda") else 512)
    mm = matmul_tflops(torch, device, size)
    model_tflops = tokens / step_s * fpt / 1e12
    return {
        "framework": "torch", "arch": args.arch, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "compile": args.compile, "precision": args.precision, "clip": args.clip,
        "fused_adamw": device.startswith("cuda"),
        "params": n_params, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "sync_every": args.sync_every, "warmup": args.warmup, "warmup_s": warmup_s,
        "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "tokens_per_sec": tokens / step_s, "flops_per_token": fpt, "model_tflops": model_tflops,
        "matmul_tflops": mm, "mfu": (model_tflops / mm) if mm else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "first_loss": first_loss, "last_loss": float(loss.detach()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("d-model", 768), ("layers", 16), ("heads", 12), ("kv-heads", 4), ("d-ff", 2048),
                          ("vocab", 8192), ("seq-len", 512), ("batch-size", 64), ("steps", 20), ("warmup", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--sync-every", type=positive_int, default=1,
                   help="synchronise after windows of N steps, median window / N (1 = after every step)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the bf16 n^3 matmul rate (default 8192 on CUDA, 512 on CPU; 0 = skip)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--arch", choices=["llama", "qwen3"], default="llama",
                   help="llama = the issue's baseline (LlamaForCausalLM); qwen3 = the same shape with QK-norm")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager PyTorch (for CPU smoke tests)")
    p.add_argument("--clip", action="store_true", help="also clip the global grad norm to 1.0, as our step does")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json_out:
        from picochat_jax.fileio import save_json

        save_json(args.json_out, result)
    print(text, flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
