"""Path B: supervised fine-tuning of a Hugging Face model (`picochat train hf-sft`).

The stages, top to bottom:

1. load the HF folder as our Decoder (hf/convert.py) and its tokenizer + chat template (HFChatFormat);
2. render every chat row with the model's *own* template; the target is what
   `apply_chat_template(full)` adds beyond `apply_chat_template(prompt, add_generation_prompt=True)`
   (the final assistant message, plus whatever the template wraps around it);
3. split off a held-out set, train with LoRA (adapters only in the optimizer) or full fine-tuning, evaluating
   the held-out loss a few times; the best evaluation picks `best_model/`;
4. write `final_model/` and `best_model/` (merged, complete HF folders), `final_adapter/`/`best_adapter/`
   (PEFT format), `hf_sft_report.json`, `report.md`, and last the done file.

The step functions come from train/step.py (full fine-tuning: `build_trainer` as is) and model/lora.py
(the same micro-batch/accumulation structure, differentiating the adapters only).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from picochat_jax import parallel
from picochat_jax.config import HFSFTConfig, TrainConfig
from picochat_jax.data.chat import pad_examples
from picochat_jax.data.loader import BatchSource, split_examples
from picochat_jax.data.records import Conversation, DataError, read_chat_jsonl
from picochat_jax.fileio import save_json, save_text
from picochat_jax.hf.chat_format import HFChatFormat
from picochat_jax.hf.convert import (
    check_peft_family,
    load_hf_model,
    read_generation_config,
    resolve_model_dir,
    save_hf_model,
    save_peft_adapter,
)
from picochat_jax.model import lora
from picochat_jax.model.transformer import count_params, logical_axes, training_model
from picochat_jax.outdir import check_out_dir, claim_out_dir
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import TrainState, build_trainer

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
    mesh: str | None = None
    done_file: Path | None = None
    overwrite: bool = False  # replace an earlier hf-sft output in out_dir (outdir.py policy)
    seed: int = 0
    cache_dir: Path | None = None  # HF cache to resolve hub ids in (default: the standard one)

    def __post_init__(self) -> None:
        if self.peft not in ("lora", "none"):
            raise ValueError(f"--peft must be lora|none, got {self.peft!r}")
        if self.max_steps < 1 or self.max_length < 2:
            raise ValueError("--max-steps must be >= 1 and --max-length >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


# --------------------------------------------------------------------------------------------------------
# rows -> ids + target mask
# --------------------------------------------------------------------------------------------------------


def _render(fmt: HFChatFormat, conv: Conversation, prompt: bool) -> str:
    messages = conv.messages[:-1] if prompt else conv.messages
    try:
        return fmt.render(messages, add_generation_prompt=prompt)
    except Exception as exc:  # jinja raises its own types (e.g. templates that reject a role order)
        raise DataError(conv.source, conv.line, "messages", f"the model's chat template failed: {exc}") from exc


def encode_chat_rows(conversations: Sequence[Conversation], fmt: HFChatFormat,
                     ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """[(ids, target mask)] per row with the model's chat template, and how many rows had a prompt
    rendering that is not a prefix of the full rendering (their target starts at the common prefix)."""
    full = fmt.encode_rendered([_render(fmt, c, prompt=False) for c in conversations])
    prompt = fmt.encode_rendered([_render(fmt, c, prompt=True) for c in conversations])
    out, mismatched = [], 0
    for conv, f_ids, p_ids in zip(conversations, full, prompt, strict=True):
        f_arr, p_arr = np.asarray(f_ids, np.int32), np.asarray(p_ids, np.int32)
        n = min(len(f_arr), len(p_arr))
        differs = f_arr[:n] != p_arr[:n]
        start = int(np.argmax(differs)) if differs.any() else n
        mismatched += int(start < len(p_arr))
        if start >= len(f_arr):
            raise DataError(conv.source, conv.line, "messages",
                            "the chat template renders no tokens for the final assistant message")
        out.append((f_arr, np.arange(len(f_arr)) >= start))
    return out, mismatched


def build_examples(conversations: Sequence[Conversation], fmt: HFChatFormat, max_length: int,
                   ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    encoded, mismatched = encode_chat_rows(conversations, fmt)
    longest = max(len(ids) for ids, _ in encoded) - 1
    seq_len = min(max_length, -(-longest // 16) * 16)  # one fixed shape, no longer than the data needs
    examples, truncated = pad_examples(encoded, seq_len, fmt.pad_id)
    return examples, {"rows": len(encoded), "seq_len": seq_len, "truncated_rows": truncated,
                      "template_prefix_mismatches": mismatched,
                      "target_tokens": int(examples["loss_mask"].sum())}


def val_batches(examples: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every held-out row exactly once; the last batch is filled with masked-out copies (fixed shapes)."""
    n = len(examples["inputs"])
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        batch = {k: v[idx % n] for k, v in examples.items()}
        batch["loss_mask"] = batch["loss_mask"] * (idx < n)[:, None]
        out.append({k: v[None] for k, v in batch.items()})
    return out


# --------------------------------------------------------------------------------------------------------
# trainers: the same three calls for LoRA and full fine-tuning
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Trainer:
    state: TrainState
    step: Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Any]]]
    evaluate: Callable[[TrainState, dict[str, Any]], Any]
    full_params: Callable[[Any], Any]  # host params (merged for LoRA) from state.params
    trainable: int
    put_batch: Callable[[dict[str, np.ndarray]], dict[str, Any]]


def _put_batch(mesh: Any) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    def put(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim, batch_dim=1)) for k, v in batch.items()}

    return put


def _full_trainer(model: Any, params: Any, train_cfg: TrainConfig, mesh: Any, token_bytes: np.ndarray) -> _Trainer:
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, optimizer, schedule, token_bytes, mesh)
    state = trainer.init(jax.random.key_data(jax.random.key(train_cfg.seed)), params)
    return _Trainer(state, trainer.step, lambda s, b: trainer.evaluate(s.params, b), jax.device_get,
                    count_params(params), _put_batch(mesh))


def _lora_trainer(model: Any, params: Any, lcfg: lora.LoraConfig, train_cfg: TrainConfig, mesh: Any,
                  token_bytes: np.ndarray) -> _Trainer:
    optimizer, schedule = make_optimizer(train_cfg)
    # The frozen base is only read, so bf16 runs keep it in bf16: half the memory, no master copy needed.
    dtype = jnp.bfloat16 if train_cfg.precision == "bf16" else jnp.float32
    host_base = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
    base_shardings = parallel.tree_shardings(logical_axes(model), host_base, mesh)
    base = jax.device_put(host_base, base_shardings)
    replicated = parallel.replicated(mesh)  # adapters are small: every device holds them whole
    adapters = lora.init_adapters(params, lcfg, jax.random.key(train_cfg.seed))
    state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters),
                                      jax.random.key_data(jax.random.key(train_cfg.seed))), replicated)
    batch_in = parallel.batch_sharding(mesh, 3, batch_dim=1)
    step = jax.jit(lora.make_lora_step_fn(model, lcfg, optimizer, schedule, token_bytes),
                   in_shardings=(replicated, base_shardings, batch_in), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
    evaluate = jax.jit(lora.make_lora_eval_fn(model, lcfg, token_bytes),
                       in_shardings=(replicated, base_shardings, batch_in), out_shardings=replicated)
    return _Trainer(state, lambda s, b: step(s, base, b), lambda s, b: evaluate(s.params, base, b),
                    lambda adapters: lora.merge_host(params, adapters, lcfg), lora.count_adapter_params(adapters),
                    _put_batch(mesh))


# --------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------


def hf_train_config(opts: HFSFTOptions) -> TrainConfig:
    """Fine-tuning defaults: short warmup, cosine to 10%, no weight decay, HF Trainer's Adam betas."""
    return TrainConfig(
        steps=opts.max_steps, batch_size=opts.batch_size, grad_accum_steps=opts.grad_accum_steps,
        learning_rate=opts.learning_rate, warmup_steps=max(1, opts.max_steps // 10), decay="cosine",
        min_lr_ratio=0.1, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, precision=opts.precision,
        remat="full" if opts.gradient_checkpointing else "none", log_every=max(1, opts.max_steps // 50),
        eval_every=max(1, opts.max_steps // opts.evals_per_run), eval_batches=0, checkpoint_every=0,
        keep_checkpoints=1, val_fraction=opts.val_fraction, seed=opts.seed)


def run_hf_sft(opts: HFSFTOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run Path B end to end; returns the report (also written to hf_sft_report.json). The done file, when
    asked for, is written last, with status "failed" and the error if anything raises."""
    try:
        report = _run(opts, log)
    except BaseException as exc:
        if opts.done_file is not None:
            save_json(opts.done_file, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                       "out_dir": str(opts.out_dir), "traceback": traceback.format_exc(limit=5)})
        raise
    if opts.done_file is not None:
        save_json(opts.done_file, {"status": "completed", **report["paths"]})
    return report


def _run(opts: HFSFTOptions, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out_dir = Path(opts.out_dir).absolute()
    conversations = read_chat_jsonl(opts.input)
    plan = check_out_dir(out_dir, "hf-sft", overwrite=opts.overwrite, resumable=False,
                         inputs=[resolve_model_dir(opts.model, opts.cache_dir), opts.input])
    hf = load_hf_model(opts.model, opts.cache_dir)
    if opts.peft == "lora":
        check_peft_family(hf.family)
    fmt = HFChatFormat.load(hf.path)
    if len(conversations) < 2:
        raise ValueError(f"{opts.input}: hf-sft needs at least 2 chat rows (one held out), got {len(conversations)}")
    max_length = min(opts.max_length, hf.config.max_seq_len)
    examples, data_stats = build_examples(conversations, fmt, max_length)
    train_cfg = hf_train_config(opts)
    train_ex, val_ex = split_examples(examples, opts.val_fraction, opts.seed)
    n_train, n_val = len(train_ex["inputs"]), len(val_ex["inputs"])
    claim_out_dir(plan, model=str(opts.model))
    log(f"[hf-sft] {hf.family} model {hf.path}: {len(conversations)} rows -> {n_train} train / {n_val} held out, "
        f"seq_len {data_stats['seq_len']}, {data_stats['truncated_rows']} truncated")

    mesh_shape = parallel.parse_mesh(opts.mesh)
    parallel.check_batch_fits(opts.batch_size, mesh_shape)
    mesh = parallel.make_mesh(mesh_shape)
    model = training_model(hf.config, opts.precision, train_cfg.remat, mesh_shape.tensor)
    token_bytes = np.zeros(hf.config.vocab_size, np.float32)  # bits-per-byte is not reported for HF tokenizers
    if opts.peft == "lora":
        trainer = _lora_trainer(model, hf.params, opts.lora, train_cfg, mesh, token_bytes)
    else:
        trainer = _full_trainer(model, hf.params, train_cfg, mesh, token_bytes)
    state = trainer.state
    source = BatchSource(train_ex, opts.batch_size, opts.grad_accum_steps, opts.seed)
    val = val_batches(val_ex, opts.batch_size) if n_val else []

    def held_out_loss() -> float | None:
        if not val:
            return None
        sums = np.zeros(3)
        for vb in val:
            sums += np.array(jax.device_get(trainer.evaluate(state, trainer.put_batch(vb))))
        return float(sums[0] / max(sums[1], 1.0))

    curve: list[dict[str, Any]] = []
    initial_val = held_out_loss()
    curve.append({"step": 0, "train_loss": None, "val_loss": initial_val, "lr": None, "grad_norm": None,
                  "elapsed_sec": 0.0})
    best = {"step": 0, "val_loss": initial_val, "params": jax.device_get(state.params)}
    log(f"[hf-sft] {opts.peft}: {trainer.trainable:,} trainable params; held-out loss before training "
        f"{'n/a' if initial_val is None else f'{initial_val:.4f}'}")

    tokens_per_step = data_stats["seq_len"] * opts.batch_size * opts.grad_accum_steps
    t_train = time.perf_counter()
    t_first: float | None = None  # end of step 1, which holds the compile
    eval_sec = 0.0  # held-out evaluations are not training throughput
    batches = source.iterate(0)
    for step in range(opts.max_steps):
        state, metrics = trainer.step(state, trainer.put_batch(next(batches)))
        done = step + 1
        evaluate_now = done % train_cfg.eval_every == 0 or done == opts.max_steps
        if done % train_cfg.log_every and not evaluate_now and done != 1:
            continue
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if t_first is None:
            t_first = time.perf_counter()
        t_eval = time.perf_counter()  # evaluation and the host copy of a new best are not training throughput
        val_loss = held_out_loss() if evaluate_now else None
        if val_loss is not None and (best["val_loss"] is None or val_loss < best["val_loss"]):
            best = {"step": done, "val_loss": val_loss, "params": jax.device_get(state.params)}
        eval_sec += time.perf_counter() - t_eval
        row = {"step": done, "train_loss": m["loss"], "val_loss": val_loss, "lr": m["lr"], "grad_norm": m["grad_norm"],
               "elapsed_sec": time.perf_counter() - t_train}
        curve.append(row)
        log(f"[hf-sft] step {done}/{opts.max_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"grad_norm {m['grad_norm']:.3f}" + ("" if val_loss is None else f" held-out {val_loss:.4f}"))
    jax.block_until_ready(state)
    train_sec = time.perf_counter() - t_train
    timed_steps = opts.max_steps - 1
    timed_sec = time.perf_counter() - t_first - eval_sec if t_first is not None else 0.0
    tokens_per_sec = tokens_per_step * timed_steps / timed_sec if timed_steps and timed_sec > 0 else None

    final_params = jax.device_get(state.params)
    paths = _write_outputs(opts, hf, final_params, best, trainer, out_dir)
    peft_config = None
    if opts.peft == "lora":
        peft_config = {"type": "lora", "rank": opts.lora.rank, "alpha": opts.lora.alpha,
                       "dropout": opts.lora.dropout, "targets": sorted(final_params)}
    report = {
        "status": "completed", "model": str(opts.model), "model_path": str(hf.path), "family": hf.family,
        "input": str(opts.input), "examples": data_stats["rows"],
        "split": {"train": n_train, "val": n_val, "val_fraction": opts.val_fraction},
        "data": data_stats, "model_config": hf.config.to_dict(), "train_config": asdict(train_cfg),
        "params": count_params(hf.params), "trainable_params": trainer.trainable, "peft": peft_config,
        "steps": opts.max_steps, "loss_curve": curve,
        "first_train_loss": next((r["train_loss"] for r in curve if r["train_loss"] is not None), None),
        "final_train_loss": curve[-1]["train_loss"], "initial_val_loss": initial_val,
        "final_val_loss": curve[-1]["val_loss"], "best_val_loss": best["val_loss"], "best_step": best["step"],
        "tokens_per_sec": tokens_per_sec,  # padded sequence positions per second, compile step excluded
        "train_sec": train_sec, "wall_sec": time.perf_counter() - t0, "mesh": str(mesh_shape),
        "device_kind": jax.devices()[0].device_kind, "precision": opts.precision, "paths": paths,
    }
    save_json(out_dir / "hf_sft_report.json", report)
    save_text(out_dir / "report.md", _report_markdown(report))
    log(f"[hf-sft] held-out loss {_fmt(initial_val)} -> best {_fmt(best['val_loss'])} at step {best['step']}; "
        f"outputs in {out_dir}")
    return report


def _write_outputs(opts: HFSFTOptions, hf: Any, final_params: Any, best: dict[str, Any], trainer: _Trainer,
                   out_dir: Path) -> dict[str, str]:
    # Merged weights are written in float32 whatever the source dtype: a small LoRA update can be below
    # bf16's resolution of the base weight and would vanish in the merge.
    hf_config = {**hf.hf_config, "dtype": "float32", "torch_dtype": "float32"}
    gen = read_generation_config(hf.path)
    paths = {"out_dir": str(out_dir)}
    for name, trained in (("final", final_params), ("best", best["params"])):
        model_dir = save_hf_model(out_dir / f"{name}_model", trainer.full_params(trained), hf.config, hf.family,
                                  hf_config, hf.path, gen)
        paths[f"{name}_model"] = str(model_dir)
        if opts.peft == "lora":
            adapter_dir = save_peft_adapter(out_dir / f"{name}_adapter", trained, opts.lora.rank, opts.lora.alpha,
                                            opts.lora.dropout, hf.config.n_layers, hf.family, str(opts.model))
            paths[f"{name}_adapter"] = str(adapter_dir)
    paths["report"] = str(out_dir / "hf_sft_report.json")
    paths["report_md"] = str(out_dir / "report.md")
    return paths


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _report_markdown(r: dict[str, Any]) -> str:
    peft = r["peft"]
    method = (f"LoRA r={peft['rank']} alpha={peft['alpha']} on {', '.join(peft['targets'])}" if peft
              else "full fine-tuning")
    lines = [
        f"# hf-sft: {r['model']}", "",
        f"- family: {r['family']}, {r['params']:,} params; {method} ({r['trainable_params']:,} trainable)",
        (f"- data: {r['examples']} rows from {r['input']} -> {r['split']['train']} train / "
         f"{r['split']['val']} held out; seq_len {r['data']['seq_len']}, {r['data']['truncated_rows']} truncated"),
        (f"- {r['steps']} steps, {r['precision']}, mesh {r['mesh']} on {r['device_kind']}, "
         f"{_fmt(r['tokens_per_sec'], ',.0f')} tokens/s, {r['train_sec']:.1f} s training"),
        (f"- held-out loss: {_fmt(r['initial_val_loss'])} before -> {_fmt(r['final_val_loss'])} final, "
         f"best {_fmt(r['best_val_loss'])} at step {r['best_step']} (-> best_model/)"), "",
        "| step | train loss | held-out loss | lr | grad norm | elapsed s |", "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["loss_curve"]:
        lines.append(f"| {row['step']} | {_fmt(row['train_loss'])} | {_fmt(row['val_loss'])} | "
                     f"{_fmt(row['lr'], '.2e')} | {_fmt(row['grad_norm'], '.3f')} | {row['elapsed_sec']:.1f} |")
    lines += ["", "Outputs: " + ", ".join(f"`{Path(p).name}/`" for k, p in r["paths"].items()
                                         if k.endswith(("_model", "_adapter")))]
    return "\n".join(lines) + "\n"
