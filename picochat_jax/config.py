"""Frozen configuration dataclasses.

`configs/base.yaml` holds every training default; `configs/<scale>.yaml` overrides a handful of keys;
command-line flags override last (`with_overrides`). ModelConfig is the architecture only: it is saved
next to every checkpoint so a checkpoint folder can be loaded on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "gelu", "relu2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    head_dim: int | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "rope"
    rope_theta: float = 10000.0
    # HF-style rope scaling dict stored as sorted (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    activation: str = "swiglu"
    qk_norm: bool = False
    tie_embeddings: bool = False
    parallel_residual: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    scaled_residual_init: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {self.norm!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"model.position must be one of {POSITIONS}, got {self.position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) or set head_dim")
        if self.position == "rope" and self.resolved_head_dim % 2:
            raise ValueError("rope needs an even head_dim")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling_dict
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = dict(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        scaling = raw.get("rope_scaling")
        if isinstance(scaling, dict):
            raw["rope_scaling"] = tuple(sorted((k, _freeze(v)) for k, v in scaling.items()))
        return cls(**raw)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, hd, L = self.d_model, self.resolved_head_dim, self.n_layers
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        n_mats = 3 if self.activation == "swiglu" else 2
        mlp = n_mats * d * self.d_ff + ((n_mats - 1) * self.d_ff + d if self.mlp_bias else 0)
        norm_width = 2 * d if self.norm == "layernorm" else d
        block = attn + mlp + 2 * norm_width
        total = L * block + norm_width
        if include_embeddings:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.position == "learned":
                total += self.max_seq_len * d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd+bwd = 6N plus attention), PaLM appendix B convention."""
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        attn = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len
        return 6.0 * matmul_params + attn


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str  # "bpe" (byte-level BPE) or "byte" (byte-level, no merges: char-level on ASCII)
    vocab_size: int
    min_frequency: int = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    grad_accum_steps: int
    learning_rate: float
    warmup_steps: int
    decay: str  # cosine | linear | none
    min_lr_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    precision: str  # fp32 | bf16
    remat: str  # none | full | dots
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    val_fraction: float
    seed: int
    seq_len: int | None = None  # defaults to model.max_seq_len
    all_assistant_turns: bool = False  # SFT: train on every assistant turn, not only the last

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear", "none"):
            raise ValueError(f"decay must be cosine|linear|none, got {self.decay!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32|bf16, got {self.precision!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none|full|dots, got {self.remat!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("steps, batch_size and grad_accum_steps must be >= 1")


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    description: str
    tokenizer: TokenizerConfig
    model: ModelConfig
    base: TrainConfig
    sft: TrainConfig
    eval_max_new_tokens: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "model": self.model.to_dict(),
            "base": dataclasses.asdict(self.base),
            "sft": dataclasses.asdict(self.sft),
            "eval_max_new_tokens": self.eval_max_new_tokens,
        }


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def available_scales(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem != "base")


def load_scale(name_or_path: str, config_dir: Path = CONFIG_DIR) -> ScaleConfig:
    """Load `configs/base.yaml` merged with a named scale (or an explicit YAML path)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown scale {name_or_path!r}; available: {', '.join(available_scales(config_dir))}")
    raw = _deep_merge(_read_yaml(config_dir / "base.yaml"), _read_yaml(path))
    return scale_from_dict(raw)


def scale_from_dict(raw: dict[str, Any]) -> ScaleConfig:
    train_defaults = raw.get("train", {})
    return ScaleConfig(
        name=raw["name"],
        description=raw.get("description", ""),
        tokenizer=TokenizerConfig(**raw["tokenizer"]),
        model=ModelConfig.from_dict(raw["model"]),
        base=TrainConfig(**_deep_merge(train_defaults, raw.get("base", {}))),
        sft=TrainConfig(**_deep_merge(train_defaults, raw.get("sft", {}))),
        eval_max_new_tokens=raw.get("eval_max_new_tokens", 64),
    )


def with_overrides(cfg: Any, **overrides: Any) -> Any:
    """`dataclasses.replace` that ignores None values (unset CLI flags)."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **clean) if clean else cfg
