#!/usr/bin/env python
"""Time LoRA fine-tuning of a SmolLM2-135M-shaped random Llama: picochat-jax against transformers + peft.

What is timed on our side is what `picochat train hf-sft --peft lora` runs: the HF folder loaded with
`hf.io.load_hf_model`, `training_model`, and the one trainer's LoRA step (`build_trainer(...,
lora_cfg=...)`: frozen bf16 base,
float32 adapters, hf-sft's AdamW and clipping; the learning rate held constant so both sides do the same
optimizer arithmetic). The peer (tools/peft_baseline.py) trains the same folder with `peft.get_peft_model`,
bf16 autocast, torch.compile and fused AdamW. Both sides see the same weights (a random-init
`LlamaForCausalLM`, seed 0, saved as safetensors to a temp folder; nothing is downloaded) and the same
batches: random token ids, the loss on the last ~40% of each row (an assistant-only mask).

Each side runs in its own process (peer first, so its CUDA memory is gone before XLA starts, and XLA flags
never reach torch). Warm-up steps (the first compiles) are excluded; every timed step is synchronised; the
median step gives tokens/s = batch * seq / step time (every token processed; the loss-mask token rate is
reported as well). Peak device memory is each process's high-water mark. Same first loss on both sides is a
check that they compute the same thing.

    python tools/bench_hf_lora.py --json-out hf_lora.json                       # GPU: SmolLM2-135M shape, peer
    python tools/bench_hf_lora.py --gradient-checkpointing --batch-size 32 --json-out hf_lora_ckpt.json
    python tools/bench_hf_lora.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --batch-size 8 --seq-len 32 --steps 2 --warmup 1 --peer-no-compile   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # bench_train's helpers, also when this file is loaded by path (tests)

from bench_train import fmt, peak_memory_gib, profile_steps, run_child, table_head, time_steps  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
N_BATCHES = 4  # distinct batches cycled through: no step sees the same data twice in a row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("shape (default: SmolLM2-135M)")
    shape.add_argument("--layers", type=int, default=30)
    shape.add_argument("--hidden", type=int, default=576)
    shape.add_argument("--intermediate", type=int, default=1536)
    shape.add_argument("--heads", type=int, default=9)
    shape.add_argument("--kv-heads", type=int, default=3)
    shape.add_argument("--vocab", type=int, default=49152)
    shape.add_argument("--model-dir", type=Path, default=None,
                       help="time this saved Llama folder instead of a random one of the shape above")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seq-len", type=int, default=512)
    train.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="ours: remat full, as hf-sft --gradient-checkpointing; peer: gradient_checkpointing_enable")
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=float, default=32.0)
    train.add_argument("--targets", default=TARGETS, help="comma-separated LoRA target projections")
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--target-fraction", type=float, default=0.4,
                       help="mean share of each row in the loss (the row's tail, as an assistant reply)")
    train.add_argument("--mesh", default=None, help="DATAxFSDP[xTENSOR] for our side (default: all devices on data)")
    train.add_argument("--quantize", choices=["none", "4bit"], default="none",
                       help="ours: 4bit = QLoRA, the frozen base's projections in NF4 (hf-sft --quantize 4bit)")
    train.add_argument("--ce-chunk-tokens", type=int, default=0,
                       help="ours: cross-entropy in chunks of ~N tokens (hf-sft --ce-chunk-tokens); 0 = whole batch")
    train.add_argument("--data", choices=["random", "markov", "chatmix"], default="random",
                       help="random ids (speed); rows from a fixed sparse bigram chain over 2,048 ids that a "
                            "LoRA can learn (its loss after many steps compares QLoRA with bf16 LoRA); or chatmix: "
                            "examples of log-normal length (--median-len, capped at --seq-len), which our side "
                            "packs by best fit (hf-sft --packing bos_bestfit) and the peer pads one per row "
                            "(--peer-padding); compared on real tokens/s")
    train.add_argument("--peer-padding", choices=["longest", "max_length"], default="longest",
                       help="chatmix: the peer pads each batch to its longest example rounded up to a multiple of "
                            "64 (a data collator's padding=True, pad_to_multiple_of=64: trl's SFTTrainer default) "
                            "or every row to --seq-len (padding='max_length')")
    train.add_argument("--median-len", type=int, default=180, help="chatmix: median example length")
    train.add_argument("--len-sigma", type=float, default=0.8, help="chatmix: log-normal sigma of the lengths")
    train.add_argument("--batches-count", type=int, default=N_BATCHES, help="distinct batches cycled through")
    run = p.add_argument_group("run")
    run.add_argument("--steps", type=int, default=20, help="timed steps")
    run.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles); >= 1")
    run.add_argument("--peer", choices=["none", "peft"], default="peft")
    run.add_argument("--peer-no-compile", action="store_true", help="eager peer (CPU smoke runs)")
    run.add_argument("--peer-device", default="auto", help="auto (cuda when torch sees one), cuda or cpu")
    run.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    run.add_argument("--profile", action="store_true",
                     help="our side: trace 3 more steps with jax.profiler, GPU kernel time by kernel and category")
    run.add_argument("--json-out", type=Path, default=None)
    run.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # time our side in this process
    run.add_argument("--batches", type=Path, default=None, help=argparse.SUPPRESS)  # the child's .npz
    return p


# ----------------------------------------------------------------------------------------------- inputs


def hf_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """transformers.LlamaConfig arguments: SmolLM2-135M's, with the shape flags applied."""
    return {"vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads, "tie_word_embeddings": True, "rope_theta": 100000.0,
            "max_position_embeddings": max(2048, args.seq_len), "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False}


def save_random_llama(out_dir: Path, args: argparse.Namespace) -> Path:
    """A random-init LlamaForCausalLM (seed 0) saved as safetensors in bf16, the dtype SmolLM2 ships in."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(args)))
    model.to(torch.bfloat16).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def markov_tokens(vocab: int, shape: tuple[int, ...], seed: int = 0, states: int = 2048,
                  successors: int = 4) -> Any:
    """Rows walked through a fixed random chain: each of `states` ids (spread over the vocabulary) has
    `successors` equally likely next ids, so the best achievable loss is ln(successors)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab, size=min(states, vocab), replace=False)
    nxt = rng.integers(0, len(ids), (len(ids), successors))
    flat = int(np.prod(shape[:-1]))
    walk = np.empty((flat, shape[-1]), np.int64)
    walk[:, 0] = rng.integers(0, len(ids), flat)
    for t in range(1, shape[-1]):
        walk[:, t] = nxt[walk[:, t - 1], rng.integers(0, successors, flat)]
    return ids[walk].reshape(shape).astype(np.int32)


PAD_MULTIPLE = 64  # the peer's pad_to_multiple_of under --peer-padding longest


def chat_mix(vocab: int, batch: int, seq: int, count: int, median: int = 180, sigma: float = 0.8,
             target_fraction: float = 0.4, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(padded, packed) batch stacks of the same `count * batch` chat-like examples: lengths log-normal around
    `median` (2..seq), random ids, the loss on each example's tail. Padded: one example per row, padded to
    `seq`, with `batch_len` = each batch's longest example rounded up to a multiple of PAD_MULTIPLE (where a
    pad-to-longest collator would cut it). Packed: hf-sft's best-fit packing (data/packing.py) into rows of
    `seq` with segment ids and positions, whole batches only. Each stack also carries `real` = real tokens per
    batch."""
    import numpy as np

    from picochat_jax.data.packing import pack_examples

    rng = np.random.default_rng(seed)
    n = count * batch
    lengths = np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 2, seq).astype(np.int64)
    ids = rng.integers(1, vocab, (n, seq + 1), dtype=np.int32)
    real = np.arange(seq)[None, :] < lengths[:, None]
    start = lengths - np.maximum(1, np.round(target_fraction * lengths)).astype(np.int64)
    examples = {"inputs": np.where(real, ids[:, :-1], 0).astype(np.int32),
                "targets": np.where(real, ids[:, 1:], 0).astype(np.int32),
                "loss_mask": (real & (np.arange(seq)[None, :] >= start[:, None])).astype(np.float32)}
    packed = pack_examples(examples, seq, 0, lengths)
    rows = len(packed["inputs"]) // batch * batch
    if rows == 0:
        raise SystemExit("chatmix: fewer packed rows than one batch; raise --batches-count")

    def stack(tree: dict[str, Any], used: int) -> dict[str, Any]:
        out = {k: v[:used].reshape(used // batch, 1, batch, seq) for k, v in tree.items()}
        seg = out.get("segment_ids")
        out["real"] = ((seg > 0) if seg is not None else (out["inputs"] != 0)).sum(axis=(1, 2, 3))
        return out

    padded = stack(examples, n)
    padded["real"] = real.reshape(count, batch, seq).sum(axis=(1, 2))
    longest = lengths.reshape(count, batch).max(axis=1)
    padded["batch_len"] = np.minimum(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, seq).astype(np.int32)
    return padded, stack(packed, rows)


def synthetic_batches(vocab: int, batch: int, seq: int, target_fraction: float = 0.4, count: int = N_BATCHES,
                      seed: int = 0, data: str = "random") -> dict[str, Any]:
    """`count` batches stacked: inputs/targets int32 and loss_mask float32, each (count, 1, batch, seq).

    Random ids, never all zeros (constant inputs can run faster than real data). Each row's loss covers its
    tail from a random start, ~`target_fraction` of the row on average, like an assistant reply after a
    prompt: the loss is then over a realistic share of the positions, not all of them.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (count, 1, batch, seq)
    share = np.clip(target_fraction * rng.uniform(0.75, 1.25, shape[:3]), 1.0 / seq, 1.0)
    start = seq - np.maximum(1, np.round(share * seq)).astype(np.int64)
    if data == "markov":
        rows = markov_tokens(vocab, (*shape[:-1], seq + 1), seed)
        return {"inputs": rows[..., :-1], "targets": rows[..., 1:],
                "loss_mask": (np.arange(seq) >= start[..., None]).astype(np.float32)}
    return {"inputs": rng.integers(0, vocab, shape, dtype=np.int32),
            "targets": rng.integers(0, vocab, shape, dtype=np.int32),
            "loss_mask": (np.arange(seq) >= start[..., None]).astype(np.float32)}


# ----------------------------------------------------------------------------------------------- our side


def build_lora_trainer(args: argparse.Namespace, hf: Any, batch: int, seq: int) -> tuple[Any, Any, Any, Any]:
    """hf-sft's LoRA trainer for `hf` (a loaded HF model) as these flags set it: (trainer, train config, model,
    mesh shape). The trainer keeps its own device copy of the base (bf16 or NF4)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from picochat_jax import parallel
    from picochat_jax.hf.sft import HFSFTOptions, hf_train_config
    from picochat_jax.model.lora import LoraConfig, parse_targets
    from picochat_jax.model.transformer import training_model
    from picochat_jax.train.optim import make_optimizer
    from picochat_jax.train.step import build_trainer

    lcfg = LoraConfig(rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets))
    opts = HFSFTOptions(model=str(args.model_dir), input=Path("-"), out_dir=Path("-"),
                        max_steps=args.warmup + args.steps, max_length=seq, precision=args.precision,
                        gradient_checkpointing=args.gradient_checkpointing, lora=lcfg, learning_rate=args.lr,
                        batch_size=batch, mesh=args.mesh)
    # hf-sft's optimizer (betas, clipping, no weight decay) with a constant rate: the peer runs a constant
    # rate too, so both sides do the same update arithmetic and their losses stay comparable.
    train_cfg = dataclasses.replace(hf_train_config(opts), decay="none", warmup_steps=0)
    mesh_shape = parallel.parse_mesh(args.mesh)
    parallel.check_batch_fits(batch, mesh_shape)
    mesh = parallel.make_mesh(mesh_shape)
    model = training_model(hf.config, args.precision, train_cfg.remat, mesh_shape.tensor)
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, optimizer, schedule, np.zeros(hf.config.vocab_size, np.float32), mesh,
                            lora_cfg=lcfg, base_params=hf.params,
                            base_dtype=jnp.bfloat16 if args.precision == "bf16" else jnp.float32,
                            base_quantize=args.quantize, ce_chunk_tokens=args.ce_chunk_tokens)
    return trainer, train_cfg, model, mesh_shape


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Load the folder, build hf-sft's LoRA trainer and time its step, in this process."""
    import flax
    import jax
    import numpy as np
    import optax

    from picochat_jax.hf.io import load_hf_model
    from picochat_jax.model import quant
    from picochat_jax.model.ops import resolve_attention_impl
    from picochat_jax.model.transformer import compute_dtype, count_params

    hf = load_hf_model(args.model_dir)
    n_params, head_dim = count_params(hf.params), hf.config.resolved_head_dim
    with np.load(args.batches) as data:
        stacked = {k: np.asarray(data[k]) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
                   if k in data}
        real_per_batch = np.asarray(data["real"]) if "real" in data else None
    host_batches = [{k: v[i] for k, v in stacked.items()} for i in range(len(stacked["inputs"]))]
    _, batch, seq = host_batches[0]["inputs"].shape

    trainer, train_cfg, model, mesh_shape = build_lora_trainer(args, hf, batch, seq)
    del hf  # only the trainer's device copy (bf16 or NF4) stays
    state0 = trainer.init(jax.random.key_data(jax.random.key(train_cfg.seed)))
    batches = [trainer.put_batch(b) for b in host_batches]

    state, times, compile_s, first_loss, last_loss = time_steps(trainer.step, state0, batches,
                                                                args.warmup, args.steps)

    # The process's peak so far is the train step's: read it before the evaluation's own programs can raise it
    # (under gradient checkpointing the step's peak is small enough for the forward-only program to top it).
    step_peak = peak_memory_gib()
    # The trained adapters' loss over every batch (not one step's): what QLoRA and bf16 LoRA runs compare. Taken
    # before any profiled steps, so the loss is that of warmup + steps updates with or without --profile.
    sums = trainer.evaluate_batches(state.params, host_batches)
    profile = None
    if args.profile:
        _, profile = profile_steps(trainer.step, state, batches)
    step_s = statistics.median(times)
    tokens = batch * seq
    dev = jax.devices()[0]
    real = None
    if real_per_batch is not None:  # real tokens over the timed steps' own batches, over their whole time
        timed = range(args.warmup, args.warmup + args.steps)
        real = float(sum(real_per_batch[i % len(real_per_batch)] for i in timed)) / sum(times)
    mean_loss_tokens = statistics.mean(float(b["loss_mask"].sum()) for b in host_batches)  # as the peer counts
    return {
        "framework": "picochat-jax",
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "device": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
        "compile": True,  # jax.jit: always compiled by XLA
        "compile_error": None, "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
        "remat": train_cfg.remat, "mesh": str(mesh_shape), "scan_unroll": model.scan_unroll,
        "quantize": args.quantize, "frozen_base_gib": quant.nbytes(trainer.step.frozen) / 2**30,
        "ce_chunk_tokens": args.ce_chunk_tokens,
        "fuse_projections": model.fuse_projections,
        "attention": resolve_attention_impl(None, compute_dtype(args.precision), head_dim),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "params": n_params, "trainable_params": count_params(state0.params), "batch_size": batch, "seq_len": seq,
        "steps": args.steps, "warmup": args.warmup, "compile_s": compile_s,
        "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "tokens_per_step": tokens, "tokens_per_sec": tokens / step_s,
        "loss_tokens_per_step": mean_loss_tokens, "loss_tokens_per_sec": mean_loss_tokens / step_s,
        "real_tokens_per_sec": real,
        "peak_mem_gib": step_peak, "peak_mem_gib_with_eval": peak_memory_gib(),
        "first_loss": first_loss, "last_loss": last_loss,
        "final_loss_all_batches": sums["ce"] / max(sums["tokens"], 1.0),
        "profile": profile,
    }


# ----------------------------------------------------------------------------------------------- orchestration


def shared_flags(args: argparse.Namespace) -> list[str]:
    """The options both sides take, spelled the same in both scripts."""
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
             "--rank", str(args.rank), "--alpha", str(args.alpha), "--targets", args.targets, "--lr", str(args.lr)]
    return flags + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from picochat_jax.fileio import save_json

    report: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ours": None, "peer": None,
                              "ratio": None}
    with tempfile.TemporaryDirectory(prefix="bench_hf_lora.") as tmp:
        model_dir = args.model_dir or save_random_llama(Path(tmp) / "model", args)
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        vocab = int(hf_config["vocab_size"])
        batches = peer_batches = Path(tmp) / "batches.npz"
        if args.data == "chatmix":
            padded, packed = chat_mix(vocab, args.batch_size, args.seq_len, args.batches_count, args.median_len,
                                      args.len_sigma, args.target_fraction)
            peer_batches = Path(tmp) / "padded.npz"
            if args.peer_padding == "max_length":
                del padded["batch_len"]
            np.savez(peer_batches, **padded)
            np.savez(batches, **packed)
            positions = args.batch_size * args.seq_len
            peer_positions = args.batch_size * padded.get("batch_len", np.full(len(padded["real"]), args.seq_len))
            report["fill"] = {"ours_packed": float(packed["real"].mean() / positions),
                              "peer_padded": float(padded["real"].sum() / peer_positions.sum()),
                              "peer_padding": args.peer_padding,
                              "peer_mean_row_len": float(peer_positions.mean() / args.batch_size),
                              "examples": int(args.batches_count * args.batch_size)}
        else:
            np.savez(batches, **synthetic_batches(vocab, args.batch_size, args.seq_len, args.target_fraction,
                                                  args.batches_count, data=args.data))
        report["model"] = {"dir": str(args.model_dir) if args.model_dir else "random init (seed 0)",
                           **{k: hf_config.get(k) for k in ("model_type", "hidden_size", "intermediate_size",
                                                           "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "vocab_size",
                                                           "tie_word_embeddings")}}
        report["options"] = {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                             "warmup": args.warmup, "precision": args.precision,
                             "gradient_checkpointing": args.gradient_checkpointing, "rank": args.rank,
                             "alpha": args.alpha, "targets": args.targets, "lr": args.lr,
                             "target_fraction": args.target_fraction, "quantize": args.quantize, "data": args.data,
                             "ce_chunk_tokens": args.ce_chunk_tokens,
                             "batches": args.batches_count, "median_len": args.median_len,
                             "peer_padding": args.peer_padding if args.data == "chatmix" else None,
                             "len_sigma": args.len_sigma}
        common = ["--model-dir", str(model_dir), "--batches", str(batches), *shared_flags(args)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if args.peer == "peft":
            out = Path(tmp) / "peer.json"
            peer_common = ["--model-dir", str(model_dir), "--batches", str(peer_batches), *shared_flags(args)]
            cmd = [sys.executable, str(REPO / "tools" / "peft_baseline.py"), *peer_common, "--device",
                   args.peer_device, "--json-out", str(out)] + (["--no-compile"] if args.peer_no_compile else [])
            report["peer"] = run_child(cmd, out, args.timeout, env)
            if args.json_out:
                save_json(args.json_out, report)
        out = Path(tmp) / "ours.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *common, "--json-out", str(out)]
        if args.mesh:
            cmd += ["--mesh", args.mesh]
        cmd += ["--quantize", args.quantize, "--ce-chunk-tokens", str(args.ce_chunk_tokens)]
        cmd += ["--profile"] if args.profile else []
        report["ours"] = run_child(cmd, out, args.timeout, env)
    ours, peer = report["ours"] or {}, report["peer"] or {}
    if ours.get("tokens_per_sec") and peer.get("tokens_per_sec"):
        report["ratio"] = ours["tokens_per_sec"] / peer["tokens_per_sec"]
        report["first_loss_gap"] = ours["first_loss"] - peer["first_loss"]
    if report.get("fill") and ours.get("real_tokens_per_sec"):
        fill = report["fill"]
        fill["ours_real_tokens_per_sec"] = ours["real_tokens_per_sec"]
        if peer.get("real_tokens_per_sec"):
            fill["peer_real_tokens_per_sec"] = peer["real_tokens_per_sec"]
            fill["real_tokens_ratio"] = fill["ours_real_tokens_per_sec"] / fill["peer_real_tokens_per_sec"]
        report["first_loss_gap"] = None  # different batches (packed and padded): losses are not comparable
    return report


def table(report: dict[str, Any]) -> str:
    lines = table_head("| side | device | tokens/s | loss tokens/s | step ms (min–max) | peak GiB | trainable | "
                       "compiled | loss first→last |")
    for name, r in (("picochat-jax", report.get("ours")), ("transformers+peft", report.get("peer"))):
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:100]} ||||||||")
            continue
        compiled = "yes" if r["compile"] else "no" + (f" ({r['compile_error'][:60]})" if r.get("compile_error") else "")
        lines.append(f"| {name} | {r['device']} | {r['tokens_per_sec']:,.0f} | {r['loss_tokens_per_sec']:,.0f} | "
                     f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | "
                     f"{fmt(r.get('peak_mem_gib'), '.2f')} | {r['trainable_params']:,} | {compiled} | "
                     f"{r['first_loss']:.3f}→{r['last_loss']:.3f} |")
    fill = report.get("fill")
    if fill:
        lines.append(f"\nchat mix of {fill['examples']} examples: {fill['ours_packed']:.1%} of our packed positions "
                     f"and {fill['peer_padded']:.1%} of the peer's padded ones are real tokens (peer padding: "
                     f"{fill['peer_padding']}, mean row {fill['peer_mean_row_len']:.0f})")
        if fill.get("real_tokens_ratio") is not None:
            lines.append(f"real tokens/s: ours {fill['ours_real_tokens_per_sec']:,.0f}, peer "
                         f"{fill['peer_real_tokens_per_sec']:,.0f}: **{fill['real_tokens_ratio']:.2f}x**")
    elif report.get("ratio") is not None:
        lines.append(f"\nours / peer tokens/s: **{report['ratio']:.2f}x** (first-loss gap "
                     f"{report['first_loss_gap']:+.4f}: same weights and batch, so ~0)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first step compiles and must not be timed")
    from picochat_jax.fileio import save_json

    if args.child:
        if args.model_dir is None or args.batches is None:
            raise SystemExit("--child needs --model-dir and --batches")
        result = measure_ours(args)
        if args.json_out:
            save_json(args.json_out, result)
        return result
    report = orchestrate(args)
    if args.json_out:
        save_json(args.json_out, report)
    print(table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
