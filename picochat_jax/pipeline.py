"""Path A as a visible sequence of stages: import -> tokenizer -> base -> SFT (-> eval/honesty/gate).

Each stage is a plain function that the CLI and the tests call; `run_tiny` chains them into the spec's
out-dir layout. Later stages (preflight, eval, honesty, release gate) hang off `run_tiny`'s end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picochat_jax.config import ModelConfig, ScaleConfig, TrainConfig, load_scale, with_overrides
from picochat_jax.data.chat import encode_conversations, pad_examples
from picochat_jax.data.loader import base_examples, split_examples
from picochat_jax.data.pack import Corpus, DatasetPack, import_corpus, load_pack
from picochat_jax.data.records import Conversation, read_chat_jsonl
from picochat_jax.fileio import save_json, save_text
from picochat_jax.parallel import MeshShape, parse_mesh
from picochat_jax.tokenizer import ChatTokenizer, train_tokenizer
from picochat_jax.train.loop import TrainResult, train


def tokenizer_texts(corpus: Corpus, conversations: list[Conversation]) -> list[str]:
    """The tokenizer sees the corpus and the chat rows, so chat vocabulary gets merges too."""
    return corpus.documents + [m.content for c in conversations for m in c.messages]


def train_tokenizer_stage(scale: ScaleConfig, texts: list[str], out_path: Path,
                          vocab_size: int | None = None) -> ChatTokenizer:
    tok = train_tokenizer(texts, scale.tokenizer.kind, vocab_size or scale.tokenizer.vocab_size,
                          scale.tokenizer.min_frequency)
    tok.save(out_path)
    return tok


def model_config_for(scale: ScaleConfig, tok: ChatTokenizer) -> ModelConfig:
    """The scale's architecture with the vocabulary the tokenizer actually produced."""
    return dataclasses.replace(scale.model, vocab_size=tok.vocab_size)


def base_stage(scale: ScaleConfig, train_cfg: TrainConfig, tok: ChatTokenizer, tokenizer_path: Path,
               documents: list[str], out_dir: Path, mesh_shape: MeshShape, **train_kwargs: Any) -> TrainResult:
    model_cfg = model_config_for(scale, tok)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    windows = base_examples(documents, tok, seq_len)
    train_ex, val_ex = split_examples(windows, train_cfg.val_fraction, train_cfg.seed)
    return train(stage="base", model_cfg=model_cfg, train_cfg=train_cfg, train_examples=train_ex,
                 val_examples=val_ex, out_dir=out_dir, mesh_shape=mesh_shape,
                 token_bytes=tok.token_byte_lengths(), tokenizer_path=tokenizer_path, **train_kwargs)


def sft_examples(conversations: list[Conversation], tok: ChatTokenizer, max_seq_len: int,
                 all_assistant_turns: bool = False) -> tuple[dict[str, np.ndarray], int]:
    encoded = encode_conversations(conversations, tok, all_assistant_turns)
    longest = max(len(ids) for ids, _ in encoded) - 1
    seq_len = min(max_seq_len, -(-longest // 16) * 16)  # one fixed shape, no longer than the data needs
    return pad_examples(encoded, seq_len, tok.pad_id)


def sft_stage(model_cfg: ModelConfig, train_cfg: TrainConfig, tok: ChatTokenizer, tokenizer_path: Path,
              conversations: list[Conversation], init_params: Any, out_dir: Path, mesh_shape: MeshShape,
              **train_kwargs: Any) -> TrainResult:
    examples, truncated = sft_examples(conversations, tok, train_cfg.seq_len or model_cfg.max_seq_len,
                                       train_cfg.all_assistant_turns)
    if truncated:
        print(f"[sft] {truncated} rows longer than the context were left-truncated (targets kept)")
    train_ex, val_ex = split_examples(examples, train_cfg.val_fraction, train_cfg.seed)
    return train(stage="sft", model_cfg=model_cfg, train_cfg=train_cfg, train_examples=train_ex,
                 val_examples=val_ex, out_dir=out_dir, mesh_shape=mesh_shape,
                 token_bytes=tok.token_byte_lengths(), tokenizer_path=tokenizer_path, init_params=init_params,
                 **train_kwargs)


@dataclass(frozen=True)
class RunOptions:
    scale: str = "pico"
    mesh: str | None = None
    base_steps: int | None = None
    sft_steps: int | None = None
    precision: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


def _summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Training summary: {summary['pack']} ({summary['scale']})", "",
             f"- model parameters: {summary['params']:,}", f"- mesh: {summary['mesh']} on {summary['device_kind']}",
             f"- wall time: {summary['wall_sec']:.1f} s", "",
             "| stage | steps | tokens | first loss | final loss | final BPB | best val loss | tokens/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    for name in ("base", "sft"):
        s = summary[name]
        lines.append(f"| {name} | {s['steps']} | {s['tokens_seen']:,} | {fmt(s['first_loss'], '.3f')} | "
                     f"{fmt(s['final_loss'], '.3f')} | {fmt(s['final_bpb'], '.3f')} | {fmt(s['best_val_loss'], '.3f')} | "
                     f"{fmt(s['tokens_per_sec'], ',.0f')} | {fmt(s['mfu'], '.2%')} |")
    return "\n".join(lines) + "\n"


def run_tiny(pack_path: str | Path, out_dir: str | Path, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """The whole factory on one pack. Returns the run summary (also written to summary.json|md)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    scale = load_scale(options.scale)
    base_cfg = with_overrides(scale.base, steps=options.base_steps, precision=options.precision)
    sft_cfg = with_overrides(scale.sft, steps=options.sft_steps, precision=options.precision)
    mesh_shape = parse_mesh(options.mesh)
    pack: DatasetPack = load_pack(pack_path)
    if pack.chat is None:
        raise ValueError(f"{pack.path}: the pack names no 'chat' file; run tiny needs SFT rows")
    conversations = read_chat_jsonl(pack.chat)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "run_config.json", {"pack": str(pack.path), "options": dataclasses.asdict(options),
                                            "scale": scale.to_dict(), "base": dataclasses.asdict(base_cfg),
                                            "sft": dataclasses.asdict(sft_cfg), "mesh": str(mesh_shape)})

    print(f"[import] {pack.name}: reading corpus")
    corpus = import_corpus(pack, out_dir)
    print(f"[import] {corpus.manifest['total_documents']} documents, {corpus.manifest['total_bytes']:,} bytes")

    tokenizer_path = out_dir / "tokenizer.json"
    if options.resume and tokenizer_path.exists():
        tok = ChatTokenizer.load(tokenizer_path)
    else:
        tok = train_tokenizer_stage(scale, tokenizer_texts(corpus, conversations), tokenizer_path)
    print(f"[tokenizer] {scale.tokenizer.kind} vocab {tok.vocab_size} -> {tokenizer_path}")

    train_kwargs = {"resume": options.resume, "overwrite": options.overwrite, "progress": options.progress}
    base = base_stage(scale, base_cfg, tok, tokenizer_path, corpus.documents, out_dir / "base", mesh_shape,
                      **train_kwargs)
    if base.status != "completed":
        return {"status": "interrupted", "stage": "base", "step": base.final_step}
    model_cfg = model_config_for(scale, tok)
    sft = sft_stage(model_cfg, sft_cfg, tok, tokenizer_path, conversations, base.params, out_dir / "sft",
                    mesh_shape, **train_kwargs)
    if sft.status != "completed":
        return {"status": "interrupted", "stage": "sft", "step": sft.final_step}

    summary = {"status": "completed", "pack": pack.name, "scale": scale.name, "params": base.summary["params"],
               "mesh": str(mesh_shape), "device_kind": base.summary["device_kind"],
               "tokenizer_vocab": tok.vocab_size, "base": base.summary, "sft": sft.summary,
               "wall_sec": time.perf_counter() - t0}
    save_json(out_dir / "summary.json", summary)
    save_text(out_dir / "summary.md", _summary_markdown(summary))
    print(f"[done] {out_dir}: base loss {base.summary['first_loss']:.3f} -> {base.summary['final_loss']:.3f}, "
          f"sft loss {sft.summary['first_loss']:.3f} -> {sft.summary['final_loss']:.3f}")
    return summary


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
