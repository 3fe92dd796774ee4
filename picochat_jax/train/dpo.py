"""Direct Preference Optimization (Rafailov et al., 2023) after SFT.

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

Log-probabilities are summed over the *response* tokens only (the reply and its `<|end|>`): the mask comes
from the SFT encoder (`encode_conversations` on prompt + reply), so prompt, system and role tokens never
count. The reference model is the frozen starting checkpoint; its log-probs are computed once, before
training, and ride along in the batches as plain numbers, so the train step holds one model, not two.

DPO is an objective of the one train step (`PreferenceObjective` in `build_trainer`) and runs through the
one driver (`train.loop.fit`): gradient accumulation, any mesh, resume and SIGTERM saves as for SFT. Its
out-dir has the same layout as `sft/`: checkpoint/, best_checkpoint/, resume_checkpoint/, metrics.jsonl,
summary.json.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from picochat_jax import parallel
from picochat_jax.checkpoint import save_model_checkpoint
from picochat_jax.config import DPOConfig, ModelConfig, TrainConfig
from picochat_jax.data.chat import PREFERENCE_SIDES as SIDES
from picochat_jax.data.chat import preference_examples
from picochat_jax.data.loader import BatchSource, split_examples
from picochat_jax.data.records import PreferenceRow
from picochat_jax.fileio import save_json
from picochat_jax.model.transformer import Decoder, training_model
from picochat_jax.parallel import MeshShape, check_batch_fits, make_mesh
from picochat_jax.tokenizer import ChatTokenizer
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import ShardedTrainer, build_trainer

Array = jax.Array

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


@dataclass(frozen=True)
class PreferenceObjective:
    """The DPO loss as an objective of the one train step (train/step.py): mean over every pair of the
    accumulated batch; reference log-probs travel in the batch (`ref_chosen`, `ref_rejected`)."""

    model: Decoder
    beta: float

    def denominator(self, batch: dict[str, Array]) -> Array:
        if "pair_weight" in batch:
            return jnp.sum(batch["pair_weight"]).astype(jnp.float32)
        return jnp.float32(batch["ref_chosen"].shape[0] * batch["ref_chosen"].shape[1])

    def sums(self, params: Any, mb: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        pc, pr = pair_logps(self.model, params, mb)
        losses, parts = dpo_losses(pc, pr, mb["ref_chosen"], mb["ref_rejected"], self.beta)
        # Evaluation batches weight pairs (0 for the rows that only fill the last batch); training counts all.
        w = mb.get("pair_weight", jnp.ones_like(losses))
        sums = {"loss": jnp.sum(losses * w),
                "reward_accuracy": jnp.sum((parts["chosen_reward"] > parts["rejected_reward"]) * w),
                "pairs": jnp.sum(w), **{k: jnp.sum(v * w) for k, v in parts.items()}}
        return jnp.sum(losses * w), sums

    def metrics(self, sums: dict[str, Array], denominator: Array) -> dict[str, Array]:
        return {k: v / denominator for k, v in sums.items()}


def compile_pair_logps(trainer: ShardedTrainer, model: Decoder) -> Any:
    """`(params, pair batch) -> (chosen, rejected)` log-probs, jitted once with the trainer's mesh and shardings."""
    return jax.jit(parallel.traced_under(trainer.mesh, lambda p, b: pair_logps(model, p, b)),
                   in_shardings=(trainer.state_shardings.params, parallel.batch_sharding(trainer.mesh, 2, batch_dim=0)),
                   out_shardings=parallel.replicated(trainer.mesh))


def reference_logps(logps: Any, trainer: ShardedTrainer, params: Any, examples: dict[str, np.ndarray],
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Chosen/rejected log-probs of every pair under `params` (`logps` from `compile_pair_logps`), batches
    placed on the trainer's mesh."""
    return score_pairs(logps, params, examples, batch_size, place=lambda b: trainer.put_batch(b, batch_dim=0))


def pair_scorer(model: Decoder) -> Any:
    """`(full params, pair batch) -> (chosen, rejected)` log-probs, jitted; placement follows the arguments
    (hf-dpo's reference and before/after scoring, outside the trainer's mesh)."""
    return jax.jit(lambda p, b: pair_logps(model, p, b))


def score_pairs(scorer: Any, params: Any, examples: dict[str, np.ndarray], batch_size: int,
                place: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Chosen/rejected log-probs of every pair, in fixed-size batches (the last one wrapped around);
    `place` puts a host batch on devices (default: plain device arrays)."""
    n = len(examples["chosen_inputs"])
    keys = [f"{s}_{k}" for s in SIDES for k in ("inputs", "targets", "mask")]
    place = place or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        c, r = scorer(params, place({k: examples[k][idx] for k in keys}))
        take = min(batch_size, n - start)
        chosen[start:start + take] = np.asarray(c)[:take]
        rejected[start:start + take] = np.asarray(r)[:take]
    return chosen, rejected


@functools.partial(jax.jit, static_argnames="beta")
def _preference_means(chosen: Array, rejected: Array, ref_chosen: Array, ref_rejected: Array,
                      beta: float) -> dict[str, Array]:
    losses, parts = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta)
    return {"loss": jnp.mean(losses), "reward_accuracy": jnp.mean(parts["chosen_reward"] > parts["rejected_reward"]),
            "margin": jnp.mean(parts["margin"]), "logp_margin": jnp.mean(parts["logp_margin"])}


def preference_metrics(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray,
                       beta: float) -> dict[str, float]:
    """Mean DPO loss, reward accuracy and margins of scored pairs: one compiled program, not one per operation."""
    means = _preference_means(chosen, rejected, ref_chosen, ref_rejected, beta)
    return {k: float(v) for k, v in means.items()}


# --------------------------------------------------------------------------------------------- driver


@dataclass
class DPOResult:
    status: str
    final_step: int
    summary: dict[str, Any]
    params: Any = None


def train_dpo(*, model_cfg: ModelConfig, train_cfg: TrainConfig, dpo_cfg: DPOConfig, tok: ChatTokenizer,
              rows: Sequence[PreferenceRow], init_params: Any, out_dir: Path, mesh_shape: MeshShape,
              tokenizer_path: Path | None, resume: bool = False, resume_or_start: bool = False,
              should_stop: Callable[[int], bool] | None = None, progress: bool = True,
              tensorboard_dir: Path | None = None) -> DPOResult:
    """Train the policy (starting from, and referenced against, `init_params`) on preference pairs, through the
    one trainer and driver: gradient accumulation, meshes, resume and SIGTERM saves as for SFT."""
    from picochat_jax.train.loop import fit

    if not rows:
        raise ValueError("no preference pairs to train on")
    pairs_per_device = check_batch_fits(train_cfg.batch_size, mesh_shape)
    mesh = make_mesh(mesh_shape)
    examples, truncated = preference_examples(rows, tok, train_cfg.seq_len or model_cfg.max_seq_len)
    model = training_model(model_cfg, train_cfg.precision, train_cfg.remat, mesh_shape.tensor,
                           rows=2 * pairs_per_device, seq_len=int(examples["chosen_inputs"].shape[1]))
    optimizer, schedule = make_optimizer(train_cfg)
    trainer = build_trainer(model, optimizer, schedule, None, mesh, objective=PreferenceObjective(model, dpo_cfg.beta))

    def init_state() -> Any:
        return trainer.init(jax.random.key_data(jax.random.key(train_cfg.seed)), init_params)

    # The frozen reference: scored once, never differentiated.
    logps = compile_pair_logps(trainer, model)
    ref_params = init_state().params
    examples["ref_chosen"], examples["ref_rejected"] = reference_logps(logps, trainer, ref_params, examples,
                                                                       train_cfg.batch_size)
    del ref_params
    before = preference_metrics(examples["ref_chosen"], examples["ref_rejected"], examples["ref_chosen"],
                                examples["ref_rejected"], dpo_cfg.beta)
    train_ex, val_ex = split_examples(examples, train_cfg.val_fraction if len(rows) >= 10 else 0.0, train_cfg.seed)
    source = BatchSource(train_ex, train_cfg.batch_size, train_cfg.grad_accum_steps, train_cfg.seed)

    def on(params: Any, ex: dict[str, np.ndarray]) -> dict[str, float]:
        c, r = reference_logps(logps, trainer, params, ex, train_cfg.batch_size)
        return preference_metrics(c, r, ex["ref_chosen"], ex["ref_rejected"], dpo_cfg.beta)

    def evaluate(params: Any) -> dict[str, float] | None:
        if len(val_ex["ref_chosen"]) == 0:
            return None
        return {f"val_{k}": v for k, v in on(params, val_ex).items()}

    def save_model(name: str, params: Any, meta: dict[str, Any]) -> None:
        save_model_checkpoint(out_dir / name, params, model_cfg, tokenizer_path, {**meta, "beta": dpo_cfg.beta})

    seq_len = int(examples["chosen_inputs"].shape[1])
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum_steps * 2 * seq_len  # both sides of every pair
    run = fit(stage="dpo", trainer=trainer, init_state=init_state, source=source, train_cfg=train_cfg,
              out_dir=out_dir, tokens_per_step=tokens_per_step, evaluate=evaluate, save_model=save_model,
              settings={"beta": dpo_cfg.beta, "model": model_cfg.to_dict(), "train": asdict(train_cfg)},
              log_keys=("loss", "reward_accuracy", "margin", "logp_margin", "chosen_reward", "rejected_reward",
                        "lr", "grad_norm"),
              flops_per_token=model_cfg.flops_per_token(seq_len), resume=resume, resume_or_start=resume_or_start,
              tensorboard_dir=tensorboard_dir,
              should_stop=should_stop, progress=progress)
    train_rows, val_rows = run.history, run.val_history
    summary = {
        "stage": "dpo", "status": run.status, "steps": run.final_step, "beta": dpo_cfg.beta, "pairs": len(rows),
        "train_pairs": len(train_ex["ref_chosen"]), "val_pairs": len(val_ex["ref_chosen"]),
        "truncated_pairs": truncated, "seq_len": seq_len, "tokens_seen": run.final_step * tokens_per_step,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "final_loss": train_rows[-1]["loss"] if train_rows else None,
        "best_val_loss": None if math.isinf(run.best_val) else run.best_val,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        # Over every pair: the policy starts equal to the reference.
        "before": before, "after": on(run.state.params, examples),
        "learning_rate": train_cfg.learning_rate, "wall_sec": run.wall_sec, "tokens_per_sec": run.tokens_per_sec,
        "mfu": run.mfu, "mesh": str(mesh_shape), "device_kind": jax.devices()[0].device_kind,
        "precision": train_cfg.precision,
    }
    save_json(out_dir / "summary.json", summary)
    return DPOResult(run.status, run.final_step, summary, run.state.params)
