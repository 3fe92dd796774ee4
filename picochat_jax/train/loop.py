"""The training driver shared by base pretraining and SFT: metrics, progress, eval, checkpoints, resume.

The loop only syncs with the device at log/eval/checkpoint steps; in between, steps are dispatched
asynchronously while grain prefetches the next batches on background threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm
from typing_extensions import Self

from picochat_jax.checkpoint import save_model_checkpoint
from picochat_jax.config import ModelConfig, TrainConfig
from picochat_jax.data.loader import (
    BatchSource,
    RowTable,
    as_rows,
    eval_batches,
    kept_tokens,
    resolve_length_buckets,
    row_length,
    trim_trailing_padding,
)
from picochat_jax.data.records import DataError
from picochat_jax.fileio import save_json
from picochat_jax.model.transformer import count_params, training_model
from picochat_jax.outdir import OutDirError, OutDirInUse, read_marker, write_marker
from picochat_jax.parallel import MeshShape, check_batch_fits, make_mesh
from picochat_jax.tensorboard import EventWriter
from picochat_jax.train.checkpoint import ResumeManager
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import ShardedTrainer, build_trainer

# Dense bf16 peak FLOP/s per chip, for the MFU estimate (vendor datasheet numbers).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "tpu v4": 275e12,
              "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


@dataclass
class TrainResult:
    status: str  # "completed" or "interrupted"
    final_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    params: Any = None


class _StopRequest:
    """SIGTERM sets a flag; the loop saves a resume checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# Settings that may change when a run resumes: bookkeeping, and `steps` (extending a run is deliberate).
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                               "eval_batches"})


def prepare_stage_dir(out_dir: Path | str, stage: str, resume: bool, resume_or_start: bool = False) -> Path:
    """A training stage's folder: refuse to start over an earlier stage's checkpoints unless resuming, and
    refuse `--resume` with nothing to resume (unless `resume_or_start`). Marks the folder as ours.

    Replacing a folder is the out-dir policy's job (outdir.py), done once per command before this runs.
    """
    out_dir = Path(out_dir)
    resume_dir = out_dir / "resume_checkpoint"
    has_checkpoint = resume_dir.exists() and any(resume_dir.iterdir())
    if has_checkpoint and not resume:
        raise OutDirInUse(f"{out_dir} already holds a {stage} run; pass --resume to continue it or "
                          f"--overwrite to start over (or choose another --out-dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(out_dir) is None:
        write_marker(out_dir, f"train-{stage}")
    return out_dir


def check_resume_settings(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint made with other settings, naming every key that differs. A setting the
    checkpoint does not record (one added since it was made) keeps its default and is not a mismatch."""
    diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(saved)
             if k.split(".")[-1] not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"--resume: {where} was made with other settings ({'; '.join(diffs)}); resume with the "
                         "original settings, or start a new run (--overwrite or another --out-dir)")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model.d_model": 64, ...} from nested dicts, for naming the keys that differ; lists compare whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def training_legs(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A stage's logged train windows, one list per process that trained it (a resumed run's legs), each
    without its first window, which holds the compile (and a resume's restore) rather than training speed.
    Rows carry their leg's number; in files written before they did, a process's clock starting again at 0
    (an elapsed_sec below the row before) opens a leg."""
    legs: list[list[dict[str, Any]]] = []
    previous: dict[str, Any] | None = None
    for row in rows:
        if previous is None or ("leg" in row and row["leg"] != previous.get("leg")) or (
                "leg" not in row and (row.get("elapsed_sec") or 0.0) < (previous.get("elapsed_sec") or 0.0)):
            legs.append([])
        elif row.get("tokens_per_sec"):
            legs[-1].append(row)
        previous = row
    return legs


def steady_windows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`training_legs`, flattened: the windows a stage's throughput is the mean of."""
    return [row for leg in training_legs(rows) for row in leg]


def read_history(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows up to a step. A torn last line (a crash mid-write) is dropped with a warning; a bad
    line before the end is an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                warnings.warn(f"{path}:{lineno}: dropped a torn last line (the run stopped mid-write)", stacklevel=2)
                continue
            raise DataError(path, lineno, None, "is not valid JSON; the metrics file is damaged") from None
        if isinstance(row, dict):
            rows.append(row)
    return [r for r in rows if r.get("step", 0) <= upto_step]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


@dataclass
class FitResult:
    """What the driver hands back to a stage: the trajectory, the final state and timing."""

    status: str  # "completed" or "interrupted"
    final_step: int
    history: list[dict[str, Any]]  # train rows (loss, lr, grad_norm, tokens_per_sec, ...)
    val_history: list[dict[str, Any]]  # val rows (val_loss, ...)
    best_val: float
    state: Any
    wall_sec: float  # the stage's own clock over every process that trained it (a resumed run's legs summed)
    tokens_per_sec: float | None  # mean over logged windows of every leg, each leg's compile window excluded
    mfu: float | None


def fit(*, stage: str, trainer: ShardedTrainer, init_state: Callable[[], Any], source: BatchSource,
        train_cfg: TrainConfig, out_dir: Path, settings: dict[str, Any], tokens_per_step: int,
        evaluate: Callable[[Any], dict[str, float] | None],
        save_model: Callable[[str, Any, dict[str, Any]], None],
        log_keys: tuple[str, ...] = ("loss", "bpb", "lr", "grad_norm"), flops_per_token: float | None = None,
        eval_at_start: bool = False, resume: bool = False, resume_or_start: bool = False,
        should_stop: Callable[[int], bool] | None = None, progress: bool = True,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        tensorboard_dir: Path | None = None, length_buckets: int = 1) -> FitResult:
    """The one training driver: resume, the step loop, metrics.jsonl, progress, evaluation and best-model
    saves, resume checkpoints (async orbax) and SIGTERM, the final model. Every kind of training runs here.

    `on_row(row)` sees every train and validation row as it is logged (progress files, dashboards). Every row
    also goes to a TensorBoard event file beside metrics.jsonl (or under `tensorboard_dir`), tagged
    `STAGE/KEY`.
    `evaluate(trainable_params)` returns the validation row (`val_loss` picks the best model) or None;
    `length_buckets` > 1 cuts each batch's trailing all-padding columns (`data.loader.trim_trailing_padding`).
    `save_model(name, trainable_params, meta)` writes the stage's model folder `name` ("checkpoint" = final,
    "best_checkpoint" = best val loss); `settings` is what a resume must match (named keys on a mismatch).
    The loop syncs with the device only at log/eval/checkpoint steps; in between, steps are dispatched
    asynchronously while grain prefetches the next batches on background threads.
    """
    out_dir = prepare_stage_dir(out_dir, stage, resume, resume_or_start)
    resume_dir = out_dir / "resume_checkpoint"
    manager = ResumeManager(resume_dir, train_cfg.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"
    best_val = math.inf
    if resume and manager.latest_step() is None and not resume_or_start:
        manager.close()
        raise OutDirError(f"--resume: {resume_dir} holds no complete checkpoint to resume from; start without "
                          "--resume, or pass --resume-or-start")
    if resume and manager.latest_step() is not None:
        try:
            saved = manager.read_meta()
            # Checkpoints made before "settings" existed recorded the model and train configs at top level.
            saved_settings = saved.get("settings") or {k: saved[k] for k in ("model", "train") if k in saved}
            check_resume_settings(flatten(saved_settings), flatten(settings), resume_dir)
        except ValueError:
            manager.close()  # no orbax threads left behind a refused resume
            raise
        state, meta = manager.restore(trainer.abstract_state())
        best_val = meta.get("best_val_loss", math.inf) or math.inf
        earlier_wall = float(meta.get("wall_sec") or 0.0)
        leg = int(meta.get("leg") or 1) + 1
        history = read_history(metrics_path, int(state.step))
    else:
        state = init_state()
        history = []
        earlier_wall, leg = 0.0, 1
    start = int(state.step)
    train_rows = [r for r in history if "loss" in r]
    val_rows = [r for r in history if "val_loss" in r]
    _write_rows(metrics_path, history)
    peak = peak_flops_per_device()
    n_devices = trainer.mesh.size

    def meta(step: int) -> dict[str, Any]:
        return {"stage": stage, "step": step, "data_position": step, "best_val_loss": best_val,
                "settings": settings, "wall_sec": earlier_wall + time.perf_counter() - t_start, "leg": leg}

    events = EventWriter(tensorboard_dir or out_dir)

    def append(row: dict[str, Any]) -> None:
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        events.scalars(int(row["step"]), {f"{stage}/{k}": v for k, v in row.items()
                                          if k not in ("step", "elapsed_sec", "leg")})
        if on_row is not None:
            on_row(row)

    def validate(step: int) -> dict[str, Any] | None:
        nonlocal best_val
        fields = evaluate(state.params)
        if fields is None:
            return None
        row = {"step": step, **fields}
        val_rows.append(row)
        append(row)
        if row["val_loss"] < best_val:
            best_val = row["val_loss"]
            save_model("best_checkpoint", state.params, {"stage": stage, "step": step, "val_loss": best_val})
        return row

    status = "completed"
    total = train_cfg.steps
    t_start = time.perf_counter()
    if eval_at_start and start == 0 and not val_rows:
        validate(0)
    t_last, window_tokens = time.perf_counter(), 0
    bar = tqdm(total=total, initial=start, desc=stage, unit="step", disable=not progress, dynamic_ncols=True)
    batches = source.iterate(start)
    with _StopRequest() as stop:
        for step in range(start, total):
            full = next(batches)
            batch = trim_trailing_padding(full, length_buckets)
            window_tokens += kept_tokens(full, batch, tokens_per_step)
            state, metrics = trainer.step(state, trainer.put_batch(batch))
            done = step + 1
            bar.update(1)
            log_now = done % train_cfg.log_every == 0 or done == total or done == start + 1
            if log_now:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                # The first logged window holds the compile; the summary's throughput skips it.
                tok_s = window_tokens / max(now - t_last, 1e-9)
                row = {"step": done, **{k: m[k] for k in log_keys if k in m}, "tokens_per_sec": tok_s,
                       "elapsed_sec": now - t_start, "leg": leg,
                       "mfu": (tok_s * flops_per_token / (peak * n_devices)) if (peak and flops_per_token) else None}
                train_rows.append(row)
                append(row)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{tok_s:,.0f}")
            if train_cfg.eval_every and done % train_cfg.eval_every == 0 and done != total:
                t_eval = time.perf_counter()
                vrow = validate(done)
                if vrow:
                    bar.write(f"[{stage}] step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in vrow.items()
                                                                   if k != "step"))
                t_last += time.perf_counter() - t_eval  # evaluation is not training throughput
            if log_now:
                t_last, window_tokens = time.perf_counter(), 0
            if train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0 and done != total:
                manager.save(done, state, meta(done))
            stop_now = stop.requested or (should_stop is not None and should_stop(done))
            if stop_now and done != total:
                manager.save(done, state, meta(done), force=True)
                status = "interrupted"
                bar.write(f"[{stage}] stopped at step {done}; resume checkpoint saved to {resume_dir}")
                break
    bar.close()
    wall = earlier_wall + time.perf_counter() - t_start
    final_step = int(state.step)
    # Resuming a stage that had already finished: its final folders exist, nothing new to evaluate or save.
    if status == "completed" and start < total:
        vrow = validate(final_step)
        if manager.latest_step() != final_step:
            manager.save(final_step, state, meta(final_step), force=True)
        save_model("checkpoint", state.params, {"stage": stage, "step": final_step,
                                                "val_loss": vrow["val_loss"] if vrow else None})
        if math.isinf(best_val):  # no val split: the final model is the best we know
            save_model("best_checkpoint", state.params, {"stage": stage, "step": final_step, "val_loss": None})
    manager.close()
    events.close()

    timed = steady_windows(train_rows)
    mean_tok_s = float(np.mean([r["tokens_per_sec"] for r in timed])) if timed else None
    mfu = (mean_tok_s * flops_per_token / (peak * n_devices)) if (peak and mean_tok_s and flops_per_token) else None
    return FitResult(status, final_step, train_rows, val_rows, best_val, state, wall, mean_tok_s, mfu)


def train(
    *,
    stage: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_rows: RowTable | dict[str, np.ndarray],
    val_rows: RowTable | dict[str, np.ndarray] | None,
    out_dir: Path,
    mesh_shape: MeshShape,
    token_bytes: np.ndarray,
    tokenizer_path: Path | None,
    init_params: Any = None,
    resume: bool = False,
    resume_or_start: bool = False,
    should_stop: Callable[[int], bool] | None = None,
    progress: bool = True,
    attention_impl: str | None = None,
    ce_chunk_tokens: int = 0,
    data_fingerprint: dict[str, Any] | None = None,
    tensorboard_dir: Path | None = None,
) -> TrainResult:
    """Base pretraining and SFT of a native model (causal-LM loss on every param) through `fit`. The rows are
    tables (`data.shards.PackedRows` streamed from disk, or in-memory arrays)."""
    rows_per_device = check_batch_fits(train_cfg.batch_size, mesh_shape)
    mesh = make_mesh(mesh_shape)
    source = BatchSource(train_rows, train_cfg.batch_size, train_cfg.grad_accum_steps, train_cfg.seed)
    seq_len = row_length(source.rows)
    model = training_model(model_cfg, train_cfg.precision, train_cfg.remat, mesh_shape.tensor, attention_impl,
                           rows=rows_per_device, seq_len=seq_len)
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, optimizer, schedule, token_bytes, mesh, ce_chunk_tokens=ce_chunk_tokens)
    val_table = as_rows(val_rows) if val_rows is not None else None
    val = eval_batches(val_table, train_cfg.batch_size, train_cfg.eval_batches) if val_table is not None else []

    def evaluate(params: Any) -> dict[str, float] | None:
        if not val:
            return None
        sums = trainer.evaluate_batches(params, val)
        return {"val_loss": sums["ce"] / max(sums["tokens"], 1),
                "val_bpb": sums["ce"] / (math.log(2) * max(sums["bytes"], 1))}

    def save_model(name: str, params: Any, meta: dict[str, Any]) -> None:
        save_model_checkpoint(out_dir / name, params, model_cfg, tokenizer_path, meta)

    def init_state() -> Any:
        return trainer.init(jax.random.key_data(jax.random.key(train_cfg.seed)), init_params)

    flops_per_token = model_cfg.flops_per_token(seq_len)
    run = fit(stage=stage, trainer=trainer, init_state=init_state, source=source, train_cfg=train_cfg,
              out_dir=out_dir, settings={"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                                         **({"data": data_fingerprint} if data_fingerprint else {})},
              tokens_per_step=seq_len * train_cfg.batch_size * train_cfg.grad_accum_steps, evaluate=evaluate,
              save_model=save_model, flops_per_token=flops_per_token, resume=resume,
              resume_or_start=resume_or_start, should_stop=should_stop, progress=progress,
              tensorboard_dir=tensorboard_dir, length_buckets=resolve_length_buckets(train_cfg.length_buckets))
    rows, vals = run.history, run.val_history
    summary = {
        "stage": stage, "status": run.status, "steps": run.final_step, "params": count_params(run.state.params),
        "tokens_seen": run.final_step * seq_len * train_cfg.batch_size * train_cfg.grad_accum_steps,
        "seq_len": seq_len, "train_examples": source.num_examples,
        "val_examples": 0 if val_table is None else len(val_table),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "final_bpb": rows[-1]["bpb"] if rows else None,
        "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "final_val_bpb": vals[-1]["val_bpb"] if vals else None,
        "tokens_per_sec": run.tokens_per_sec, "mfu": run.mfu,
        "flops_per_token": flops_per_token, "wall_sec": run.wall_sec, "mesh": str(mesh_shape),
        "devices": mesh_shape.size, "device_kind": jax.devices()[0].device_kind, "precision": train_cfg.precision,
    }
    save_json(out_dir / "summary.json", summary)
    return TrainResult(run.status, run.final_step, rows, vals, summary, run.state.params)
