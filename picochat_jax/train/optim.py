"""Optimizer and learning-rate schedule: AdamW, linear warmup, cosine/linear/no decay, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from picochat_jax.config import TrainConfig

# Weight decay touches matrices (kernels, embeddings) only; norms and biases are left alone.
DECAYED_PARAM_NAMES = ("kernel", "embed_tokens", "embed_positions")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, floor, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    def is_decayed(path: tuple[Any, ...], _leaf: Any) -> bool:
        keys = [getattr(k, "key", None) for k in path]
        return any(k in DECAYED_PARAM_NAMES for k in keys)

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
