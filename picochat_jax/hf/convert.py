"""The Hugging Face bridge: the only module that knows HF config keys and weight names.

transformers v5 ships no Flax models, so an HF causal LM becomes our own `Decoder`: `config.json` maps
onto a `ModelConfig` and the safetensors weights onto our scanned param tree (kernel = weight.T, one
leading layer axis per block weight). The mapping runs both ways, so a native checkpoint exports to a
folder that stock `AutoModelForCausalLM.from_pretrained` loads, and merged LoRA adapters export in PEFT's
own key names. Weights are read and written with `safetensors` on numpy: torch is never needed here.

Families: llama (Llama 2/3, SmolLM/SmolLM2), mistral, qwen2 (qkv bias), qwen3 (QK-norm), gpt2 (the
layernorm/learned-position/GELU shape of our small scales).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from picochat_jax.config import ModelConfig
from picochat_jax.fileio import discard_temp, replace_dir, save_json
from picochat_jax.model.lora import get_path
from picochat_jax.model.transformer import dummy_tokens, make_model

# model_type -> the architecture class name transformers needs in config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
PEFT_FAMILIES = (*LLAMA_LIKE, "gpt2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Buffers some checkpoints carry that are not weights (recomputed by every implementation).
_IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Our block param path -> the llama-family module path under `model.layers.{i}.`.
_LLAMA_MODULES = {
    **{("attn", p): f"self_attn.{p}" for p in ATTN_PROJ},
    **{("mlp", p): f"mlp.{p}" for p in MLP_PROJ},
    ("attn", "q_norm"): "self_attn.q_norm",
    ("attn", "k_norm"): "self_attn.k_norm",
    ("input_norm",): "input_layernorm",
    ("post_attention_norm",): "post_attention_layernorm",
}
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "bias": "bias"}

Params = dict[str, Any]


@dataclass(frozen=True)
class HFModel:
    """An HF checkpoint as our model: where it came from, its family, our config and float32 params."""

    path: Path
    family: str
    config: ModelConfig
    hf_config: dict[str, Any]
    params: Params


# --------------------------------------------------------------------------------------------------------
# Locating and reading a checkpoint
# --------------------------------------------------------------------------------------------------------


def resolve_model_dir(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder, or a hub id already in the local HF cache. Never touches the network."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.exists():
        raise FileNotFoundError(f"--model must be a folder or a hub id, got the file {path}")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(str(model), local_files_only=True, cache_dir=cache_dir)
    except Exception as exc:  # the hub raises several types for "not cached"
        raise FileNotFoundError(
            f"{model!r} is neither a local folder nor a model in the local Hugging Face cache (no network is "
            f"used); download it first, e.g. `hf download {model}`") from exc
    return Path(snapshot)


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"config.json not found: {path}")
    return json.loads(path.read_text())


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX_NAME
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
    elif (model_dir / WEIGHTS_NAME).exists():
        files = [model_dir / WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {model_dir} "
                                f"(only safetensors weights are read; convert .bin checkpoints first)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"weight shard listed in {index.name} is missing: {file}")
        with safe_open(str(file), framework="np") as fh:
            names = list(fh.keys())
            for key in names:
                tensors[key] = fh.get_tensor(key)
    return tensors


# --------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling) from either the v5 `rope_parameters` or the legacy theta/scaling keys."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params or dict(hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor < 1 (partial RoPE) is not supported")
    if kind == "default":
        return float(theta), None
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    if kind == "llama3" and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    return float(theta), tuple(sorted(scaling.items()))


def _sliding_window_cap(family: str, hf: dict[str, Any]) -> int | None:
    """Within its window, sliding-window attention is plain causal attention: cap the context there."""
    window = hf.get("sliding_window")
    if family == "mistral":
        return window
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return window
    return None


def config_from_hf(hf: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) for an HF config.json; unsupported architectures raise naming the supported ones."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        archs = hf.get("architectures") or [family]
        raise ValueError(f"unsupported architecture {archs[0]!r} (model_type {family!r}); supported: "
                         + ", ".join(f"{ARCHITECTURES[k]} ({k})" for k in ARCHITECTURES))
    if family == "gpt2":
        return family, _gpt2_config_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    # `relu` in a gated MLP with gate == up is relu(x)*x = relu(x)^2: how our relu2 models export.
    activation = {"silu": "swiglu", "relu": "relu2"}.get(act)
    if activation is None:
        raise ValueError(f"{family}: hidden_act {act!r} is not supported (supported: silu, relu)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = {"qwen2": True, "mistral": False}.get(family, attention_bias)
    out_bias = False if family in ("qwen2", "mistral") else attention_bias
    theta, scaling = _rope_from_hf(hf)
    max_len = int(hf.get("max_position_embeddings", 4096))
    window = _sliding_window_cap(family, hf)
    if window:
        max_len = min(max_len, int(window))
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"], max_seq_len=max_len,
        head_dim=None if head_dim * n_heads == d_model else head_dim, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=theta, rope_scaling=scaling,
        activation=activation, qk_norm=family == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    return family, cfg


def _gpt2_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    activation = {"gelu": "gelu", "relu2": "relu2"}.get(act)
    if activation is None:
        raise ValueError(f"gpt2: activation_function {act!r} is not supported (supported: gelu (exact erf), relu2); "
                         "the tanh approximation gelu_new of the original GPT-2 is not implemented")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("gpt2: only scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false is supported")
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["n_layer"], n_heads=n_heads, n_kv_heads=n_heads,
        d_ff=hf.get("n_inner") or 4 * d_model, max_seq_len=hf["n_positions"], norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned", activation=activation,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, out_bias=True, mlp_bias=True,
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def export_family(cfg: ModelConfig) -> str:
    """The stock transformers architecture that computes exactly what `cfg` computes, or a ValueError naming
    the option that no stock architecture can express."""
    if cfg.parallel_residual:
        raise ValueError("parallel_residual=true has no stock transformers architecture among "
                         f"{', '.join(ARCHITECTURES.values())}; train with parallel_residual=false to export")
    if cfg.norm == "rmsnorm" and cfg.position == "rope":
        if cfg.activation == "gelu":
            raise ValueError("activation=gelu with rmsnorm+rope: Llama/Qwen3 have gated MLPs only "
                             "(use activation swiglu or relu2)")
        if cfg.qk_norm:
            if cfg.mlp_bias:
                raise ValueError("qk_norm=true with mlp_bias=true: Qwen3 (the QK-norm architecture) has no MLP bias")
            return "qwen3"
        return "llama"
    if cfg.norm == "layernorm" and cfg.position == "learned":
        if cfg.qk_norm:
            raise ValueError("qk_norm=true with layernorm+learned positions: GPT-2 has no QK-norm")
        if cfg.activation == "swiglu":
            raise ValueError("activation=swiglu with layernorm+learned positions: GPT-2 has no gated MLP")
        if cfg.head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError(f"head_dim={cfg.head_dim} != d_model/n_heads: GPT-2 derives head_dim from d_model")
        return "gpt2"
    raise ValueError(f"norm={cfg.norm} with position={cfg.position} matches no stock transformers architecture "
                     "(exportable: rmsnorm+rope -> Llama/Qwen3, layernorm+learned -> GPT-2)")


def hf_config_from_native(cfg: ModelConfig, family: str, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for `family`. token_ids: bos/eos/pad ids from the tokenizer."""
    ids = {f"{k}_token_id": v for k, v in token_ids.items()}
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "dtype": "float32",
              "torch_dtype": "float32", "use_cache": True, **ids}
    if family == "gpt2":
        act = {"gelu": "gelu", "relu2": "relu2"}[cfg.activation]  # "gelu" is exact erf GELU, like ours
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    scaling = cfg.rope_scaling_dict
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
    out = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
           "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.d_ff,
           "hidden_act": "silu" if cfg.activation == "swiglu" else "relu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           # v5 reads rope_parameters; the legacy keys keep older transformers releases exact too.
           "rope_parameters": rope_parameters, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
           "attention_bias": cfg.qkv_bias or cfg.out_bias, "attention_dropout": 0.0}
    if family == "llama":
        out.update(mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    else:  # qwen3
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    return out


# --------------------------------------------------------------------------------------------------------
# weights: HF tensors <-> our param tree
# --------------------------------------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> Params:
    """The Decoder's param tree as shapes (traced abstractly: nothing is compiled or allocated)."""
    model = make_model(cfg)
    abstract = jax.eval_shape(lambda r: model.init(r, dummy_tokens(cfg)), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), nn.meta.unbox(abstract["params"]))


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _llama_name(path: tuple[str, ...]) -> str:
    """HF name of one of our leaves (layer leaves get a `{i}` placeholder)."""
    top = {("embed_tokens",): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
           ("lm_head", "kernel"): "lm_head.weight"}
    if path in top:
        return top[path]
    if path[0] != "layers" or path[1:-1] not in _LLAMA_MODULES:
        raise KeyError(f"no llama-family name for param {'/'.join(path)}")
    return f"model.layers.{{i}}.{_LLAMA_MODULES[path[1:-1]]}.{_LEAF_TO_HF[path[-1]]}"


class _Tensors:
    """HF tensors being consumed: missing keys and leftovers both become clear errors."""

    def __init__(self, tensors: dict[str, np.ndarray], source: Path):
        self.tensors, self.source, self.used = tensors, source, set()

    def take(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"{self.source}: weight {name!r} is missing from the checkpoint")
        self.used.add(name)
        return np.asarray(self.tensors[name], np.float32)

    def check_all_used(self, optional: tuple[str, ...] = ()) -> None:
        left = sorted(k for k in self.tensors if k not in self.used and k not in optional
                      and not _IGNORED_KEYS.search(k))
        if left:
            raise ValueError(f"{self.source}: {len(left)} weights do not fit the config (e.g. {left[:4]}); "
                             "the config.json and the weights disagree")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, family: str,
                   source: Path = Path("<tensors>")) -> Params:
    """Our float32 param tree from HF tensors, checked leaf by leaf against the Decoder's expected shapes."""
    expected = param_shapes(cfg)
    pool = _Tensors(tensors, source)
    params = (_gpt2_params_from_hf if family == "gpt2" else _llama_params_from_hf)(pool, cfg, expected)
    for path, shape in _flatten(expected):
        got = get_path(params, path)
        if got is None or tuple(got.shape) != shape:
            raise ValueError(f"{source}: param {'/'.join(path)} expected shape {shape}, "
                             f"got {None if got is None else got.shape}")
    optional = ("lm_head.weight",) if cfg.tie_embeddings else ()  # some tied checkpoints still store it
    pool.check_all_used(optional)
    return params


def _llama_params_from_hf(pool: _Tensors, cfg: ModelConfig, expected: Params) -> Params:
    params: Params = {}
    for path, _ in _flatten(expected):
        name = _llama_name(path)
        if path[0] == "layers":
            layers = [pool.take(name.format(i=i)) for i in range(cfg.n_layers)]
            value = np.stack([w.T for w in layers] if path[-1] == "kernel" else layers)
        else:
            value = pool.take(name)
            value = value.T if path[-1] == "kernel" else value
        _set(params, path, value)
    if cfg.activation == "relu2":  # exported as relu(gate) * up with gate == up: check, then drop the copy
        for i in range(cfg.n_layers):
            for leaf in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                gate = pool.take(f"model.layers.{i}.mlp.gate_proj.{leaf}")
                if not np.array_equal(gate, pool.take(f"model.layers.{i}.mlp.up_proj.{leaf}")):
                    raise ValueError(f"{pool.source}: hidden_act 'relu' is only supported as relu^2, i.e. with "
                                     f"mlp.gate_proj == mlp.up_proj (layer {i} differs)")
    return params


def _gpt2_params_from_hf(pool: _Tensors, cfg: ModelConfig, expected: Params) -> Params:
    d, L = cfg.d_model, cfg.n_layers
    h = "transformer.h.{i}."

    def stack(name: str) -> np.ndarray:  # Conv1D weights are (in, out) already: no transpose
        return np.stack([pool.take((h + name).format(i=i)) for i in range(L)])

    c_attn_w, c_attn_b = stack("attn.c_attn.weight"), stack("attn.c_attn.bias")
    attn = {p: {"kernel": c_attn_w[:, :, j * d:(j + 1) * d], "bias": c_attn_b[:, j * d:(j + 1) * d]}
            for j, p in enumerate(("q_proj", "k_proj", "v_proj"))}
    attn["o_proj"] = {"kernel": stack("attn.c_proj.weight"), "bias": stack("attn.c_proj.bias")}
    params: Params = {
        "embed_tokens": pool.take("transformer.wte.weight"),
        "embed_positions": pool.take("transformer.wpe.weight"),
        "layers": {
            "input_norm": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
            "post_attention_norm": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
            "attn": attn,
            "mlp": {"up_proj": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
                    "down_proj": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")}},
        },
        "final_norm": {"scale": pool.take("transformer.ln_f.weight"), "bias": pool.take("transformer.ln_f.bias")},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": pool.take("lm_head.weight").T}
    return params


def params_to_hf(params: Params, cfg: ModelConfig, family: str) -> dict[str, np.ndarray]:
    """HF tensors (float32 numpy) for `family` from our param tree."""
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    if family == "gpt2":
        return _gpt2_params_to_hf(params, cfg)
    if family not in LLAMA_LIKE:
        raise ValueError(f"cannot write weights for family {family!r}")
    out: dict[str, np.ndarray] = {}
    for path, value in _flatten(params):
        name = _llama_name(path)
        if path[0] == "layers":
            for i in range(cfg.n_layers):
                out[name.format(i=i)] = value[i].T if path[-1] == "kernel" else value[i]
        elif not (cfg.tie_embeddings and path == ("lm_head", "kernel")):
            out[name] = value.T if path[-1] == "kernel" else value
    L, hd = cfg.n_layers, cfg.resolved_head_dim
    widths = {"q_proj": cfg.n_heads * hd, "k_proj": cfg.n_kv_heads * hd, "v_proj": cfg.n_kv_heads * hd,
              "o_proj": cfg.d_model}
    for i in range(L):
        # HF's attention_bias covers q, k, v and o together: a bias we lack is an exact zero.
        if family in ("llama", "qwen3") and (cfg.qkv_bias or cfg.out_bias):
            for p, width in widths.items():
                out.setdefault(f"model.layers.{i}.self_attn.{p}.bias", np.zeros(width, np.float32))
        if cfg.activation == "relu2":  # relu(gate(x)) * up(x) with gate == up is relu(up(x))^2
            for leaf in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                out[f"model.layers.{i}.mlp.gate_proj.{leaf}"] = out[f"model.layers.{i}.mlp.up_proj.{leaf}"].copy()
    return out


def _gpt2_params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    layers, attn = params["layers"], params["layers"]["attn"]
    rep = cfg.n_heads // cfg.n_kv_heads
    hd = cfg.resolved_head_dim

    def kv_heads_to_mha(x: np.ndarray) -> np.ndarray:
        # GPT-2 has no GQA; repeating each kv head for its query group (HF's repeat_kv order) is exact.
        if rep == 1:
            return x
        shaped = x.reshape(*x.shape[:-1], cfg.n_kv_heads, hd)
        return np.repeat(shaped, rep, axis=-2).reshape(*x.shape[:-1], cfg.n_heads * hd)

    def bias(tree: Params, width: int) -> np.ndarray:
        return tree["bias"] if "bias" in tree else np.zeros((cfg.n_layers, width), np.float32)

    d, ff = cfg.d_model, cfg.d_ff
    c_attn_w = np.concatenate([attn["q_proj"]["kernel"], kv_heads_to_mha(attn["k_proj"]["kernel"]),
                               kv_heads_to_mha(attn["v_proj"]["kernel"])], axis=-1)
    c_attn_b = np.concatenate([bias(attn["q_proj"], d), kv_heads_to_mha(bias(attn["k_proj"], cfg.n_kv_heads * hd)),
                               kv_heads_to_mha(bias(attn["v_proj"], cfg.n_kv_heads * hd))], axis=-1)
    per_layer = {
        "ln_1.weight": layers["input_norm"]["scale"], "ln_1.bias": layers["input_norm"]["bias"],
        "ln_2.weight": layers["post_attention_norm"]["scale"], "ln_2.bias": layers["post_attention_norm"]["bias"],
        "attn.c_attn.weight": c_attn_w, "attn.c_attn.bias": c_attn_b,
        "attn.c_proj.weight": attn["o_proj"]["kernel"], "attn.c_proj.bias": bias(attn["o_proj"], d),
        "mlp.c_fc.weight": layers["mlp"]["up_proj"]["kernel"], "mlp.c_fc.bias": bias(layers["mlp"]["up_proj"], ff),
        "mlp.c_proj.weight": layers["mlp"]["down_proj"]["kernel"],
        "mlp.c_proj.bias": bias(layers["mlp"]["down_proj"], d),
    }
    out = {f"transformer.h.{i}.{k}": v[i] for k, v in per_layer.items() for i in range(cfg.n_layers)}
    out["transformer.wte.weight"] = params["embed_tokens"]
    out["transformer.wpe.weight"] = params["embed_positions"]
    out["transformer.ln_f.weight"] = params["final_norm"]["scale"]
    out["transformer.ln_f.bias"] = params["final_norm"]["bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out


# --------------------------------------------------------------------------------------------------------
# Whole folders
# --------------------------------------------------------------------------------------------------------


def load_hf_model(model: str | Path, cache_dir: str | Path | None = None) -> HFModel:
    """Load an HF causal-LM folder (or cached hub id) as (family, ModelConfig, float32 params)."""
    path = resolve_model_dir(model, cache_dir)
    hf = read_hf_config(path)
    family, cfg = config_from_hf(hf)
    params = params_from_hf(read_safetensors(path), cfg, family, path)
    return HFModel(path=path, family=family, config=cfg, hf_config=hf, params=params)


def _dtype_of(hf_config: dict[str, Any]) -> str:
    name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"


@contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `directory` in one rename."""
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        replace_dir(tmp, directory)
    except BaseException:
        discard_temp(tmp)
        raise


def write_weights(folder: Path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    cast = DTYPES[dtype]
    save_file({k: np.ascontiguousarray(v.astype(cast)) for k, v in tensors.items()}, str(Path(folder) / WEIGHTS_NAME),
              metadata={"format": "pt"})  # transformers refuses safetensors files without a format tag


def save_hf_model(out_dir: Path, params: Params, cfg: ModelConfig, family: str, hf_config: dict[str, Any],
                  tokenizer_dir: Path | None = None, generation_config: dict[str, Any] | None = None,
                  extra_json: dict[str, Any] | None = None) -> Path:
    """Write a complete HF folder atomically: config.json, model.safetensors (in the config's dtype),
    generation_config.json, the tokenizer files found in `tokenizer_dir` and any `extra_json` files (the
    out-dir marker, which must be inside before the folder appears)."""
    dtype = _dtype_of(hf_config)
    hf_config = {**hf_config, "dtype": dtype, "torch_dtype": dtype}
    tensors = params_to_hf(params, cfg, family)
    with atomic_dir(Path(out_dir)) as tmp:
        save_json(tmp / "config.json", hf_config)
        write_weights(tmp, tensors, dtype)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        gen = generation_config or {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                    if hf_config.get(k) is not None}
        save_json(tmp / "generation_config.json", gen)
        for name, payload in (extra_json or {}).items():
            save_json(tmp / name, payload)
    return Path(out_dir)


def read_generation_config(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else None


def export_tokenizer(tokenizer_path: Path, out_dir: Path, max_len: int) -> dict[str, int]:
    """Our tokenizer.json as a transformers fast tokenizer with bos/eos/pad and the native chat template.
    Returns the special ids for config.json."""
    from transformers import PreTrainedTokenizerFast

    from picochat_jax.data.chat import JINJA_CHAT_TEMPLATE
    from picochat_jax.tokenizer import BOS, END, PAD, ChatTokenizer

    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    ours = ChatTokenizer.load(tokenizer_path)  # validates the special tokens
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), bos_token=BOS, eos_token=END, pad_token=PAD,
                                  model_max_length=max_len, chat_template=JINJA_CHAT_TEMPLATE)
    tok.save_pretrained(str(out_dir))
    # The generic class name loads in both transformers 4.x and 5.x.
    config_path = Path(out_dir) / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.setdefault("chat_template", JINJA_CHAT_TEMPLATE)
    save_json(config_path, tok_config)
    return {"bos": ours.bos_id, "eos": ours.end_id, "pad": ours.pad_id}


def export_native(checkpoint_dir: Path, tokenizer_path: Path | None, out_dir: Path,
                  overwrite: bool = False) -> tuple[str, Path]:
    """A native picochat checkpoint -> a stock transformers folder. Returns (family, out_dir).

    The folder follows the out-dir policy (outdir.py); its marker records the source checkpoint and the
    tokenizer's vocab size and hash."""
    from picochat_jax.checkpoint import checkpoint_tokenizer, load_model_checkpoint, tokenizer_fingerprint
    from picochat_jax.outdir import MARKER, check_out_dir, marker_payload

    tokenizer_path = checkpoint_tokenizer(checkpoint_dir, tokenizer_path)
    plan = check_out_dir(out_dir, "hf-export", overwrite=overwrite, resumable=False,
                         inputs=[checkpoint_dir, tokenizer_path])
    params, cfg, _ = load_model_checkpoint(checkpoint_dir)
    family = export_family(cfg)
    marker = marker_payload("hf-export", source_checkpoint=str(Path(checkpoint_dir).absolute()),
                            tokenizer=tokenizer_fingerprint(tokenizer_path))
    return family, export_params(params, cfg, tokenizer_path, plan.path, extra_json={MARKER: marker})


def export_params(params: Params, cfg: ModelConfig, tokenizer_path: Path, out_dir: Path,
                  extra_json: dict[str, Any] | None = None) -> Path:
    family = export_family(cfg)
    with tempfile.TemporaryDirectory() as tok_dir:
        ids = export_tokenizer(tokenizer_path, Path(tok_dir), cfg.max_seq_len)
        hf_config = hf_config_from_native(cfg, family, ids)
        gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
        return save_hf_model(out_dir, params, cfg, family, hf_config, Path(tok_dir), gen, extra_json)


def save_imported_checkpoint(hf: HFModel, out_dir: Path, source: str) -> Path:
    """An imported HF model as a native checkpoint folder (params, model_config.json, hf_tokenizer/), marked as
    an `import-hf` output. The tokenizer files travel in the same atomic write as the weights."""
    from picochat_jax.checkpoint import save_model_checkpoint
    from picochat_jax.outdir import MARKER, marker_payload

    tokenizer_files = {}
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (hf.path / name).exists():
            tokenizer_files[f"hf_tokenizer/{name}"] = hf.path / name
    save_model_checkpoint(out_dir, hf.params, hf.config, None,
                          {"stage": "import-hf", "source": source, "family": hf.family, "hf_config": hf.hf_config},
                          extra_json={MARKER: marker_payload("import-hf", source=source)},
                          extra_files=tokenizer_files)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------------------


def peft_module_path(target: str) -> str:
    """HF module path (under `model.layers.{i}.`) of one of our LoRA targets (q_proj, ..., down_proj)."""
    module = "attn" if target in ATTN_PROJ else "mlp"
    return _LLAMA_MODULES[(module, target)]


def check_peft_family(family: str) -> None:
    if family not in PEFT_FAMILIES:
        raise ValueError(f"PEFT LoRA adapters are written for {', '.join(PEFT_FAMILIES)} models, not {family} "
                         "(use --peft none for full fine-tuning)")


# GPT-2 modules for our targets; q, k and v share the fused c_attn.
_GPT2_PEFT_MODULES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


def peft_adapter(adapters: dict[str, dict[str, Any]], n_layers: int, family: str, rank: int,
                 alpha: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors in PEFT's saved key names, the family-specific adapter_config.json entries).

    PEFT computes lora_B(lora_A(x)) * alpha / r with lora_A.weight (r, in) = A[i].T and lora_B.weight
    (out, r) = B[i].T. GPT-2 fuses q, k, v into one c_attn; their adapters become one adapter of rank
    n*r whose A stacks the A's and whose B is block-diagonal, with alpha scaled by n so alpha/r is unchanged.
    """
    check_peft_family(family)
    host = {t: (np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)) for t, ab in adapters.items()}
    out: dict[str, np.ndarray] = {}
    if family in LLAMA_LIKE:
        for target, (a, b) in host.items():
            for i in range(n_layers):
                prefix = f"base_model.model.model.layers.{i}.{peft_module_path(target)}"
                out[f"{prefix}.lora_A.weight"] = a[i].T
                out[f"{prefix}.lora_B.weight"] = b[i].T
        return out, {"target_modules": sorted(host), "fan_in_fan_out": False}
    modules = {_GPT2_PEFT_MODULES[t]: t for t in host if t in _GPT2_PEFT_MODULES}
    qkv = [t for t in _QKV if t in host]
    for i in range(n_layers):
        prefix = f"base_model.model.transformer.h.{i}"
        for module, target in modules.items():
            out[f"{prefix}.{module}.lora_A.weight"] = host[target][0][i].T
            out[f"{prefix}.{module}.lora_B.weight"] = host[target][1][i].T
        if qkv:
            d = host[qkv[0]][0].shape[1]  # q, k and v all map d_model -> d_model in an MHA GPT-2
            fused_b = np.zeros((3 * d, len(qkv) * rank), np.float32)
            for j, target in enumerate(qkv):
                row = _QKV.index(target) * d
                fused_b[row:row + d, j * rank:(j + 1) * rank] = host[target][1][i].T
            out[f"{prefix}.attn.c_attn.lora_A.weight"] = np.concatenate([host[t][0][i].T for t in qkv])
            out[f"{prefix}.attn.c_attn.lora_B.weight"] = fused_b
    config: dict[str, Any] = {"target_modules": sorted(modules) + (["attn.c_attn"] if qkv else []),
                              "fan_in_fan_out": True}  # GPT-2's Conv1D stores weights as (in, out)
    if len(qkv) > 1:
        config["rank_pattern"] = {"attn.c_attn": len(qkv) * rank}
        config["alpha_pattern"] = {"attn.c_attn": len(qkv) * alpha}
    return out, config


def save_peft_adapter(out_dir: Path, adapters: dict[str, dict[str, Any]], rank: int, alpha: float,
                      dropout: float, n_layers: int, family: str, base_model: str) -> Path:
    """adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads."""
    tensors, family_config = peft_adapter(adapters, n_layers, family, rank, alpha)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, **family_config,
    }
    with atomic_dir(Path(out_dir)) as tmp:
        save_json(tmp / "adapter_config.json", config)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return Path(out_dir)
