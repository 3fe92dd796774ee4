#!/usr/bin/env python
"""The PyTorch peer for tools/bench_hf_lora.py: LoRA fine-tuning with transformers + peft, the usual fast way.

Loads a saved Hugging Face Llama folder, wraps it with `peft.get_peft_model` (LoRA on the seven projections,
no dropout), and trains the adapters only: bf16 weights with bf16 autocast (fp32 adapters, as PEFT keeps
them), torch.compile over model + loss (falling back to eager, and saying so, if compilation fails), fused
AdamW over the trainable parameters, global grad-norm clipping at 1.0 like our step. The loss is
transformers' causal-LM cross-entropy with labels = -100 where the loss mask is 0; our batches already hold
the next-token targets, so no shift happens here.

Timed like our side: warm-up steps (compilation) excluded, `torch.cuda.synchronize()` after every timed step,
median over the timed steps. Normally started by bench_hf_lora.py in its own process (so its CUDA memory never
competes with XLA's) with the batches our side trains on:

    python tools/peft_baseline.py --model-dir /tmp/smollm2 --batches /tmp/batches.npz --json-out peer.json
    python tools/peft_baseline.py --model-dir /tmp/tiny --batches /tmp/b.npz --no-compile --steps 2 --warmup 1
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

# Repo root on sys.path so `picochat_jax.fileio` imports when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a saved LlamaForCausalLM folder (safetensors)")
    p.add_argument("--batches", type=Path, required=True,
                   help=".npz of inputs/targets/loss_mask, each (n, grad_accum=1, batch, seq), as bench_hf_lora writes")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles); >= 1")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated projection names")
    p.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (the schedule costs nothing)")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees one), cuda or cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager PyTorch (CPU smoke tests)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1: the first step compiles and must not be timed")
    return args


def load_batches(path: Path) -> list[dict[str, Any]]:
    """The .npz as a list of {inputs, targets, loss_mask} numpy arrays of shape (grad_accum=1, batch, seq), and
    `real` (real tokens) where the file has it. A `batch_len` array (one per batch) cuts each batch to that
    length, as a pad-to-longest data collator would have padded it."""
    import numpy as np

    with np.load(path) as data:
        arrays = {k: np.asarray(data[k]) for k in ("inputs", "targets", "loss_mask")}
        extra = {k: np.asarray(data[k]) for k in ("real", "batch_len") if k in data}
    if arrays["inputs"].shape[1] != 1:
        raise ValueError(f"{path}: grad_accum must be 1 (got {arrays['inputs'].shape[1]})")
    batches = []
    for i in range(len(arrays["inputs"])):
        cut = int(extra["batch_len"][i]) if "batch_len" in extra else arrays["inputs"].shape[-1]
        batch = {k: v[i][..., :cut] for k, v in arrays.items()}
        if "real" in extra:
            batch["real"] = int(extra["real"][i])
        batches.append(batch)
    return batches


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import LlamaForCausalLM

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # transformers 5 renamed `torch_dtype` to `dtype`; older releases would pass an unknown `dtype` to the config.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = LlamaForCausalLM.from_pretrained(str(args.model_dir), attn_implementation="sdpa", **{dtype_kw: dtype})
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and with torch.compile; the input-grad hook is
        # what PEFT's own recipe adds for the reentrant kind and is harmless here.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)

    def loss_fn(x: Any, labels: Any) -> Any:
        logits = model(input_ids=x, use_cache=False).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    batches, real_tokens = [], []
    for b in load_batches(args.batches):
        x = torch.from_numpy(b["inputs"][0]).long()
        labels = torch.where(torch.from_numpy(b["loss_mask"][0]) > 0, torch.from_numpy(b["targets"][0]).long(), -100)
        batches.append((x.to(device), labels.to(device), int((labels != -100).sum())))
        real_tokens.append(b.get("real"))
    batch_size, seq_len = batches[0][0].shape
    # Every distinct batch shape runs once before the timing (a new shape recompiles), then the timed steps.
    first_of_shape = {tuple(x.shape): i for i, (x, _, _) in reversed(list(enumerate(batches)))}
    untimed = sorted(first_of_shape.values())

    # Compiling model + loss together lets inductor fuse the float32 upcast into the cross-entropy, as a
    # careful PyTorch user would; compilation happens lazily on the first call, hence the fallback below.
    # Batches of several lengths (pad-to-longest) compile once with a dynamic sequence length, as recompiling per
    # length would (torch's own answer to variable shapes); one length compiles static.
    impl = torch.compile(loss_fn, dynamic=len(first_of_shape) > 1 or None) if args.compile else loss_fn
    compiled, compile_error = args.compile, None
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    def step(fn: Any, i: int) -> Any:
        x, labels, _ = batches[i % len(batches)]
        with autocast:
            loss = fn(x, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    losses = []
    for i in list(range(args.warmup)) + [j for j in untimed if j >= args.warmup]:
        try:
            losses.append(step(impl, i))
        except Exception as exc:  # only compilation may fail here; an eager failure is a real error
            if impl is loss_fn:
                raise
            compile_error, compiled, impl = _first_line(exc), False, loss_fn
            print(f"[peft_baseline] torch.compile failed, running eager: {compile_error}", file=sys.stderr)
            opt.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            losses.append(step(impl, i))
    _sync(torch, device)
    warmup_s = time.perf_counter() - t0
    first_loss = float(losses[0])

    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t = time.perf_counter()
        loss = step(impl, i)
        _sync(torch, device)
        times.append(time.perf_counter() - t)
    last_loss = float(loss)
    timed = [i % len(batches) for i in range(args.warmup, args.warmup + args.steps)]
    if len(first_of_shape) > 1:  # steps of several lengths: the whole timed span, not one typical step
        positions = sum(batches[i][0].numel() for i in timed)
        step_s, tokens = sum(times) / len(times), positions / len(times)
    else:
        step_s, tokens = statistics.median(times), batch_size * seq_len
    real = None
    if all(r is not None for r in real_tokens):
        real = sum(real_tokens[i] for i in timed) / sum(times)
    loss_tokens = statistics.mean(n for _, _, n in batches)
    return {
        "framework": "transformers+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "platform": "gpu" if cuda else "cpu",
        "compile": compiled, "compile_error": compile_error, "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing, "attention": "sdpa", "fused_adamw": cuda,
        "params": n_params, "trainable_params": n_trainable, "batch_size": batch_size, "seq_len": seq_len,
        "steps": args.steps, "warmup": args.warmup, "warmup_s": warmup_s,
        "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "tokens_per_step": tokens, "tokens_per_sec": tokens / step_s,
        "loss_tokens_per_step": loss_tokens, "loss_tokens_per_sec": loss_tokens / step_s,
        "real_tokens_per_sec": real, "batch_shapes": len(first_of_shape),
        # The whole run's high-water mark (never reset), the counterpart of XLA's peak_bytes_in_use.
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": first_loss, "last_loss": last_loss,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    if args.json_out:
        from picochat_jax.fileio import save_json

        save_json(args.json_out, result)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
