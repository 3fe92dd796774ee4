"""Path A as a visible sequence of stages:

    import -> preflight -> tokenizer -> base -> sft -> [dpo] -> sft_fit -> eval -> honesty -> gate -> report

Each stage is a plain function that the CLI and the tests call; `run_tiny` chains them into the spec's
out-dir layout. Training stages resume; the evidence stages after them are cheap and always re-run, so a
resumed run's evidence describes the model it actually ended with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picochat_jax.config import DPOConfig, ModelConfig, ScaleConfig, TrainConfig, load_scale, with_overrides
from picochat_jax.data.chat import sft_examples
from picochat_jax.data.loader import resample_by_category, split_examples
from picochat_jax.data.pack import Corpus, DatasetPack, load_corpus, load_pack, pack_inputs, write_corpus_report
from picochat_jax.data.records import (
    Conversation,
    EvalRow,
    PreferenceRow,
    read_chat_jsonl,
    read_eval_jsonl,
    read_preference_jsonl,
)
from picochat_jax.eval.preflight import PreflightBlocked, blocked_message, run_preflight, write_preflight
from picochat_jax.fileio import read_json_object, read_jsonl_objects, save_json, save_text
from picochat_jax.markdown import number
from picochat_jax.outdir import MARKER, check_out_dir, claim_out_dir, delete_owned, read_marker
from picochat_jax.parallel import MeshShape, parse_mesh
from picochat_jax.tokenizer import ChatTokenizer, train_tokenizer
from picochat_jax.train.loop import TrainResult, check_resume_settings, flatten, train


def tokenizer_texts(corpus: Corpus, conversations: list[Conversation]) -> list[str]:
    """The tokenizer sees the corpus and the chat rows, so chat vocabulary gets merges too."""
    return corpus.documents + [m.content for c in conversations for m in c.messages]


def train_tokenizer_stage(scale: ScaleConfig, texts: Iterable[str], out_path: Path, vocab_size: int | None = None,
                          kind: str | None = None, min_frequency: int | None = None) -> ChatTokenizer:
    """Train (with the scale's tokenizer settings unless given) and save the tokenizer: `run tiny` and
    `tokenizer train` both come here."""
    tok = train_tokenizer(texts, kind or scale.tokenizer.kind, vocab_size or scale.tokenizer.vocab_size,
                          min_frequency or scale.tokenizer.min_frequency)
    tok.save(out_path)
    return tok


def model_config_for(scale: ScaleConfig, tok: ChatTokenizer) -> ModelConfig:
    """The scale's architecture with the vocabulary the tokenizer actually produced."""
    return dataclasses.replace(scale.model, vocab_size=tok.vocab_size)


def tokenize_stage(documents: Callable[[], Iterable[tuple[str, str]]], num_documents: int, tok: ChatTokenizer,
                   tokenizer_path: Path, shards_dir: Path, train_cfg: TrainConfig, progress: bool = True,
                   total_bytes: int | None = None) -> dict[str, Any]:
    """Tokenize (text, label) documents into disk shards with the stage's document holdout (val_fraction,
    seed); continues an interrupted tokenization. `run tiny` and `train base --dataset-pack` come here."""
    from picochat_jax.data.shards import tokenize_to_shards

    manifest = tokenize_to_shards(documents, tok, tokenizer_path, shards_dir, num_documents=num_documents,
                                  val_fraction=train_cfg.val_fraction, seed=train_cfg.seed, total_bytes=total_bytes,
                                  progress=progress)
    splits = manifest["splits"]
    print(f"[tokenize] {splits['train']['tokens']:,} train tokens ({splits['train']['documents']} documents), "
          f"{splits['val']['tokens']:,} held-out tokens ({splits['val']['documents']} documents) -> {shards_dir}")
    if not splits["val"]["tokens"]:
        print("[tokenize] warning: no document is held out (a corpus of one document, or val_fraction 0), so base "
              "pretraining reports no validation loss or BPB")
    return manifest


def base_stage(scale: ScaleConfig, train_cfg: TrainConfig, tok: ChatTokenizer, tokenizer_path: Path,
               shards_dir: Path, out_dir: Path, mesh_shape: MeshShape, **train_kwargs: Any) -> TrainResult:
    """Pretrain on token shards: BOS-aligned best-fit rows streamed from disk, validation on the held-out
    documents."""
    from picochat_jax.data.shards import (
        PackedRows,
        TokenShards,
        check_shards_tokenizer,
        read_manifest,
        shards_fingerprint,
    )

    manifest = read_manifest(shards_dir)
    check_shards_tokenizer(manifest, shards_dir, tokenizer_path)
    model_cfg = model_config_for(scale, tok)
    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    train_rows = PackedRows(TokenShards(shards_dir, "train", manifest), seq_len)
    val_shards = TokenShards(shards_dir, "val", manifest)
    val_rows = PackedRows(val_shards, seq_len) if val_shards.total else None
    return train(stage="base", model_cfg=model_cfg, train_cfg=train_cfg, train_rows=train_rows,
                 val_rows=val_rows, out_dir=out_dir, mesh_shape=mesh_shape, token_bytes=tok.token_byte_lengths(),
                 tokenizer_path=tokenizer_path, data_fingerprint=shards_fingerprint(manifest), **train_kwargs)


def heldout_sft_indices(rows: int, sft_cfg: TrainConfig) -> list[int]:
    """Indices of the chat rows `sft_stage`'s validation split held out of training (same rule, same seed)."""
    _, val = split_examples({"index": np.arange(rows)}, sft_cfg.val_fraction, sft_cfg.seed)
    return val["index"].tolist()


def sft_stage(model_cfg: ModelConfig, train_cfg: TrainConfig, tok: ChatTokenizer, tokenizer_path: Path,
              conversations: list[Conversation], init_params: Any, out_dir: Path, mesh_shape: MeshShape,
              **train_kwargs: Any) -> TrainResult:
    examples, truncated = sft_examples(conversations, tok, train_cfg.seq_len or model_cfg.max_seq_len,
                                       train_cfg.all_assistant_turns)
    if truncated:
        print(f"[sft] {truncated} rows longer than the context were left-truncated (targets kept)")
    # Categories ride through the split so the train rows can be resampled by category; the model never sees them.
    examples["category"] = np.asarray([c.category for c in conversations], dtype=object)
    train_ex, val_ex = split_examples(examples, train_cfg.val_fraction, train_cfg.seed)
    train_ex = resample_by_category(train_ex, train_ex.pop("category"), train_cfg.sampling)
    val_ex.pop("category")
    if train_cfg.sampling != "uniform":
        print(f"[sft] {train_cfg.sampling} sampling over categories: {len(train_ex['inputs'])} rows per epoch")
    if train_cfg.packing == "bos_bestfit":
        from picochat_jax.data.packing import pack_examples

        before = len(train_ex["inputs"])
        train_ex = pack_examples(train_ex, train_ex["inputs"].shape[1], tok.pad_id)
        filled = float((train_ex["segment_ids"] > 0).mean())
        print(f"[sft] packed {before} examples into {len(train_ex['inputs'])} rows ({filled:.0%} of tokens used)")
    return train(stage="sft", model_cfg=model_cfg, train_cfg=train_cfg, train_rows=train_ex,
                 val_rows=val_ex, out_dir=out_dir, mesh_shape=mesh_shape,
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
    resume_or_start: bool = False
    overwrite: bool = False
    progress: bool = True
    allow_preflight_warnings: bool = False  # train even when preflight blocks (the gate still refuses)
    dpo: bool = True  # run DPO when the pack names preferences
    dpo_steps: int | None = None  # None: the config's dpo.steps
    dpo_beta: float | None = None  # None: the config's dpo.beta
    sets: tuple[str, ...] = ()  # --set KEY.SUB=VALUE overrides of the config tree
    canaries: int = 0  # random canary strings planted in the corpus to measure memorisation
    memorization_canaries: int = 8  # corpus passages replayed to measure memorisation
    eval_batch_size: int = 64  # rows per generation batch: fewer, larger batches compile fewer programs
    gate_profile: str | None = None
    gate_overrides: tuple[tuple[str, str], ...] = ()
    tensorboard_dir: str | None = None  # TensorBoard events under DIR/<stage> (default: beside metrics.jsonl)
    preflight_only: bool = False  # stop after the preflight report


def _summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Training summary: {summary['pack']} ({summary['scale']})", "",
             f"- model parameters: {summary['params']:,}", f"- mesh: {summary['mesh']} on {summary['device_kind']}",
             f"- wall time: {summary['wall_sec']:.1f} s"
             + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in summary["stage_sec"].items()) + ")"
                if summary.get("stage_sec") else ""), "",
             "| stage | steps | tokens | first loss | final loss | final BPB | best val loss | tokens/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    for name in ("base", "sft", "dpo"):
        if name not in summary:
            continue
        s = summary[name]
        if name == "dpo":
            lines.append(f"| dpo | {s['steps']} | {s['tokens_seen']:,} | {number(s['first_loss'], '.3f')} | "
                         f"{number(s['final_loss'], '.3f')} | n/a | {number(s['best_val_loss'], '.3f')} | n/a | n/a |")
            continue
        lines.append(f"| {name} | {s['steps']} | {s['tokens_seen']:,} | {number(s['first_loss'], '.3f')} | "
                     f"{number(s['final_loss'], '.3f')} | {number(s['final_bpb'], '.3f')} | "
                     f"{number(s['best_val_loss'], '.3f')} | "
                     f"{number(s['tokens_per_sec'], ',.0f')} | {number(s['mfu'], '.2%')} |")
    return "\n".join(lines) + "\n"


def preflight_stage(pack: DatasetPack, corpus: Corpus, conversations: list[Conversation],
                    eval_rows: list[EvalRow] | None, preferences: list[PreferenceRow] | None, scale: ScaleConfig,
                    base_cfg: TrainConfig, sft_cfg: TrainConfig, options: RunOptions, out_dir: Path) -> dict[str, Any]:
    """preflight.json|md; raises PreflightBlocked on a blocking problem unless the options allow it."""
    report = run_preflight(pack=pack, corpus=corpus, conversations=conversations, eval_rows=eval_rows,
                           scale=scale, base_cfg=base_cfg, sft_cfg=sft_cfg, mesh=options.mesh,
                           eval_max_new_tokens=scale.eval_max_new_tokens, preferences=preferences)
    report["overridden"] = bool(report["blocking"]) and options.allow_preflight_warnings
    write_preflight(out_dir, report)
    if report["blocking"] and not options.allow_preflight_warnings:
        raise PreflightBlocked(blocked_message(report, out_dir))
    return report


def dpo_stage(model_cfg: ModelConfig, sft_cfg: TrainConfig, dpo_cfg: DPOConfig, tok: ChatTokenizer,
              tokenizer_path: Path, rows: list[PreferenceRow], init_params: Any, out_dir: Path, mesh_shape: MeshShape,
              **train_kwargs: Any) -> Any:
    from picochat_jax.train.dpo import dpo_train_config, train_dpo

    return train_dpo(model_cfg=model_cfg, train_cfg=dpo_train_config(sft_cfg, dpo_cfg), dpo_cfg=dpo_cfg,
                     tok=tok, rows=rows, init_params=init_params, out_dir=out_dir, mesh_shape=mesh_shape,
                     tokenizer_path=tokenizer_path, **train_kwargs)


def honesty_stage(engine: Any, tok: ChatTokenizer, corpus: Corpus, conversations: list[Conversation],
                  eval_rows: list[EvalRow] | None, planted: list[tuple[str, str]], model_name: str,
                  options: RunOptions, out_dir: Path, replies: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Contamination (exact, n-gram, near-duplicate), memorisation canaries on the candidate model and
    regurgitation in its eval replies -> honesty/."""
    from picochat_jax.eval.honesty import run_honesty
    from picochat_jax.eval.ngram import document_sources

    inputs = {"chat": str(conversations[0].source) if conversations else None,
              "eval": str(eval_rows[0].source) if eval_rows else None, "corpus_documents": len(corpus.documents)}
    return run_honesty(out_dir, eval_rows=eval_rows or [], conversations=conversations, documents=corpus.documents,
                       doc_labels=document_sources(corpus), inputs=inputs, engine=engine, tok=tok,
                       model_name=model_name, replies=[r["reply"] for r in replies or []],
                       reply_labels=[f"eval line {r['line']}" for r in replies or []], planted=planted,
                       canary_count=options.memorization_canaries)


def finished_stage(stage_dir: Path, steps: int) -> tuple[Any, dict[str, Any]] | None:
    """(params, summary) of a training stage that already completed `steps`, else None.

    `--resume` after an interruption in a *later* stage (e.g. during eval) reuses finished stages instead of
    re-entering their training loops.
    """
    from picochat_jax.checkpoint import load_model_checkpoint

    summary_path = stage_dir / "summary.json"
    if not (stage_dir / "checkpoint" / "model_config.json").exists() or not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed" or summary.get("steps") != steps:
        return None
    params, _, meta = load_model_checkpoint(stage_dir / "checkpoint")
    if meta.get("step") != steps:
        return None
    print(f"[{summary.get('stage', stage_dir.name)}] already completed {steps} steps: reusing {stage_dir}/checkpoint")
    return params, summary


def recorded_steps(stage_dir: Path) -> int:
    """The step a training stage's summary.json says it reached (completed or interrupted); 0 without one."""
    return int(read_json_object(stage_dir / "summary.json").get("steps") or 0)


def discard_stale_stages(out_dir: Path, stages: Iterable[str], why: str) -> None:
    """Empty the later stages' folders when the model they were trained from has changed (`--resume` with more
    base or SFT steps than a finished run had): reusing them would evaluate and ship a model tuned from the old
    one. Only folders this run made (with our marker) are emptied."""
    for stage in stages:
        folder = out_dir / stage
        if folder.is_dir() and read_marker(folder) is not None and any(
                child.name != MARKER for child in folder.iterdir()):
            print(f"[{stage}] {why}: {folder} was trained from the old model; training it again")
            delete_owned(folder)


RUN_STATUS = "run_status.json"


class _Laps:
    """Seconds per stage, so the summary shows where a run's wall time went; once the out-dir is claimed, each
    lap also rewrites RUN/run_status.json (running, the stages done, pid and host) for watchers such as
    `picochat web`."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.sec: dict[str, float] = {}
        self.status_path: Path | None = None
        self.started = time.time()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.sec[stage] = round(now - self.last, 2)
        self.last = now
        self.status("running")

    def status(self, state: str, **extra: Any) -> None:
        if self.status_path is not None:
            save_json(self.status_path, {"status": state, "pid": os.getpid(), "host": socket.gethostname(),
                                         "started": self.started, "updated": time.time(),
                                         "stages_done": list(self.sec), **extra})


def run_tiny(pack_path: str | Path, out_dir: str | Path, options: RunOptions = RunOptions()) -> dict[str, Any]:
    """The whole factory on one pack. Returns the run summary (also written to summary.json|md). RUN/
    run_status.json says running / completed / interrupted / failed (with the error) as the run goes."""
    lap = _Laps()
    try:
        result = _run_tiny(pack_path, out_dir, options, lap)
    except BaseException as exc:
        lap.status("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                   error=f"{type(exc).__name__}: {exc}")
        raise
    lap.status("completed" if result.get("status") == "completed" else str(result.get("status")))
    return result


def _run_tiny(pack_path: str | Path, out_dir: str | Path, options: RunOptions, lap: _Laps) -> dict[str, Any]:
    from picochat_jax.eval.gate import evaluate_gate, load_gate_profile
    from picochat_jax.eval.honesty import make_planted_canaries, plant_canaries
    from picochat_jax.eval.report import write_run_report

    out_dir = Path(out_dir)
    scale = load_scale(options.scale, options.sets)
    base_cfg = with_overrides(scale.base, steps=options.base_steps, precision=options.precision)
    sft_cfg = with_overrides(scale.sft, steps=options.sft_steps, precision=options.precision)
    scale = dataclasses.replace(scale, base=base_cfg, sft=sft_cfg,
                                dpo=with_overrides(scale.dpo, steps=options.dpo_steps, beta=options.dpo_beta))
    gate_profile = load_gate_profile(options.gate_profile, dict(options.gate_overrides))  # fail before training
    mesh_shape = parse_mesh(options.mesh)
    pack: DatasetPack = load_pack(pack_path)
    if pack.chat is None:
        raise ValueError(f"{pack.path}: the pack names no 'chat' file; run tiny needs SFT rows")
    conversations = read_chat_jsonl(pack.chat)
    eval_rows = read_eval_jsonl(pack.eval) if pack.eval else None
    preferences = read_preference_jsonl(pack.preferences) if (pack.preferences and options.dpo) else None
    from picochat_jax.eval.external import is_choice_file, read_choice_questions

    external_mc = bool(pack.external_eval) and is_choice_file(pack.external_eval)
    external_rows = read_eval_jsonl(pack.external_eval) if pack.external_eval and not external_mc else None
    external_questions = read_choice_questions(pack.external_eval) if external_mc else None
    print(f"[import] {pack.name}: reading corpus")
    corpus = load_corpus(pack)
    # Every check happens before the first byte is written: the out-dir policy, then (to resume) the settings.
    run_settings = {"pack": str(pack.path.absolute()), "scale": scale.to_dict(), "base": dataclasses.asdict(base_cfg),
                    "sft": dataclasses.asdict(sft_cfg),
                    "dpo": {"enabled": bool(preferences), **dataclasses.asdict(scale.dpo)},
                    "canaries": options.canaries}
    plan = check_out_dir(out_dir, "run", resume=options.resume, overwrite=options.overwrite,
                         resume_or_start=options.resume_or_start, inputs=pack_inputs(pack))
    if plan.action == "resume":
        saved = read_json_object(out_dir / "run_config.json").get("settings")
        if saved:
            check_resume_settings(flatten(saved), flatten(json.loads(json.dumps(run_settings))),
                                  out_dir / "run_config.json")
    claim_out_dir(plan)
    lap.status_path = out_dir / RUN_STATUS
    lap.status("running")
    resume = plan.action == "resume"
    # The whole resolved config tree (flags and --set applied), so a run says exactly what it ran with.
    save_json(out_dir / "run_config.json", {"pack": str(pack.path.absolute()), "options": dataclasses.asdict(options),
                                            "config": scale.to_dict(), "mesh": str(mesh_shape),
                                            "settings": run_settings})
    write_corpus_report(corpus, pack, out_dir)
    print(f"[import] {corpus.manifest['total_documents']} documents, {corpus.manifest['total_bytes']:,} bytes")
    lap("import")

    pre = preflight_stage(pack, corpus, conversations, eval_rows, preferences, scale, base_cfg, sft_cfg,
                          dataclasses.replace(options, allow_preflight_warnings=options.allow_preflight_warnings
                                              or options.preflight_only), out_dir)
    print(f"[preflight] {pre['status']}" + (f": warnings {', '.join(pre['warnings'])}" if pre["warnings"] else "")
          + (f"; blocking {', '.join(pre['blocking'])} overridden" if pre["overridden"] else ""))
    lap("preflight")
    if options.preflight_only:
        print(f"[preflight] --preflight-only: stopping before training; report {out_dir / 'preflight.md'}")
        return {"status": "preflight_only", "preflight": pre["status"], "blocking": pre["blocking"],
                "warnings": pre["warnings"]}

    planted = make_planted_canaries(options.canaries, base_cfg.seed)
    documents = plant_canaries(corpus.documents, planted, seed=base_cfg.seed) if planted else corpus.documents
    tokenizer_path = out_dir / "tokenizer.json"
    if resume and tokenizer_path.exists():
        tok = ChatTokenizer.load(tokenizer_path)
    else:
        tok = train_tokenizer_stage(scale, tokenizer_texts(Corpus(documents, corpus.labels, corpus.manifest),
                                                           conversations), tokenizer_path)
    print(f"[tokenizer] {scale.tokenizer.kind} vocab {tok.vocab_size} -> {tokenizer_path}")
    lap("tokenizer")

    # Within a resumed run, a stage with no checkpoint yet simply starts.
    train_kwargs = {"resume": resume, "resume_or_start": True, "progress": options.progress}
    tb_root = Path(options.tensorboard_dir) if options.tensorboard_dir else None
    perf = {"attention_impl": scale.perf.attention, "ce_chunk_tokens": scale.perf.ce_chunk_tokens}
    done = finished_stage(out_dir / "base", base_cfg.steps) if resume else None
    base_step_before = recorded_steps(out_dir / "base") if resume else 0
    if not done:
        tokenize_stage(lambda: zip(documents, corpus.labels, strict=True), len(documents), tok, tokenizer_path,
                       out_dir / "tokens", base_cfg, progress=options.progress)
        lap("tokenize")
    base = (TrainResult("completed", base_cfg.steps, summary=done[1], params=done[0]) if done else
            base_stage(scale, base_cfg, tok, tokenizer_path, out_dir / "tokens", out_dir / "base", mesh_shape,
                       **train_kwargs, **perf, tensorboard_dir=tb_root and tb_root / "base"))
    if base.status != "completed":
        return {"status": "interrupted", "stage": "base", "step": base.final_step}
    lap("base")
    if base.final_step != base_step_before:
        discard_stale_stages(out_dir, ("sft", "dpo"), f"base trained from step {base_step_before} to "
                             f"{base.final_step}")
    model_cfg = model_config_for(scale, tok)
    sft_step_before = recorded_steps(out_dir / "sft") if resume else 0
    done = finished_stage(out_dir / "sft", sft_cfg.steps) if resume else None
    sft = (TrainResult("completed", sft_cfg.steps, summary=done[1], params=done[0]) if done else
           sft_stage(model_cfg, sft_cfg, tok, tokenizer_path, conversations, base.params, out_dir / "sft",
                     mesh_shape, **train_kwargs, **perf, tensorboard_dir=tb_root and tb_root / "sft"))
    if sft.status != "completed":
        return {"status": "interrupted", "stage": "sft", "step": sft.final_step}
    lap("sft")
    if sft.final_step != sft_step_before:
        discard_stale_stages(out_dir, ("dpo",), f"sft trained from step {sft_step_before} to {sft.final_step}")
    candidate = "sft"
    dpo = None
    if preferences:
        from picochat_jax.train.dpo import DPOResult

        done = finished_stage(out_dir / "dpo", scale.dpo.steps) if resume else None
        dpo = (DPOResult("completed", done[1]["steps"], done[1], done[0]) if done else
               dpo_stage(model_cfg, sft_cfg, scale.dpo, tok, tokenizer_path, preferences, sft.params, out_dir / "dpo",
                         mesh_shape, **train_kwargs, tensorboard_dir=tb_root and tb_root / "dpo"))
        candidate = "dpo"
        # Before training the policy is the reference, so both implicit rewards are 0 and accuracy starts at 0.
        print(f"[dpo] implicit-reward accuracy {dpo.summary['before']['reward_accuracy']:.2f} -> "
              f"{dpo.summary['after']['reward_accuracy']:.2f}, log-prob margin "
              f"{dpo.summary['before']['logp_margin']:.2f} -> {dpo.summary['after']['logp_margin']:.2f}")
        lap("dpo")

    # Evidence: every later stage judges the model a release would ship.
    from picochat_jax.eval.chat import evaluate_chat
    from picochat_jax.eval.fit import sft_fit_report
    from picochat_jax.generate import SamplingParams, load_native

    engine, fmt = load_native(out_dir / candidate / "checkpoint", tokenizer_path, max_batch=options.eval_batch_size)
    sampling = SamplingParams(max_new_tokens=scale.eval_max_new_tokens)
    fit = sft_fit_report(engine, fmt, conversations, out_dir / "sft_fit", sampling, options.eval_batch_size)
    print(f"[sft_fit] {candidate}: {fit['reproduced']}/{fit['rows']} rows reproduced, mean F1 {fit['mean_f1']:.3f}")
    held_out = [conversations[i] for i in heldout_sft_indices(len(conversations), sft_cfg)]
    if held_out:  # the SFT rows its validation split kept out of training: does the behaviour transfer?
        held = sft_fit_report(engine, fmt, held_out, out_dir / "sft_fit" / "heldout", sampling,
                              options.eval_batch_size)
        print(f"[sft_fit] held-out SFT rows: {held['reproduced']}/{held['rows']} reproduced")
    lap("sft_fit")
    if eval_rows:
        ev = evaluate_chat(engine, fmt, eval_rows, out_dir / "eval", sampling, options.eval_batch_size)
        print(f"[eval] {ev['passed']}/{ev['rows']} passed; prompt echo {ev['prompt_echo_rate']:.2f}")
    else:
        print("[eval] the pack names no eval file: no held-out score (the gate will block)")
    if external_rows:
        ext = evaluate_chat(engine, fmt, external_rows, out_dir / "external_eval", sampling, options.eval_batch_size)
        print(f"[external_eval] {ext['passed']}/{ext['rows']} passed")
    if external_questions:
        from picochat_jax.eval.external import evaluate_external

        ext = evaluate_external(engine, fmt, external_questions, out_dir / "external_eval",
                                str(pack.external_eval), f"{candidate}/checkpoint", seed=base_cfg.seed)
        print(f"[external_eval] multiple choice: acc {ext['acc']:.1%}, acc_norm {ext['acc_norm']:.1%} on "
              f"{ext['questions']} questions (chance {ext['chance']:.1%})")
    lap("eval")
    replies = read_jsonl_objects(out_dir / "eval" / "eval_results.jsonl") if eval_rows else None
    hon = honesty_stage(engine, tok, corpus, conversations, eval_rows, planted, f"{candidate}/checkpoint",
                        options, out_dir / "honesty", replies)
    print(f"[honesty] {hon['status']}: {hon['counts']['eval_rows_in_sft']} eval rows in SFT, "
          f"{hon['counts']['eval_rows_in_corpus']} in corpus; memorised {hon['memorization']['memorized']}/"
          f"{hon['memorization']['canaries']} canaries")
    lap("honesty")

    summary = {"status": "completed", "pack": pack.name, "scale": scale.name, "params": base.summary["params"],
               "mesh": str(mesh_shape), "device_kind": base.summary["device_kind"],
               "tokenizer_vocab": tok.vocab_size, "base": base.summary, "sft": sft.summary,
               **({"dpo": dpo.summary} if dpo else {}), "candidate": f"{candidate}/checkpoint",
               "stage_sec": lap.sec, "wall_sec": time.perf_counter() - lap.start}
    save_json(out_dir / "summary.json", summary)
    save_text(out_dir / "summary.md", _summary_markdown(summary))
    gate = evaluate_gate(out_dir, gate_profile)
    report_path = write_run_report(out_dir)
    print(f"[done] {out_dir}: base loss {base.summary['first_loss']:.3f} -> {base.summary['final_loss']:.3f}, "
          f"sft loss {sft.summary['first_loss']:.3f} -> {sft.summary['final_loss']:.3f}")
    print(f"[gate] {gate['decision'].upper()}" + (f": {', '.join(gate['blocking'])}" if gate["blocking"] else "")
          + f" -> {out_dir / 'release' / 'gate.json'}; report {report_path}")
    return {**summary, "release": gate["decision"]}

