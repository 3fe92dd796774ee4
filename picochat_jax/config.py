"""One typed config tree of frozen dataclasses.

`configs/base.yaml` holds every default — training (`train:`, per stage `base:`/`sft:`), `dpo:`, `hf_sft:`,
`serve:` and `perf:`; `configs/<scale>.yaml` (or any YAML path given as `--scale`) overrides keys; `--set
key.sub=value` overrides any key after that; command-line flags override last (`with_overrides`). Every
section is parsed strictly: an unknown or misspelled key is an error naming it and the nearest valid one.
ModelConfig is the architecture only: it is saved next to every checkpoint so a checkpoint folder can be
loaded on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu2")  # geglu: gelu(tanh approximation)(gate) * up, as Gemma
SAMPLINGS = ("uniform", "balanced", "sqrt")


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
    # Sliding-window attention (Mistral, Phi-3): a query sees the keys of the last `sliding_window` positions.
    sliding_window: int | None = None
    # Gemma 2/3: which layers use the window (null = every layer), and the local layers' own RoPE theta
    # (Gemma 3; default RoPE, no scaling) while full-attention layers use rope_theta/rope_scaling.
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None
    embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
    sandwich_norm: bool = False  # RMSNorm on the attention and MLP outputs too, before the residual add (Gemma)
    query_scale: float | None = None  # attention scores times query_scale ** -0.5 (default head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    logit_softcap: float | None = None  # final logits -> cap * tanh(logits / cap) (Gemma 2)

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.sliding_layers is not None:
            if len(self.sliding_layers) != self.n_layers:
                raise ValueError(f"model.sliding_layers has {len(self.sliding_layers)} entries for "
                                 f"{self.n_layers} layers")
            if self.sliding_window is None:
                raise ValueError("model.sliding_layers needs model.sliding_window")
        if self.rope_local_theta is not None and self.sliding_layers is None:
            raise ValueError("model.rope_local_theta applies to sliding layers: set model.sliding_layers")
        if self.sandwich_norm and self.parallel_residual:
            raise ValueError("model.sandwich_norm and model.parallel_residual cannot be combined")
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
        check_keys(cls, raw, "model")
        scaling = raw.get("rope_scaling")
        if isinstance(scaling, dict):
            raw["rope_scaling"] = tuple(sorted((k, _freeze(v)) for k, v in scaling.items()))
        if isinstance(raw.get("sliding_layers"), list):
            raw["sliding_layers"] = tuple(bool(x) for x in raw["sliding_layers"])
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
        n_mats = 3 if self.activation in ("swiglu", "geglu") else 2
        mlp = n_mats * d * self.d_ff + ((n_mats - 1) * self.d_ff + d if self.mlp_bias else 0)
        norm_width = 2 * d if self.norm == "layernorm" else d
        block = attn + mlp + (4 if self.sandwich_norm else 2) * norm_width
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
    remat: str  # auto | none | full | dots (auto: model.transformer.resolve_remat)
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    val_fraction: float
    seed: int
    seq_len: int | None = None  # defaults to model.max_seq_len
    all_assistant_turns: bool = False  # SFT: train on every assistant turn, not only the last
    sampling: str = "uniform"  # SFT rows per category: uniform | balanced | sqrt (data/loader.resample_by_category)
    packing: str = "none"  # SFT rows: none (one per row) | bos_bestfit (best-fit packed, data/packing.py)
    # Each batch's rows are cut after its last loss position, to the shortest of this many equal lengths that
    # holds it (data.loader.trim_trailing_padding): the same losses, less padding computed, one program per
    # length. None = auto: 2 on CPU, 1 (always the full row) on GPU/TPU, where a compile costs more than padding.
    length_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.length_buckets is not None and self.length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1 (or null for auto), got {self.length_buckets}")
        if self.decay not in ("cosine", "linear", "none"):
            raise ValueError(f"decay must be cosine|linear|none, got {self.decay!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32|bf16, got {self.precision!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {'|'.join(SAMPLINGS)}, got {self.sampling!r}")
        if self.packing not in ("none", "bos_bestfit"):
            raise ValueError(f"packing must be none|bos_bestfit, got {self.packing!r}")
        if self.remat not in ("auto", "none", "full", "dots"):
            raise ValueError(f"remat must be auto|none|full|dots, got {self.remat!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("steps, batch_size and grad_accum_steps must be >= 1")


@dataclass(frozen=True)
class DPOConfig:
    """Preference tuning after SFT: `train dpo` and the DPO stage of `run tiny`."""

    beta: float = 0.1  # pull towards the reference model (higher = stay closer)
    steps: int = 20
    lr_fraction: float = 0.1  # DPO learning rate = the SFT stage's learning rate x this

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.steps < 1 or not 0 < self.lr_fraction <= 1:
            raise ValueError("dpo.steps must be >= 1 and dpo.lr_fraction in (0, 1]")


@dataclass(frozen=True)
class HFSFTConfig:
    """`train hf-sft` defaults (every one is also a flag)."""

    max_steps: int = 200
    max_length: int = 1024
    peft: str = "lora"  # lora | none
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    learning_rate: float = 2e-5
    batch_size: int = 8
    grad_accum_steps: int = 1
    val_fraction: float = 0.05
    evals_per_run: int = 5  # held-out evaluations spread over the run (plus one before the first step)
    packing: str = "bos_bestfit"  # several chat rows per training row (exact: segments, positions, masks) | none
    # > 0: hf-sft's cross-entropy in chunks of about this many tokens, so a large vocabulary's float32 logits never
    # exist for the whole batch at once (the same loss; one more vocabulary matmul in the backward pass)
    ce_chunk_tokens: int = 0
    # The fine-tuning optimizer: short warmup, cosine to min_lr_ratio, no weight decay, HF Trainer's Adam betas.
    warmup_fraction: float = 0.1
    warmup_steps: int | None = None  # the original's --lr-warmup-steps: overrides warmup_fraction when set
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ServeConfig:
    """`serve` defaults (every one is also a flag)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    chunk_tokens: int = 16  # decode steps per chunk: fewer host round trips per token than 8 (docs/performance.md)
    prefill_rows: int = 8  # waiting prompts prefilled per program call (1 or this many rows, padded)
    default_max_tokens: int = 256
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None = the served context
    hf_max_len: int = 4096  # KV cache for HF models, whose configs often advertise far longer contexts
    precision: str = "fp32"


@dataclass(frozen=True)
class PerfConfig:
    """Performance knobs of the training step (the same numbers either way; speed and memory differ)."""

    attention_impl: str = "auto"  # auto | xla | cudnn | pallas | splash (model.ops.resolve_attention_impl)
    ce_chunk_tokens: int = 0  # > 0: cross-entropy in chunks of about this many tokens (less memory)

    @property
    def attention(self) -> str | None:
        return None if self.attention_impl == "auto" else self.attention_impl


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    description: str
    tokenizer: TokenizerConfig
    model: ModelConfig
    base: TrainConfig
    sft: TrainConfig
    eval_max_new_tokens: int = 64
    dpo: DPOConfig = field(default_factory=DPOConfig)
    hf_sft: HFSFTConfig = field(default_factory=HFSFTConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved tree (what run_config.json records)."""
        return {
            "name": self.name,
            "description": self.description,
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "model": self.model.to_dict(),
            "base": dataclasses.asdict(self.base),
            "sft": dataclasses.asdict(self.sft),
            "eval_max_new_tokens": self.eval_max_new_tokens,
            **{name: dataclasses.asdict(getattr(self, name)) for name in ("dpo", "hf_sft", "serve", "perf")},
        }


SECTIONS: dict[str, type] = {"tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig,
                             "base": TrainConfig, "sft": TrainConfig, "dpo": DPOConfig, "hf_sft": HFSFTConfig,
                             "serve": ServeConfig, "perf": PerfConfig}
TOP_LEVEL_KEYS = ("name", "description", "eval_max_new_tokens", *SECTIONS)


def _unknown_key_error(key: str, valid: list[str], where: str) -> ValueError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where + '.' if where else ''}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown config key '{where + '.' if where else ''}{key}'{hint}")


def check_keys(cls: type, raw: dict[str, Any], where: str) -> None:
    """Refuse keys a config dataclass does not have, naming the nearest valid one."""
    if not isinstance(raw, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(raw).__name__}")
    valid = [f.name for f in fields(cls)]
    for key in raw:
        if key not in valid:
            raise _unknown_key_error(str(key), valid, where)


def _section(cls: type, raw: dict[str, Any], where: str) -> Any:
    check_keys(cls, raw, where)
    try:
        return cls(**raw)
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"config section '{where}': {exc}") from None


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


def parse_sets(sets: tuple[str, ...] | list[str]) -> list[tuple[list[str], Any]]:
    """`--set base.steps=10` -> [(["base", "steps"], 10)]; values are YAML (numbers, true, null, lists)."""
    out = []
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"--set expects KEY.SUB=VALUE, got {item!r}")
        out.append((key.strip().split("."), _yaml_scalar(value)))
    return out


def _yaml_scalar(text: str) -> Any:
    """A --set value as YAML, except that `1e-4` is a number (YAML 1.1 would need `1.0e-4`)."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_sets(raw: dict[str, Any], sets: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A copy of a raw config tree with `--set` overrides applied (validated later, with the rest)."""
    out = _deep_merge(raw, {})
    for path, value in parse_sets(sets):
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return out


def _scale_path(name_or_path: str, config_dir: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    path = config_dir / f"{name_or_path}.yaml"
    if name_or_path == "base" or not path.exists():
        raise ValueError(f"unknown scale {name_or_path!r}; available: {', '.join(available_scales(config_dir))} "
                         "(or a path to a .yaml file)")
    return path


def load_scale(name_or_path: str, sets: tuple[str, ...] | list[str] = (), config_dir: Path = CONFIG_DIR
               ) -> ScaleConfig:
    """`configs/base.yaml`, merged with a named scale or a YAML path, then `--set` overrides."""
    raw = _deep_merge(_read_yaml(config_dir / "base.yaml"), _read_yaml(_scale_path(name_or_path, config_dir)))
    return scale_from_dict(apply_sets(raw, sets))


def load_defaults(sets: tuple[str, ...] | list[str] = (), config_dir: Path = CONFIG_DIR) -> ScaleConfig:
    """The defaults alone (`configs/base.yaml` + `--set`), for commands with no scale: `serve`, `train hf-sft`.
    Sections a scale must give (tokenizer, model) are filled by the smallest scale, which such commands ignore."""
    return load_scale("smoke", sets, config_dir)


def scale_from_dict(raw: dict[str, Any]) -> ScaleConfig:
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key_error(str(key), list(TOP_LEVEL_KEYS), "")
    for key in ("name", "tokenizer", "model"):
        if key not in raw:
            raise ValueError(f"config is missing '{key}'")
    train_defaults = raw.get("train", {})
    check_keys(TrainConfig, train_defaults, "train")
    return ScaleConfig(
        name=raw["name"],
        description=raw.get("description", ""),
        tokenizer=_section(TokenizerConfig, raw["tokenizer"], "tokenizer"),
        model=ModelConfig.from_dict(raw["model"]),
        base=_section(TrainConfig, _deep_merge(train_defaults, raw.get("base") or {}), "base"),
        sft=_section(TrainConfig, _deep_merge(train_defaults, raw.get("sft") or {}), "sft"),
        eval_max_new_tokens=raw.get("eval_max_new_tokens", 64),
        **{name: _section(SECTIONS[name], raw.get(name) or {}, name) for name in ("dpo", "hf_sft", "serve", "perf")},
    )


def with_overrides(cfg: Any, **overrides: Any) -> Any:
    """`dataclasses.replace` that ignores None values (unset CLI flags)."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **clean) if clean else cfg
