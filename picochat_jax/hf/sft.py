"""Path B: supervised fine-tuning of a Hugging Face model (`picochat train hf-sft`).

The stages, top to bottom:

1. load the HF folder as our Decoder (hf/io.py, hf/families.py) and its tokenizer + chat template (HFChatFormat);
2. render every chat row with the model's *own* template; the target is what
   `apply_chat_template(full)` adds beyond `apply_chat_template(prompt, add_generation_prompt=True)`
   (the final assistant message, plus whatever the template wraps around it);
3. split off a held-out set, train with LoRA (adapters only in the optimizer) or full fine-tuning, evaluating
   the held-out loss a few times; the best evaluation picks `best_model/`;
4. write `final_model/` and `best_model/` (merged, complete HF folders), `final_adapter/`/`best_adapter/`
   (PEFT format), `hf_sft_report.json`, `report.md`, and last the done file.

Training runs on the one trainer (train/step.py `build_trainer`: every param, or LoRA adapters over a frozen
base) and the one driver (train/loop.py `fit`), so hf-sft has `--resume`, SIGTERM saves (a preempted run
continues its exact trajectory) and the same metrics.jsonl keys as every other stage.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax import parallel
from picochat_jax.config import HFSFTConfig, TrainConfig
from picochat_jax.data.chat import template_examples, template_preference_examples
from picochat_jax.data.loader import BatchSource, eval_batches, split_examples
from picochat_jax.data.packing import pack_examples
from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl, read_preference_jsonl
from picochat_jax.fileio import save_json, save_text
from picochat_jax.hf.chat_format import HFChatFormat
from picochat_jax.hf.export import save_hf_model, save_peft_adapter
from picochat_jax.hf.families import check_peft_family
from picochat_jax.hf.io import load_hf_model, read_generation_config, resolve_model_dir
from picochat_jax.markdown import number
from picochat_jax.model import lora, quant
from picochat_jax.model.transformer import count_params, make_model, training_model
from picochat_jax.outdir import check_out_dir, claim_out_dir, read_marker
from picochat_jax.train.dpo import PreferenceObjective, pair_scorer, preference_metrics, score_pairs
from picochat_jax.train.loop import fit
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import build_trainer

_D = HFSFTConfig()  # the option defaults are the config tree's (configs/base.yaml hf_sft:)


@dataclass(frozen=True)
class HFSFTOptions:
    model: str
    input: Path
    out_dir: Path
    max_steps: int = _D.max_steps
    max_length: int = _D.max_length
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    peft: str = _D.peft  # lora | none
    lora: lora.LoraConfig = field(default_factory=lora.LoraConfig)
    learning_rate: float = _D.learning_rate
    batch_size: int = _D.batch_size
    grad_accum_steps: int = _D.grad_accum_steps
    val_fraction: float = _D.val_fraction
    evals_per_run: int = _D.evals_per_run  # held-out evaluations spread over the run (plus one before step 1)
    optimizer: HFSFTConfig = _D  # warmup, decay, betas, clipping (the config tree's hf_sft: section)
    mesh: str | None = None
    done_file: Path | None = None  # a bare name lands in out_dir; a path with a folder is used as given
    progress_file: Path | None = None  # status JSON rewritten at every log step (same placement rule)
    overwrite: bool = False  # replace an earlier hf-sft output in out_dir (outdir.py policy)
    resume: bool = False  # continue an interrupted run in out_dir
    resume_or_start: bool = False
    progress: bool = True
    should_stop: Callable[[int], bool] | None = None  # tests: stop after a step, as SIGTERM would
    seed: int = 0
    cache_dir: Path | None = None  # HF cache to resolve hub ids in (default: the standard one)
    revision: str | None = None  # branch, tag or commit of a cached hub id
    trust_remote_code: bool = False  # accepted for the original's CLI; remote code is never run (hf/families.py)
    eval_input: Path | None = None  # eval JSONL scored with final_model at the end -> out_dir/eval
    packing: str = _D.packing  # bos_bestfit: several chat rows per training row (exact; data/packing.py) | none
    objective: str = "sft"  # sft (chat rows, assistant-only loss) | dpo (preference pairs: `train hf-dpo`)
    beta: float = 0.1  # dpo: pull towards the reference
    reference_model: str | None = None  # dpo: the frozen reference (default: the model being tuned, as loaded)
    tensorboard_dir: Path | None = None  # TensorBoard events (default: beside metrics.jsonl in out_dir)
    quantize: str = "none"  # 4bit: QLoRA, the frozen base's projections stored as NF4 (model/quant.py)
    ce_chunk_tokens: int = 0  # > 0: the loss's logits a chunk of rows at a time (sft; model/loss.py)

    def __post_init__(self) -> None:
        if self.peft not in ("lora", "none"):
            raise ValueError(f"--peft must be lora|none, got {self.peft!r}")
        if self.quantize not in quant.QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(quant.QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.quantize != "none" and self.peft != "lora":
            raise ValueError("--quantize 4bit (QLoRA) freezes the base weights in 4 bits: it needs --peft lora")
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be sft|dpo, got {self.objective!r}")
        if self.packing not in ("bos_bestfit", "none"):
            raise ValueError(f"--packing must be bos_bestfit|none, got {self.packing!r}")
        if self.ce_chunk_tokens < 0 or (self.ce_chunk_tokens and self.objective != "sft"):
            raise ValueError("--ce-chunk-tokens must be >= 0, and applies to hf-sft's loss only")
        if self.max_steps < 1 or self.max_length < 2:
            raise ValueError("--max-steps must be >= 1 and --max-length >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


# --------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------


def hf_train_config(opts: HFSFTOptions) -> TrainConfig:
    """The TrainConfig of an hf-sft run: its options plus the config tree's fine-tuning optimizer settings."""
    o = opts.optimizer
    return TrainConfig(
        steps=opts.max_steps, batch_size=opts.batch_size, grad_accum_steps=opts.grad_accum_steps,
        learning_rate=opts.learning_rate,
        warmup_steps=o.warmup_steps if o.warmup_steps is not None else max(1, int(opts.max_steps * o.warmup_fraction
                                                                                 + 1e-9)),
        decay=o.decay, min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, beta1=o.beta1, beta2=o.beta2,
        grad_clip=o.grad_clip, precision=opts.precision,
        remat="full" if opts.gradient_checkpointing else "none", log_every=max(1, opts.max_steps // 50),
        eval_every=max(1, opts.max_steps // opts.evals_per_run), eval_batches=0, checkpoint_every=0,
        keep_checkpoints=1, val_fraction=opts.val_fraction, seed=opts.seed)


def status_file_path(out_dir: Path, name: Path | str | None) -> Path | None:
    """Where a done or progress file goes, as the original picochat places it: a bare file name inside the
    out-dir, a path with a folder (or an absolute one) as given."""
    if name is None:
        return None
    path = Path(name)
    return path if path.is_absolute() or path.parent != Path(".") else Path(out_dir) / path


def _write_status(path: Path | None, out_dir: Path, payload: dict[str, Any]) -> None:
    """Write a done/progress file atomically, but never into an out-dir this run did not claim (a refused
    folder of the user's must stay untouched)."""
    if path is None:
        return
    if Path(out_dir).absolute() in path.absolute().parents and read_marker(out_dir) is None:
        return
    save_json(path, payload)


def run_hf_sft(opts: HFSFTOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run Path B end to end; returns the report (also written to hf_sft_report.json). The done file, when
    asked for, is written last, with status "failed" and the error if anything raises."""
    done = status_file_path(opts.out_dir, opts.done_file)
    try:
        report = _run(opts, log)
    except BaseException as exc:
        failure = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "out_dir": str(opts.out_dir),
                   "traceback": traceback.format_exc(limit=5)}
        _write_status(status_file_path(opts.out_dir, opts.progress_file), Path(opts.out_dir), failure)
        _write_status(done, Path(opts.out_dir), failure)
        raise
    _write_status(done, Path(opts.out_dir), {"status": report["status"], **report["paths"]})
    return report


def _run(opts: HFSFTOptions, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out_dir = Path(opts.out_dir).absolute()
    dpo = opts.objective == "dpo"
    stage = "hf-dpo" if dpo else "hf-sft"
    rows = read_preference_jsonl(opts.input) if dpo else read_chat_jsonl(opts.input)
    plan = check_out_dir(out_dir, stage, overwrite=opts.overwrite, resume=opts.resume,
                         resume_or_start=opts.resume_or_start,
                         inputs=[resolve_model_dir(opts.model, opts.cache_dir, opts.revision), opts.input,
                                 opts.eval_input,
                                 opts.reference_model and resolve_model_dir(opts.reference_model, opts.cache_dir)])
    eval_rows = read_eval_jsonl(opts.eval_input) if opts.eval_input is not None else None  # fail before training
    hf = load_hf_model(opts.model, opts.cache_dir, opts.revision)
    if opts.peft == "lora":
        check_peft_family(hf.family)
    fmt = HFChatFormat.load(hf.path)
    if len(rows) < 2:
        raise ValueError(f"{opts.input}: {stage} needs at least 2 rows (one held out), got {len(rows)}")
    ref_hf = None
    if dpo and opts.reference_model is not None:
        ref_hf = load_hf_model(opts.reference_model, opts.cache_dir)
        if ref_hf.config.vocab_size != hf.config.vocab_size:
            raise ValueError(f"--reference-model {opts.reference_model} has a vocabulary of "
                             f"{ref_hf.config.vocab_size}, the model {hf.config.vocab_size}: they must share one")
    max_length = min(opts.max_length, hf.config.max_seq_len)
    train_cfg = hf_train_config(opts)
    if dpo:
        examples, truncated = template_preference_examples(rows, fmt, max_length)
        data_stats = {"rows": len(rows), "seq_len": int(examples["chosen_inputs"].shape[1]),
                      "truncated_rows": truncated, "packing": "none"}
        fill = 1.0  # pairs are not packed
    else:
        examples, data_stats = template_examples(rows, fmt, max_length)
    train_ex, val_ex = split_examples(examples, opts.val_fraction, opts.seed)
    n_train, n_val = len(next(iter(train_ex.values()))), len(next(iter(val_ex.values())))
    if not dpo:
        train_lengths, _ = train_ex.pop("length"), val_ex.pop("length")
        if opts.packing == "bos_bestfit":
            # Exact: each example keeps its own attention segment, positions and assistant mask (data/packing.py).
            train_ex = pack_examples(train_ex, data_stats["seq_len"], fmt.pad_id, train_lengths)
        rows_used = len(train_ex["inputs"])
        fill = float(train_lengths.sum() / (rows_used * data_stats["seq_len"]))
        data_stats = {**data_stats, "packing": opts.packing, "train_rows_after_packing": rows_used,
                      "non_pad_fraction": round(fill, 4)}
    claim_out_dir(plan, model=str(opts.model))
    progress_path = status_file_path(out_dir, opts.progress_file)
    _write_status(progress_path, out_dir, {"status": "loading", "step": 0, "max_steps": opts.max_steps})
    log(f"[{stage}] {hf.family} model {hf.path}: {len(rows)} rows -> {n_train} train / {n_val} held out, "
        f"seq_len {data_stats['seq_len']}, {data_stats['truncated_rows']} truncated"
        + ("" if dpo else f"; packing {opts.packing}: {data_stats['train_rows_after_packing']} train rows, "
                          f"{fill:.0%} of positions are real tokens"))

    mesh_shape = parallel.parse_mesh(opts.mesh)
    parallel.check_batch_fits(opts.batch_size, mesh_shape)
    mesh = parallel.make_mesh(mesh_shape)
    model = training_model(hf.config, opts.precision, train_cfg.remat, mesh_shape.tensor)
    optimizer, schedule = make_optimizer(train_cfg)
    token_bytes = np.zeros(hf.config.vocab_size, np.float32)  # bits-per-byte is not reported for HF tokenizers
    lora_cfg = opts.lora if opts.peft == "lora" else None
    objective = PreferenceObjective(model, opts.beta) if dpo else None
    trainer = build_trainer(model, optimizer, schedule, None if dpo else token_bytes, mesh, lora_cfg=lora_cfg,
                            base_params=hf.params, objective=objective, ce_chunk_tokens=opts.ce_chunk_tokens,
                            base_dtype=jnp.bfloat16 if opts.precision == "bf16" else jnp.float32,
                            base_quantize=opts.quantize)
    # DPO scores the model training starts from: under QLoRA the dequantised NF4 base, which is also the
    # default reference (as peft's adapter-disabled base is), so policy and reference start equal either way.
    start_params = hf.params if opts.quantize == "none" or not dpo else quant.dequantized_over(
        quant.quantize_tree(hf.params, [lora.kernel_path(t) for t in lora.TARGETS]), hf.params)
    rng = jax.random.key_data(jax.random.key(opts.seed))
    trainable = count_params(trainer.abstract_state().params)  # shapes only: a resume never builds a fresh state
    scorer = None
    if dpo:
        # The frozen reference (the model as loaded, or --reference-model) is scored once; its log-probs ride
        # along in the batches, so the step holds one model.
        scorer = pair_scorer(make_model(hf.config, opts.precision))
        ref_scorer = pair_scorer(make_model(ref_hf.config, opts.precision)) if ref_hf else scorer
        ref_params = ref_hf.params if ref_hf else start_params
        for part in (train_ex, val_ex):
            if len(part["chosen_inputs"]):
                part["ref_chosen"], part["ref_rejected"] = score_pairs(ref_scorer, ref_params, part, opts.batch_size)
        del ref_hf
    source = BatchSource(train_ex, opts.batch_size, opts.grad_accum_steps, opts.seed)
    val = (eval_batches({**val_ex, "pair_weight": np.ones(n_val, np.float32)} if dpo else val_ex, opts.batch_size)
           if n_val else [])

    def evaluate(params: Any) -> dict[str, float] | None:
        if not val:
            return None
        sums = trainer.evaluate_batches(params, val)
        if dpo:
            pairs = max(sums["pairs"], 1.0)
            return {"val_loss": sums["loss"] / pairs, "val_reward_accuracy": sums["reward_accuracy"] / pairs,
                    "val_margin": sums["margin"] / pairs, "val_logp_margin": sums["logp_margin"] / pairs}
        return {"val_loss": sums["ce"] / max(sums["tokens"], 1.0)}

    hf_config = {**hf.hf_config, "dtype": "float32", "torch_dtype": "float32"}
    gen = read_generation_config(hf.path)
    folders = {"checkpoint": "final", "best_checkpoint": "best"}

    def save_model(name: str, params: Any, meta: dict[str, Any]) -> None:
        # Merged weights are written in float32 whatever the source dtype: a small LoRA update can be below
        # bf16's resolution of the base weight and would vanish in the merge.
        prefix = folders[name]
        save_hf_model(out_dir / f"{prefix}_model", trainer.full_params(params), hf.config, hf.family, hf_config,
                      hf.path, gen)
        if lora_cfg is not None:
            save_peft_adapter(out_dir / f"{prefix}_adapter", jax.device_get(params), lora_cfg.rank, lora_cfg.alpha,
                              lora_cfg.dropout, hf.config.n_layers, hf.family, str(opts.model))
        save_json(out_dir / f"{prefix}_model.json", meta)

    warnings = quantize_warnings(opts.quantize, hf.family)
    for warning in warnings:
        log(f"[{stage}] warning: {warning}")
    log(f"[{stage}] {opts.peft}{' over an NF4 base (QLoRA)' if opts.quantize == '4bit' else ''}: "
        f"{trainable:,} trainable params")
    settings = {"model": str(opts.model), "input": str(opts.input), "peft": opts.peft,
                "lora": asdict(opts.lora) if lora_cfg else None, "train": asdict(train_cfg),
                "max_length": max_length, "objective": opts.objective,
                **({"beta": opts.beta, "reference_model": opts.reference_model} if dpo else {})}
    log_keys = (("loss", "reward_accuracy", "margin", "logp_margin", "chosen_reward", "rejected_reward", "lr",
                 "grad_norm") if dpo else ("loss", "lr", "grad_norm"))
    run = fit(stage=stage, trainer=trainer, init_state=lambda: trainer.init(rng, None if lora_cfg else hf.params),
              source=source, train_cfg=train_cfg,
              out_dir=out_dir, settings=settings,
              tokens_per_step=data_stats["seq_len"] * opts.batch_size * opts.grad_accum_steps * (2 if dpo else 1),
              evaluate=evaluate, save_model=save_model, log_keys=log_keys, eval_at_start=True,
              resume=plan.action == "resume", resume_or_start=opts.resume_or_start, should_stop=opts.should_stop,
              progress=opts.progress,
              tensorboard_dir=opts.tensorboard_dir,
              on_row=lambda row: _write_status(progress_path, out_dir, {"status": "training",
                                                                          "max_steps": opts.max_steps, **row}))
    end = {"step": run.final_step, "max_steps": opts.max_steps, "best_val_loss": None if math.isinf(run.best_val)
           else run.best_val, "elapsed_sec": time.perf_counter() - t0}
    _write_status(progress_path, out_dir, {"status": "done" if run.status == "completed" else run.status, **end})
    if run.status != "completed":
        log(f"[{stage}] stopped at step {run.final_step}; continue with --resume")
        return {"status": "interrupted", "step": run.final_step, "paths": {"out_dir": str(out_dir)}}
    curve = _loss_curve(run.history, run.val_history)
    best = json.loads((out_dir / "best_model.json").read_text())
    paths = {"out_dir": str(out_dir)}
    for prefix in ("final", "best"):
        paths[f"{prefix}_model"] = str(out_dir / f"{prefix}_model")
        if lora_cfg is not None:
            paths[f"{prefix}_adapter"] = str(out_dir / f"{prefix}_adapter")
    report_name = f"{stage.replace('-', '_')}_report.json"
    paths["report"] = str(out_dir / report_name)
    paths["report_md"] = str(out_dir / "report.md")
    peft_config = None
    if lora_cfg is not None:
        peft_config = {"type": "lora", "rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                       "dropout": lora_cfg.dropout, "targets": sorted(run.state.params)}
    initial_val = next((r["val_loss"] for r in run.val_history if r["step"] == 0), None)
    report = {
        "status": "completed", "stage": stage, "model": str(opts.model), "revision": opts.revision,
        "model_path": str(hf.path),
        "family": hf.family,
        "input": str(opts.input), "examples": data_stats["rows"],
        "split": {"train": n_train, "val": n_val, "val_fraction": opts.val_fraction},
        "data": data_stats, "model_config": hf.config.to_dict(), "train_config": asdict(train_cfg),
        "params": count_params(hf.params), "trainable_params": trainable, "peft": peft_config,
        "steps": run.final_step, "loss_curve": curve,
        "first_train_loss": run.history[0]["loss"] if run.history else None,
        "final_train_loss": run.history[-1]["loss"] if run.history else None, "initial_val_loss": initial_val,
        "final_val_loss": run.val_history[-1]["val_loss"] if run.val_history else None,
        "best_val_loss": best.get("val_loss"), "best_step": best.get("step"),
        "tokens_per_sec": run.tokens_per_sec,  # padded sequence positions per second, compile step excluded
        "effective_tokens_per_sec": None if run.tokens_per_sec is None or dpo else run.tokens_per_sec * fill,
        "train_sec": run.wall_sec, "wall_sec": time.perf_counter() - t0, "mesh": str(mesh_shape),
        "device_kind": jax.devices()[0].device_kind, "precision": opts.precision, "quantize": opts.quantize,
        "ce_chunk_tokens": opts.ce_chunk_tokens,
        "warnings": warnings, "paths": paths,
    }
    if eval_rows:
        from picochat_jax.eval.chat import evaluate_chat
        from picochat_jax.generate import SamplingParams
        from picochat_jax.hf.chat_format import load_hf_chat

        engine, eval_fmt = load_hf_chat(out_dir / "final_model", precision=opts.precision)
        ev = evaluate_chat(engine, eval_fmt, eval_rows, out_dir / "eval", SamplingParams(max_new_tokens=64),
                           input_name=str(opts.eval_input))
        report["eval"] = {"input": str(opts.eval_input), "rows": ev["rows"], "passed": ev["passed"],
                          "pass_rate": ev["pass_rate"], "report": str(out_dir / "eval" / "eval_report.md")}
        log(f"[hf-sft] eval: {ev['passed']}/{ev['rows']} passed ({ev['pass_rate']:.1%}) -> {out_dir / 'eval'}")
    if dpo:
        # Over every pair: the policy starts equal to the reference unless --reference-model differs.
        final_full = trainer.full_params(run.state.params)
        everything = {k: np.concatenate([train_ex[k], val_ex[k]]) for k in train_ex}
        chosen, rejected = score_pairs(scorer, final_full, everything, opts.batch_size)
        start_c, start_r = score_pairs(scorer, start_params, everything, opts.batch_size)
        report["dpo"] = {"beta": opts.beta, "reference_model": opts.reference_model, "pairs": len(rows),
                         "before": preference_metrics(start_c, start_r, everything["ref_chosen"],
                                                      everything["ref_rejected"], opts.beta),
                         "after": preference_metrics(chosen, rejected, everything["ref_chosen"],
                                                     everything["ref_rejected"], opts.beta)}
        log(f"[hf-dpo] reward accuracy {report['dpo']['before']['reward_accuracy']:.2f} -> "
            f"{report['dpo']['after']['reward_accuracy']:.2f}, margin {report['dpo']['before']['margin']:.3f} -> "
            f"{report['dpo']['after']['margin']:.3f}")
    save_json(out_dir / report_name, report)
    save_text(out_dir / "report.md", _report_markdown(report))
    log(f"[{stage}] held-out loss {_loss(initial_val)} -> best {_loss(best.get('val_loss'))} at step "
        f"{best.get('step')}; outputs in {out_dir}")
    return report


def quantize_warnings(quantize: str, family: str) -> list[str]:
    """What a user should know before trusting a quantised run (the original picochat's advice for Qwen)."""
    if quantize == "none":
        return []
    out = ["merged final_model/best_model hold the adapters added to the dequantised NF4 base (the weights "
           "trained against); the PEFT adapter folders apply to the original base as well"]
    if family in ("qwen2", "qwen3"):
        out.insert(0, f"{family} under 4-bit quantisation: some Qwen checkpoints degrade noticeably under QLoRA; "
                      "start with bf16 LoRA (--quantize none) and compare held-out loss before relying on 4-bit")
    return out


def _loss(v: float | None) -> str:
    return number(v, ".4f")


def _loss_curve(train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged or evaluated step: the train and held-out losses side by side (metrics.jsonl keys)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in train_rows:
        by_step.setdefault(r["step"], {"step": r["step"]}).update(
            loss=r.get("loss"), lr=r.get("lr"), grad_norm=r.get("grad_norm"), elapsed_sec=r.get("elapsed_sec"))
    for r in val_rows:
        by_step.setdefault(r["step"], {"step": r["step"]})["val_loss"] = r["val_loss"]
    keys = ("step", "loss", "val_loss", "lr", "grad_norm", "elapsed_sec")
    return [{k: row.get(k) for k in keys} for _, row in sorted(by_step.items())]


def _report_markdown(r: dict[str, Any]) -> str:
    peft = r["peft"]
    method = (f"LoRA r={peft['rank']} alpha={peft['alpha']} on {', '.join(peft['targets'])}" if peft
              else "full fine-tuning")
    if r.get("quantize") == "4bit":
        method = f"QLoRA (NF4 base): {method}"
    lines = [
        f"# {r.get('stage', 'hf-sft')}: {r['model']}", "",
        f"- family: {r['family']}, {r['params']:,} params; {method} ({r['trainable_params']:,} trainable)",
        (f"- data: {r['examples']} rows from {r['input']} -> {r['split']['train']} train / "
         f"{r['split']['val']} held out; seq_len {r['data']['seq_len']}, {r['data']['truncated_rows']} truncated"),
        (f"- {r['steps']} steps, {r['precision']}, mesh {r['mesh']} on {r['device_kind']}, "
         f"{number(r['tokens_per_sec'], ',.0f')} positions/s ({number(r.get('effective_tokens_per_sec'), ',.0f')} "
         f"real tokens/s, packing {r['data'].get('packing', 'none')}), {r['train_sec']:.1f} s training"),
        (f"- held-out loss: {_loss(r['initial_val_loss'])} before -> {_loss(r['final_val_loss'])} final, "
         f"best {_loss(r['best_val_loss'])} at step {r['best_step']} (-> best_model/)"),
        *([f"- DPO (beta {r['dpo']['beta']}, reference {r['dpo']['reference_model'] or 'the model as loaded'}, "
           f"{r['dpo']['pairs']} pairs): reward accuracy {r['dpo']['before']['reward_accuracy']:.2f} -> "
           f"{r['dpo']['after']['reward_accuracy']:.2f}, margin {r['dpo']['before']['margin']:.3f} -> "
           f"{r['dpo']['after']['margin']:.3f}, log-prob margin {r['dpo']['before']['logp_margin']:.2f} -> "
           f"{r['dpo']['after']['logp_margin']:.2f}"] if r.get("dpo") else []),
        *([f"- eval ({r['eval']['input']}): {r['eval']['passed']}/{r['eval']['rows']} passed "
           f"({r['eval']['pass_rate']:.1%}), final_model; details in eval/eval_report.md"] if r.get("eval") else []),
        *[f"- **warning:** {w}" for w in r.get("warnings") or []],
        "",
        "| step | train loss | held-out loss | lr | grad norm | elapsed s |", "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["loss_curve"]:
        lines.append(f"| {row['step']} | {_loss(row['loss'])} | {_loss(row['val_loss'])} | "
                     f"{number(row['lr'], '.2e')} | {number(row['grad_norm'], '.3f')} | "
                     f"{number(row['elapsed_sec'], '.1f')} |")
    lines += ["", "Outputs: " + ", ".join(f"`{Path(p).name}/`" for k, p in r["paths"].items()
                                         if k.endswith(("_model", "_adapter")))]
    return "\n".join(lines) + "\n"
