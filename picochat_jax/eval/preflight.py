"""Preflight: catch a run that cannot work, or whose results could not be trusted, before it spends compute.

Runs after corpus import and before the tokenizer, so token counts are *estimates* from byte counts
(bytes per token of a byte-level BPE grows with the vocabulary; measured on English prose). Every check is
`{name, value, threshold, level: ok|warn|block, message}`. `run tiny` stops on any `block` unless
`--allow-preflight-warnings` is given; the release gate still refuses a run whose preflight blocked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from picochat_jax.config import ModelConfig, PerfConfig, ScaleConfig, TrainConfig
from picochat_jax.data.pack import Corpus, DatasetPack
from picochat_jax.data.records import Conversation, EvalRow, PreferenceRow
from picochat_jax.eval.ngram import NGRAM, document_sources, scan_contamination
from picochat_jax.fileio import save_json, save_text
from picochat_jax.parallel import MeshShape
from picochat_jax.tokenizer import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS

LEVELS = ("ok", "warn", "block")
# A "long" run is worth stopping for a contaminated eval; a tiny CPU run on a teaching pack is not (its
# release gate blocks anyway). Contamination blocks long runs, and any run whose eval is mostly contaminated.
LONG_RUN_PARAMS = 10_000_000
LONG_RUN_TOKENS = 100_000_000
LONG_RUN_MAX_REPLAY = 4.0  # corpus reads before preflight warns, for a long run ...
SHORT_RUN_MAX_REPLAY = 16.0  # ... and for a small teaching run
# Per-role header + <|end|> tokens around each message, and <|bos|>.
CHAT_OVERHEAD_TOKENS = 3


class PreflightBlocked(ValueError):
    """Raised by `run tiny` when preflight found blocking problems and no override was given."""


def bytes_per_token(kind: str, vocab_size: int) -> float:
    """Rough UTF-8 bytes per token of English prose for our byte-level tokenizers.

    Measured on the example corpus: 2.2 at 512, 2.9 at 1024, 3.6 at 2048 BPE tokens; large vocabularies
    saturate around 4.5 (GPT-2-like). The byte tokenizer is exactly one token per byte.
    """
    if kind == "byte":
        return 1.0
    return float(min(4.5, max(1.0, 2.2 + 0.7 * math.log2(max(vocab_size, 2) / 512))))


def _check(name: str, value: Any, threshold: Any, level: str, message: str) -> dict[str, Any]:
    assert level in LEVELS
    return {"name": name, "value": value, "threshold": threshold, "level": level, "message": message}


def estimate_train_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: MeshShape, seq_len: int,
                          perf: PerfConfig | None = None, platform: str | None = None) -> dict[str, Any]:
    """Rough bytes per device for one training step on `platform` (default: JAX's backend).

    State: fp32 params + two Adam moments, and two gradient buffers (the accumulator of the micro-batch scan
    and the micro-batch's own), split over fsdp*tensor. Activations per layer follow Korthikanti et al.
    (2022) (`activation_bytes`), without the score tensors when the attention kernel is a flash kernel; remat
    "dots" keeps the weight matmuls' outputs (`saved_dot_bytes`), "full" one layer input per layer, and both
    recompute one layer at a time in the backward pass. Logits: float32 (tokens, V) three times (logits,
    softmax, gradient), over a chunk of tokens when cross-entropy is chunked.

    Checked against peaks measured by tools/bench_train.py (tests/test_preflight.py), it errs high by 11-21%:
    h100-100m on an H100 (64 x 512, no remat) 17.7 GiB for 15.2 measured; h200-1b on an H100 (16 x 2048, remat
    dots, chunked CE) 56.5 for 46.7; h200-1b on two H200s (mesh 1x2, 16 x 2048 a device, no remat) 73.7 for 66.6.
    For the h200-1b proof run's step (that shape with remat dots) it says 54.8; the old estimate, which counted
    score tensors a flash kernel never makes, said 115.3 and blocked the run.
    """
    from picochat_jax.model.ops import resolve_attention_impl
    from picochat_jax.model.transformer import activation_bytes, compute_dtype, resolve_remat, saved_dot_bytes

    perf = perf or PerfConfig()
    params = model_cfg.num_params()
    shard = max(mesh.fsdp * mesh.tensor, 1)
    state = params * 4 * 5 / shard
    b = max(train_cfg.batch_size // max(mesh.batch_parallelism, 1), 1)
    s, d, width = seq_len, model_cfg.d_model, (2 if train_cfg.precision == "bf16" else 4)
    attention = resolve_attention_impl(perf.attention, compute_dtype(train_cfg.precision),
                                       model_cfg.resolved_head_dim, platform)
    layer_full = activation_bytes(model_cfg, b, s, train_cfg.precision,
                                  attention_scores=attention == "xla") / model_cfg.n_layers
    remat = resolve_remat(train_cfg.remat, model_cfg, b, s, train_cfg.precision, platform)
    kept = {"none": model_cfg.n_layers * layer_full,
            "dots": saved_dot_bytes(model_cfg, b, s, train_cfg.precision),
            "full": model_cfg.n_layers * s * b * d * width}[remat]
    activations = kept + (layer_full if remat != "none" else 0.0)
    logit_tokens = b * s if perf.ce_chunk_tokens <= 0 else min(b * s, perf.ce_chunk_tokens)
    logits = 3 * logit_tokens * model_cfg.vocab_size * 4 / max(mesh.tensor, 1)
    return {"params": float(params), "state_bytes": state, "activation_bytes": activations,
            "logits_bytes": logits, "total_bytes": state + activations + logits, "attention": attention,
            "remat": remat}


def device_memory_bytes() -> tuple[float | None, str]:
    """(usable bytes per device, where the number came from). CPU devices share the host's RAM."""
    import jax

    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except (RuntimeError, NotImplementedError, AttributeError):  # some backends raise instead of returning None
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{dev.device_kind} bytes_limit"
    if dev.platform == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return float(ram) / max(jax.device_count(), 1), "host RAM / CPU devices"
        except (ValueError, OSError, AttributeError):
            pass
    return None, f"unknown for {dev.device_kind}"


def run_preflight(*, pack: DatasetPack, corpus: Corpus, conversations: Sequence[Conversation],
                  eval_rows: Sequence[EvalRow] | None, scale: ScaleConfig, base_cfg: TrainConfig,
                  sft_cfg: TrainConfig, mesh: MeshShape | str | None, eval_max_new_tokens: int,
                  preferences: Sequence[PreferenceRow] | None = None,
                  device_memory: float | None = None, n_devices: int | None = None) -> dict[str, Any]:
    """All checks on data, config and hardware. Returns the report (see module docstring)."""
    import jax

    checks: list[dict[str, Any]] = []
    kind, vocab = scale.tokenizer.kind, scale.tokenizer.vocab_size
    floor = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    est_vocab = floor if kind == "byte" else vocab
    model_cfg = replace(scale.model, vocab_size=est_vocab)
    bpt = bytes_per_token(kind, vocab)
    corpus_bytes = sum(len(d.encode("utf-8")) for d in corpus.documents)
    corpus_tokens = int(corpus_bytes / bpt) + len(corpus.documents)
    base_seq = base_cfg.seq_len or model_cfg.max_seq_len
    windows = corpus_tokens // (base_seq + 1)

    # --- data sizes --------------------------------------------------------------------------------
    level = "block" if windows < 2 else ("warn" if windows < base_cfg.batch_size else "ok")
    checks.append(_check("corpus_tokens", corpus_tokens, 2 * (base_seq + 1), level,
                         f"~{corpus_tokens:,} tokens ({corpus_bytes:,} bytes, {len(corpus.documents)} documents) "
                         f"give ~{windows} windows of {base_seq} tokens"
                         + ("; base training needs at least 2 (train + validation)" if windows < 2 else "")
                         + ("; fewer than one batch, every batch repeats windows" if 2 <= windows < base_cfg.batch_size
                            else "")))
    n_sft = len(conversations)
    checks.append(_check("sft_rows", n_sft, sft_cfg.batch_size, "warn" if n_sft < sft_cfg.batch_size else "ok",
                         f"{n_sft} SFT rows" + (f"; fewer than one batch of {sft_cfg.batch_size}"
                                                if n_sft < sft_cfg.batch_size else "")))
    n_eval = len(eval_rows or [])
    checks.append(_check("eval_rows", n_eval, 5, "warn" if n_eval < 5 else "ok",
                         "the pack names no eval file: the release gate will block" if eval_rows is None else
                         f"{n_eval} held-out eval rows" + ("; too few to tell skill from luck" if n_eval < 5 else "")))
    if preferences is not None:
        checks.append(_check("preference_rows", len(preferences), sft_cfg.batch_size,
                             "warn" if len(preferences) < sft_cfg.batch_size else "ok",
                             f"{len(preferences)} preference pairs for DPO"))
    if pack.extra:
        checks.append(_check("unknown_pack_keys", sorted(pack.extra), None, "warn",
                             f"{pack.path.name} has keys picochat does not use: {', '.join(sorted(pack.extra))}"))

    # --- budget ------------------------------------------------------------------------------------
    params = model_cfg.num_params()
    base_tokens = base_cfg.steps * base_cfg.batch_size * base_cfg.grad_accum_steps * base_seq
    ratio = base_tokens / max(params, 1)
    checks.append(_check("tokens_per_param", round(ratio, 3), 1.0, "warn" if ratio < 1.0 else "ok",
                         f"base sees {base_tokens:,} tokens for {params:,} parameters ({ratio:.2f} tokens/param; "
                         f"compute-optimal is ~20)" + ("; the model will be badly undertrained" if ratio < 1 else "")))
    replay = base_tokens / max(corpus_tokens, 1)
    long_run = params >= LONG_RUN_PARAMS or base_tokens >= LONG_RUN_TOKENS
    # A long run's held-out loss turns up after a few reads (the h100-100m proof run's was best after ~4.3 of
    # 15.7, docs/proof_runs.md); a teaching run on a small pack reads it many times by design.
    max_replay = LONG_RUN_MAX_REPLAY if long_run else SHORT_RUN_MAX_REPLAY
    checks.append(_check("corpus_replay", round(replay, 2), max_replay, "warn" if replay > max_replay else "ok",
                         f"base reads the corpus ~{replay:.1f} times"
                         + (f"; beyond ~{max_replay:g} reads repeated data stops helping and the model memorises it "
                            f"(feed more text or take fewer base steps)" if replay > max_replay else "")))
    sft_epochs = sft_cfg.steps * sft_cfg.batch_size * sft_cfg.grad_accum_steps / max(n_sft, 1)
    checks.append(_check("sft_epochs", round(sft_epochs, 1), 50.0, "warn" if sft_epochs > 50 else "ok",
                         f"SFT reads each row ~{sft_epochs:.0f} times"
                         + ("; expect the rows to be memorised rather than learned" if sft_epochs > 50 else "")))

    # --- contamination (the honesty report's cheap text checks) -------------------------------------
    if eval_rows:
        scan = scan_contamination(eval_rows, conversations, corpus.documents,
                                  document_sources(corpus))
        c = scan["counts"]

        def leak_level(count: int) -> str:
            # Only a long run is worth stopping: a small run on a contaminated pack (the original picochat's own
            # example pack is one) still trains, and the release gate blocks its release.
            if not count:
                return "ok"
            return "block" if long_run else "warn"

        for name, part, where in (("eval_in_sft", "sft", "SFT rows"), ("eval_in_corpus", "corpus", "corpus")):
            key = f"eval_rows_in_{part}"
            lines = ", ".join(str(x) for x in scan[f"eval_lines_in_{part}"][:10])
            level = leak_level(c[key])
            why = " (a long run)" if level == "block" else "; the release gate will block this run"
            checks.append(_check(name, c[key], 0, level,
                                 f"{c[key]} of {n_eval} eval rows found in the {where} ({NGRAM}-gram/exact match)"
                                 + (f"; eval lines {lines}: the eval score would measure recall{why}; remove them "
                                    f"from the training data or the eval file" if c[key] else "")))
        checks.append(_check("duplicate_eval_prompts", c["duplicate_eval_prompt"], 0,
                             "warn" if c["duplicate_eval_prompt"] else "ok",
                             f"{c['duplicate_eval_prompt']} duplicated eval prompts"))
        share = c["sft_rows_in_corpus"] / max(n_sft, 1)
        checks.append(_check("sft_in_corpus", c["sft_rows_in_corpus"], round(0.25 * n_sft, 1),
                             "warn" if share > 0.25 else "ok",
                             f"{c['sft_rows_in_corpus']} of {n_sft} SFT answers are copied from the corpus"))

    # --- config sanity -----------------------------------------------------------------------------
    if kind == "bpe" and vocab < floor:
        checks.append(_check("vocab", vocab, floor, "block",
                             f"BPE vocab_size {vocab} is below {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials)"))
    elif kind == "bpe" and corpus_bytes < 20 * vocab:
        checks.append(_check("vocab", vocab, corpus_bytes // 20, "warn",
                             f"{corpus_bytes:,} corpus bytes are too few to learn {vocab} BPE tokens well"))
    else:
        checks.append(_check("vocab", est_vocab, floor, "ok", f"{kind} tokenizer, vocab {est_vocab}"))
    sft_lengths = [sum(len(m.content.encode("utf-8")) for m in c.messages) / bpt
                   + CHAT_OVERHEAD_TOKENS * len(c.messages) for c in conversations]
    sft_seq = sft_cfg.seq_len or model_cfg.max_seq_len
    too_long = sum(1 for n in sft_lengths if n > sft_seq)
    checks.append(_check("sft_context", too_long, 0, "warn" if too_long else "ok",
                         f"{too_long} of {n_sft} SFT rows look longer than the {sft_seq}-token context "
                         f"(their start is cut; the target is kept)" if too_long else
                         f"every SFT row fits the {sft_seq}-token context "
                         f"(longest ~{int(max(sft_lengths, default=0))})"))
    if eval_rows:
        longest = max(sum(len(m.content.encode("utf-8")) for m in r.prompt) / bpt
                      + CHAT_OVERHEAD_TOKENS * len(r.prompt) for r in eval_rows)
        need = int(longest) + eval_max_new_tokens
        checks.append(_check("eval_context", need, model_cfg.max_seq_len,
                             "warn" if need > model_cfg.max_seq_len else "ok",
                             f"longest eval prompt (~{int(longest)} tokens) + {eval_max_new_tokens} new tokens "
                             f"{'exceeds' if need > model_cfg.max_seq_len else 'fits'} the "
                             f"{model_cfg.max_seq_len}-token context"))
    for stage, cfg in (("base", base_cfg), ("sft", sft_cfg)):
        if cfg.warmup_steps >= cfg.steps:
            checks.append(_check(f"{stage}_warmup", cfg.warmup_steps, cfg.steps, "warn",
                                 f"{stage} warmup ({cfg.warmup_steps}) is not shorter than the run "
                                 f"({cfg.steps} steps): the learning rate never reaches its peak"))

    # --- devices -----------------------------------------------------------------------------------
    n_dev = jax.device_count() if n_devices is None else n_devices
    mesh_shape = _mesh_shape(mesh, n_dev)
    if isinstance(mesh_shape, str):
        checks.append(_check("mesh", str(mesh), n_dev, "block", mesh_shape))
    else:
        checks.append(_check("mesh", str(mesh_shape), n_dev, "ok",
                             f"mesh {mesh_shape} (data x fsdp x tensor) over {n_dev} devices"))
        for stage, cfg in (("base", base_cfg), ("sft", sft_cfg)):
            bad = cfg.batch_size % mesh_shape.batch_parallelism
            checks.append(_check(f"{stage}_batch_divisible", cfg.batch_size, mesh_shape.batch_parallelism,
                                 "block" if bad else "ok",
                                 f"{stage} batch {cfg.batch_size} {'is not' if bad else 'is'} divisible by "
                                 f"data*fsdp = {mesh_shape.batch_parallelism}"))
        mem = estimate_train_memory(model_cfg, base_cfg, mesh_shape, base_seq, scale.perf)
        limit, source = (device_memory, "given") if device_memory else device_memory_bytes()
        need_gib = mem["total_bytes"] / 2**30
        if limit is None:
            checks.append(_check("memory", round(need_gib, 3), None, "ok",
                                 f"~{need_gib:.2f} GiB per device for base training; device memory {source}"))
        else:
            frac = mem["total_bytes"] / limit
            level = "block" if frac > 0.9 else ("warn" if frac > 0.7 else "ok")
            checks.append(_check("memory", round(need_gib, 3), round(limit / 2**30, 2), level,
                                 f"~{need_gib:.2f} GiB per device for base training of {limit / 2**30:.1f} GiB "
                                 f"({source}); {100 * frac:.0f}% used"
                                 + ("; use more devices (--mesh with fsdp), --remat, bf16 or a smaller batch"
                                    if level != "ok" else "")))

    blocking = [c["name"] for c in checks if c["level"] == "block"]
    warnings = [c["name"] for c in checks if c["level"] == "warn"]
    return {
        "status": "block" if blocking else ("warn" if warnings else "ok"),
        "blocking": blocking, "warnings": warnings, "overridden": False,
        "inputs": {"pack": str(pack.path), "scale": scale.name, "mesh": str(mesh) if mesh else None},
        "long_run": long_run,
        "estimates": {"bytes_per_token": round(bpt, 3), "corpus_tokens": corpus_tokens,
                      "base_tokens": base_tokens, "params": params, "vocab": est_vocab},
        "checks": checks,
    }


def _mesh_shape(mesh: MeshShape | str | None, n_devices: int) -> MeshShape | str:
    """The mesh, or the reason it cannot be built on these devices."""
    from picochat_jax.parallel import parse_mesh

    if isinstance(mesh, MeshShape):
        return mesh if mesh.size == n_devices else f"mesh {mesh} needs {mesh.size} devices, {n_devices} visible"
    try:
        return parse_mesh(mesh, n_devices)
    except ValueError as exc:
        return str(exc)


def write_preflight(out_dir: str | Path, report: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    save_json(out_dir / "preflight.json", report)
    save_text(out_dir / "preflight.md", preflight_markdown(report))


def preflight_markdown(report: dict[str, Any]) -> str:
    mark = {"ok": "ok", "warn": "WARN", "block": "BLOCK"}
    lines = [f"# Preflight: {report['status']}", "",
             (f"Pack `{report['inputs']['pack']}`, scale `{report['inputs']['scale']}`. Token counts are estimates "
             f"(~{report['estimates']['bytes_per_token']} bytes per token) made before the tokenizer exists."), ""]
    if report["blocking"]:
        lines += [f"**Blocking:** {', '.join(report['blocking'])}"
                  + (" (overridden with --allow-preflight-warnings)" if report.get("overridden") else ""), ""]
    lines += ["| check | level | value | threshold | detail |", "|---|---|---:|---:|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {mark[c['level']]} | {c['value']} | "
                     f"{'' if c['threshold'] is None else c['threshold']} | {c['message'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def blocked_message(report: dict[str, Any], out_dir: Path) -> str:
    detail = "; ".join(f"{c['name']}: {c['message']}" for c in report["checks"] if c["level"] == "block")
    return (f"preflight blocked the run ({detail}). See {Path(out_dir) / 'preflight.md'}; fix the pack or config, "
            f"or pass --allow-preflight-warnings to train anyway (the release gate will still block).")
