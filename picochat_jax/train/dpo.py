"""Direct Preference Optimization (Rafailov et al., 2023) after SFT.

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

Log-probabilities are summed over the *response* tokens only (the reply and its `<|end|>`): the mask comes
from the SFT encoder (`encode_conversations` on prompt + reply), so prompt, system and role tokens never
count. The reference model is the frozen starting checkpoint; its log-probs are computed once, before
training, and ride along in the batches as plain numbers, so the train step holds one model, not two.

The driver reuses the SFT machinery: `make_optimizer`, grain `BatchSource` (batches indexed by step),
`TrainState`, the mesh shardings from logical axis names, resume checkpoints and self-contained model
folders. Its out-dir has the same layout as `sft/`: checkpoint/, best_checkpoint/, resume_checkpoint/,
metrics.jsonl, summary.json.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from picochat_jax import parallel
from picochat_jax.config import DPOConfig, ModelConfig, TrainConfig
from picochat_jax.data.chat import encode_conversations, pad_examples
from picochat_jax.data.loader import BatchSource, split_examples
from picochat_jax.data.records import Conversation, Message, PreferenceRow
from picochat_jax.fileio import save_json
from picochat_jax.model.transformer import Decoder, _dummy_tokens, training_model
from picochat_jax.outdir import OutDirError
from picochat_jax.parallel import MeshShape, check_batch_fits, make_mesh
from picochat_jax.tokenizer import ChatTokenizer
from picochat_jax.train.checkpoint import ResumeManager, save_model_checkpoint
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import TrainState

Array = jax.Array
SIDES = ("chosen", "rejected")

# DPO moves a converged SFT model: a fraction of its learning rate and a short run are enough, and more
# drifts the policy away from the reference (the beta term only slows that down).
def dpo_train_config(sft_cfg: TrainConfig, dpo_cfg: DPOConfig, steps: int | None = None,
                     learning_rate: float | None = None, **overrides: Any) -> TrainConfig:
    """The SFT stage's TrainConfig turned into DPO defaults (short run, smaller LR, no weight decay); the
    numbers live in the config tree's `dpo:` section."""
    steps = steps or dpo_cfg.steps
    cfg = replace(sft_cfg, steps=steps, learning_rate=learning_rate or sft_cfg.learning_rate * dpo_cfg.lr_fraction,
                  warmup_steps=min(sft_cfg.warmup_steps, max(steps // 10, 1)), weight_decay=0.0,
                  eval_every=max(steps // 2, 1), checkpoint_every=steps, val_fraction=0.1,
                  log_every=max(1, min(sft_cfg.log_every, steps // 15)))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------- data


def preference_examples(rows: Sequence[PreferenceRow], tok: ChatTokenizer, max_seq_len: int
                        ) -> tuple[dict[str, np.ndarray], int]:
    """Row-aligned arrays `{side}_inputs|targets|mask` for both sides, one shared padded length."""
    convs = {side: [Conversation(tuple(r.prompt) + (Message("assistant", getattr(r, side)),), source=r.source,
                                 line=r.line) for r in rows] for side in SIDES}
    encoded = {side: encode_conversations(convs[side], tok) for side in SIDES}
    longest = max(len(ids) for side in SIDES for ids, _ in encoded[side]) - 1
    seq_len = min(max_seq_len, -(-longest // 16) * 16)
    out: dict[str, np.ndarray] = {}
    truncated = 0
    for side in SIDES:
        arrays, cut = pad_examples(encoded[side], seq_len, tok.pad_id)
        truncated += cut
        out[f"{side}_inputs"], out[f"{side}_targets"], out[f"{side}_mask"] = (
            arrays["inputs"], arrays["targets"], arrays["loss_mask"])
    return out, truncated


# --------------------------------------------------------------------------------------------- math


def sequence_logps(model: Decoder, params: Any, inputs: Array, targets: Array, mask: Array) -> Array:
    """Sum of log p(target) over masked positions, per row: (B, T) -> (B,)."""
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(logp * mask, axis=-1)


def pair_logps(model: Decoder, params: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
    """(chosen, rejected) log-probs from one forward pass over both sides stacked on the batch axis."""
    n = batch["chosen_inputs"].shape[0]
    stacked = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("inputs", "targets",
                                                                                           "mask")}
    logps = sequence_logps(model, params, stacked["inputs"], stacked["targets"], stacked["mask"])
    return logps[:n], logps[n:]


def dpo_losses(policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array,
               beta: float) -> tuple[Array, dict[str, Array]]:
    """Per-pair DPO loss and the implicit rewards beta * (log pi - log ref)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    losses = -jax.nn.log_sigmoid(chosen_reward - rejected_reward)
    return losses, {"chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                    "margin": (chosen_reward - rejected_reward) / beta,
                    "logp_margin": policy_chosen - policy_rejected}


def _sums(model: Decoder, params: Any, mb: dict[str, Array], beta: float) -> tuple[Array, dict[str, Array]]:
    pc, pr = pair_logps(model, params, mb)
    losses, parts = dpo_losses(pc, pr, mb["ref_chosen"], mb["ref_rejected"], beta)
    sums = {"loss": jnp.sum(losses), "accuracy": jnp.sum(parts["chosen_reward"] > parts["rejected_reward"]),
            **{k: jnp.sum(v) for k, v in parts.items()}}
    return jnp.sum(losses), sums


def make_dpo_step(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule, beta: float):
    """Pure `(state, batch) -> (state, metrics)`; micro-batches under `lax.scan`, mean over all pairs."""

    def step_fn(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        pairs = batch["ref_chosen"].shape[0] * batch["ref_chosen"].shape[1]

        def micro(carry, mb):
            grads_acc, sums_acc = carry

            def objective(p):
                total, sums = _sums(model, p, mb, beta)
                return total / pairs, sums

            grads, sums = jax.grad(objective, has_aux=True)(state.params)
            return (jax.tree_util.tree_map(jnp.add, grads_acc, grads),
                    jax.tree_util.tree_map(jnp.add, sums_acc, sums)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "chosen_reward", "rejected_reward",
                                                            "margin", "logp_margin")}
        (grads, sums), _ = jax.lax.scan(micro, (zeros, zero_sums), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / pairs for k, v in sums.items()}
        metrics.update(lr=schedule(state.step), grad_norm=optax.tree.norm(grads))
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return step_fn


# --------------------------------------------------------------------------------------------- compiled


@dataclass
class DPOTrainer:
    mesh: Any
    state_shardings: TrainState
    init: Any
    step: Any
    logps: Any  # (params, batch of one side-pair, no accum axis) -> (chosen, rejected)

    def put(self, batch: dict[str, np.ndarray], batch_dim: int = 1) -> dict[str, Array]:
        return {k: jax.device_put(v, parallel.batch_sharding(self.mesh, v.ndim, batch_dim=batch_dim))
                for k, v in batch.items()}

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self.init, jnp.zeros((2,), jnp.uint32), None)
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                      self.state_shardings)


def build_dpo_trainer(model: Decoder, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                      beta: float, mesh: Any) -> DPOTrainer:
    """Shardings from the params' logical axis names, as for base/SFT training (see train/step.py)."""
    def boxed_state(rng_data):
        boxed = model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model.cfg))["params"]
        return TrainState(jnp.zeros((), jnp.int32), boxed, optimizer.init(boxed), rng_data)

    abstract_boxed = jax.eval_shape(boxed_state, jnp.zeros((2,), jnp.uint32))
    state_shardings = parallel.tree_shardings(nn.get_partition_spec(abstract_boxed),
                                              nn.meta.unbox(abstract_boxed), mesh)
    replicated = parallel.replicated(mesh)

    def state_from_params(rng_data: Array, params: Any) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng_data)

    jit_init = jax.jit(state_from_params, in_shardings=(replicated, state_shardings.params),
                       out_shardings=state_shardings)

    def init(rng_data: Array, params: Any) -> TrainState:
        if params is None:  # only for shapes (resume target)
            params = nn.meta.unbox(model.init(jax.random.wrap_key_data(rng_data), _dummy_tokens(model.cfg))["params"])
            return state_from_params(rng_data, params)
        return jit_init(rng_data, params)

    # Batch leaves are (grad_accum, batch, seq) token arrays and (grad_accum, batch) reference log-probs.
    batch_in = {f"{side}_{k}": parallel.batch_sharding(mesh, 3, batch_dim=1) for side in SIDES
                for k in ("inputs", "targets", "mask")}
    batch_in.update({f"ref_{side}": parallel.batch_sharding(mesh, 2, batch_dim=1) for side in SIDES})
    step = jax.jit(parallel.traced_under(mesh, make_dpo_step(model, optimizer, schedule, beta)),
                   in_shardings=(state_shardings, batch_in),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    logps = jax.jit(parallel.traced_under(mesh, lambda p, b: pair_logps(model, p, b)),
                    in_shardings=(state_shardings.params, parallel.batch_sharding(mesh, 2, batch_dim=0)),
                    out_shardings=replicated)
    return DPOTrainer(mesh, state_shardings, init, step, logps)


def all_logps(trainer: DPOTrainer, params: Any, examples: dict[str, np.ndarray], batch_size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Chosen/rejected log-probs of every pair, in fixed-size batches (the last one wrapped around)."""
    n = len(examples["chosen_inputs"])
    keys = [f"{s}_{k}" for s in SIDES for k in ("inputs", "targets", "mask")]
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        c, r = trainer.logps(params, trainer.put({k: examples[k][idx] for k in keys}, batch_dim=0))
        take = min(batch_size, n - start)
        chosen[start : start + take] = np.asarray(c)[:take]
        rejected[start : start + take] = np.asarray(r)[:take]
    return chosen, rejected


def preference_metrics(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray,
                       beta: float) -> dict[str, float]:
    losses, parts = dpo_losses(jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(ref_chosen),
                               jnp.asarray(ref_rejected), beta)
    return {"loss": float(jnp.mean(losses)),
            "reward_accuracy": float(jnp.mean(parts["chosen_reward"] > parts["rejected_reward"])),
            "margin": float(jnp.mean(parts["margin"])), "logp_margin": float(jnp.mean(parts["logp_margin"]))}


# --------------------------------------------------------------------------------------------- driver


@dataclass
class DPOResult:
    status: str
    final_step: int
    summary: dict[str, Any]
    params: Any = None


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def train_dpo(*, model_cfg: ModelConfig, train_cfg: TrainConfig, dpo_cfg: DPOConfig, tok: ChatTokenizer,
              rows: Sequence[PreferenceRow], init_params: Any, out_dir: Path, mesh_shape: MeshShape,
              tokenizer_path: Path | None, resume: bool = False, resume_or_start: bool = False,
              progress: bool = True) -> DPOResult:
    """Train the policy (starting from, and referenced against, `init_params`) on preference pairs."""
    from picochat_jax.train.loop import check_resume_settings, flatten, prepare_stage_dir, read_history

    out_dir = prepare_stage_dir(out_dir, "dpo", resume, resume_or_start)
    resume_dir = out_dir / "resume_checkpoint"
    if not rows:
        raise ValueError("no preference pairs to train on")

    check_batch_fits(train_cfg.batch_size, mesh_shape)
    mesh = make_mesh(mesh_shape)
    model = training_model(model_cfg, train_cfg.precision, train_cfg.remat, mesh_shape.tensor)
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_dpo_trainer(model, optimizer, schedule, dpo_cfg.beta, mesh)
    examples, truncated = preference_examples(rows, tok, train_cfg.seq_len or model_cfg.max_seq_len)

    t_start = time.perf_counter()
    rng = jax.random.key_data(jax.random.key(train_cfg.seed))
    ref_state = trainer.init(rng, init_params)
    # The frozen reference: scored once, never differentiated.
    examples["ref_chosen"], examples["ref_rejected"] = all_logps(trainer, ref_state.params, examples,
                                                                 train_cfg.batch_size)
    before = preference_metrics(examples["ref_chosen"], examples["ref_rejected"], examples["ref_chosen"],
                                examples["ref_rejected"], dpo_cfg.beta)
    train_ex, val_ex = split_examples(examples, train_cfg.val_fraction if len(rows) >= 10 else 0.0, train_cfg.seed)
    source = BatchSource(train_ex, train_cfg.batch_size, train_cfg.grad_accum_steps, train_cfg.seed)
    has_val = len(val_ex["ref_chosen"]) > 0

    manager = ResumeManager(resume_dir, train_cfg.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"
    best_val = math.inf
    if resume and manager.latest_step() is None and not resume_or_start:
        manager.close()
        raise OutDirError(f"--resume: {resume_dir} holds no complete checkpoint to resume from; start without "
                          "--resume, or pass --resume-or-start")
    if resume and manager.latest_step() is not None:
        saved = manager.read_meta()
        try:
            check_resume_settings(flatten({"beta": saved.get("beta"), "model": saved.get("model", {}),
                                           "train": saved.get("train", {})}),
                                  flatten({"beta": dpo_cfg.beta, "model": model_cfg.to_dict(),
                                           "train": asdict(train_cfg)}), resume_dir)
        except ValueError:
            manager.close()  # no orbax threads left behind a refused resume
            raise
        state, meta = manager.restore(trainer.abstract_state())
        best_val = meta.get("best_val_loss") or math.inf
        history = read_history(metrics_path, int(state.step))
    else:
        state, history = ref_state, []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    start = int(state.step)

    def evaluate(params: Any, ex: dict[str, np.ndarray]) -> dict[str, float]:
        c, r = all_logps(trainer, params, ex, train_cfg.batch_size)
        return preference_metrics(c, r, ex["ref_chosen"], ex["ref_rejected"], dpo_cfg.beta)

    def meta(step: int) -> dict[str, Any]:
        return {"stage": "dpo", "step": step, "data_position": step, "best_val_loss": best_val,
                "beta": dpo_cfg.beta, "model": model_cfg.to_dict(), "train": asdict(train_cfg)}

    def maybe_best(step: int) -> None:
        nonlocal best_val
        if not has_val:
            return
        v = evaluate(state.params, val_ex)
        row = {"step": step, **{f"val_{k}": x for k, x in v.items()}}
        _append(metrics_path, row)
        if v["loss"] < best_val:
            best_val = v["loss"]
            save_model_checkpoint(out_dir / "best_checkpoint", state.params, model_cfg, tokenizer_path,
                                  {"stage": "dpo", "step": step, "val_loss": best_val, "beta": dpo_cfg.beta})

    first_loss = last = None
    for step in range(start, train_cfg.steps):
        state, m = trainer.step(state, trainer.put(source.batch(step)))
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps or done == start + 1:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            last = {"step": done, "loss": m["loss"], "reward_accuracy": m["accuracy"], "margin": m["margin"],
                    "logp_margin": m["logp_margin"], "chosen_reward": m["chosen_reward"],
                    "rejected_reward": m["rejected_reward"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                    "elapsed_sec": time.perf_counter() - t_start}
            first_loss = m["loss"] if first_loss is None else first_loss
            _append(metrics_path, last)
            if progress:
                print(f"[dpo] step {done}: loss {m['loss']:.4f} reward acc {m['accuracy']:.2f} "
                      f"margin {m['margin']:.3f}")
        if train_cfg.eval_every and done % train_cfg.eval_every == 0 and done != train_cfg.steps:
            maybe_best(done)
        if train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0 and done != train_cfg.steps:
            manager.save(done, state, meta(done))

    final_step = int(state.step)
    maybe_best(final_step)
    if manager.latest_step() != final_step:  # resuming a finished run has nothing new to save
        manager.save(final_step, state, meta(final_step), force=True)
    manager.close()
    after = evaluate(state.params, examples)
    save_model_checkpoint(out_dir / "checkpoint", state.params, model_cfg, tokenizer_path,
                          {"stage": "dpo", "step": final_step, "beta": dpo_cfg.beta})
    if not (out_dir / "best_checkpoint").exists():
        save_model_checkpoint(out_dir / "best_checkpoint", state.params, model_cfg, tokenizer_path,
                              {"stage": "dpo", "step": final_step, "val_loss": None, "beta": dpo_cfg.beta})
    rows_hist = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    train_rows = [r for r in rows_hist if "loss" in r]
    val_rows = [r for r in rows_hist if "val_loss" in r]
    summary = {
        "stage": "dpo", "status": "completed", "steps": final_step, "beta": dpo_cfg.beta, "pairs": len(rows),
        "train_pairs": len(train_ex["ref_chosen"]), "val_pairs": len(val_ex["ref_chosen"]),
        "truncated_pairs": truncated, "seq_len": int(examples["chosen_inputs"].shape[1]),
        # Both sides of every pair go through the model each step.
        "tokens_seen": final_step * train_cfg.batch_size * train_cfg.grad_accum_steps * 2
        * int(examples["chosen_inputs"].shape[1]),
        "first_loss": train_rows[0]["loss"] if train_rows else first_loss,
        "final_loss": train_rows[-1]["loss"] if train_rows else None,
        "best_val_loss": None if math.isinf(best_val) else best_val,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "before": before, "after": after,  # over every pair: the policy starts equal to the reference
        "learning_rate": train_cfg.learning_rate, "wall_sec": time.perf_counter() - t_start,
        "mesh": str(mesh_shape), "precision": train_cfg.precision,
    }
    save_json(out_dir / "summary.json", summary)
    return DPOResult("completed", final_step, summary, state.params)
