"""The Hugging Face bridge's maps: the only module that knows HF config keys and weight names.

transformers v5 ships no Flax models, so an HF causal LM becomes our own `Decoder`: `config.json` maps onto a
`ModelConfig` and the safetensors weights onto our scanned param tree (kernel = weight.T, one leading layer
axis per block weight). The mapping runs both ways, so a native checkpoint exports to a folder that stock
`AutoModelForCausalLM.from_pretrained` loads, and merged LoRA adapters export in PEFT's own key names.

Families: llama (Llama 2/3, SmolLM/SmolLM2), mistral, qwen2 (qkv bias), qwen3 (QK-norm), phi3 (Llama's block
with q/k/v and gate/up fused into one projection each: split on the way in, fused on the way out), gemma2 and
gemma3_text (sandwich norms, RMSNorm weights stored as w with scale 1 + w, embeddings times sqrt(d), gated
tanh-GELU, per-layer sliding windows, soft-capping, Gemma 3's QK-norm and local RoPE theta), gpt2 (the
layernorm/learned-position/GELU shape of our small scales). Files: hf/io.py; writing folders: hf/export.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from picochat_jax.config import ModelConfig
from picochat_jax.model.lora import get_path
from picochat_jax.model.transformer import dummy_tokens, make_model

# model_type -> the architecture class name transformers needs in config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


GEMMA = ("gemma2", "gemma3_text")


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", *GEMMA)


PEFT_FAMILIES = (*LLAMA_LIKE, "gpt2")


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


# Buffers some checkpoints carry that are not weights (recomputed by every implementation).
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


# Our block param path -> the llama-family module path under `model.layers.{i}.`.
LLAMA_MODULES = {
    **{("attn", p): f"self_attn.{p}" for p in ATTN_PROJ},
    **{("mlp", p): f"mlp.{p}" for p in MLP_PROJ},
    ("attn", "q_norm"): "self_attn.q_norm",
    ("attn", "k_norm"): "self_attn.k_norm",
    ("input_norm",): "input_layernorm",
    ("post_attention_norm",): "post_attention_layernorm",
}


# Gemma's norms: ours are applied before the MLP as Llama's post_attention_layernorm is; Gemma's own
# post_attention_layernorm norms the attention output (our attn_out_norm).
GEMMA_MODULES = {
    **{k: v for k, v in LLAMA_MODULES.items() if k != ("post_attention_norm",)},
    ("post_attention_norm",): "pre_feedforward_layernorm",
    ("attn_out_norm",): "post_attention_layernorm",
    ("mlp_out_norm",): "post_feedforward_layernorm",
}


_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


Params = dict[str, Any]


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
    if kind in ("llama3", "yarn") and not scaling.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    if kind == "yarn" and scaling.get("factor") is None:  # transformers derives it from the two context lengths
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    scaling = {k: v for k, v in scaling.items() if v is not None}
    return float(theta), tuple(sorted(scaling.items()))


def _sliding_window_cap(family: str, hf: dict[str, Any]) -> int | None:
    """Qwen's optional sliding windows apply to some layers only: within the window that is plain causal
    attention, so the context is capped there. (Mistral's and Phi-3's windows are modelled.)"""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return window
    return None


def config_from_hf(hf: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) for an HF config.json; unsupported architectures raise naming the supported ones."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        archs = hf.get("architectures") or [family]
        supported = ", ".join(f"{ARCHITECTURES[k]} ({k})" for k in ARCHITECTURES)
        if hf.get("auto_map"):  # modelling code shipped with the checkpoint (--trust-remote-code in transformers)
            raise ValueError(f"{archs[0]!r} (model_type {family!r}) is defined by code shipped with the checkpoint "
                             "(auto_map). picochat maps models onto its own decoder and never runs remote code, so "
                             f"--trust-remote-code cannot help; supported: {supported}")
        raise ValueError(f"unsupported architecture {archs[0]!r} (model_type {family!r}); supported: {supported}")
    if family == "gpt2":
        return family, _gpt2_config_from_hf(hf)
    if family in GEMMA:
        return family, _gemma_config_from_hf(family, hf)
    act = hf.get("hidden_act", "silu")
    # `relu` in a gated MLP with gate == up is relu(x)*x = relu(x)^2: how our relu2 models export.
    activation = {"silu": "swiglu", "relu": "relu2"}.get(act)
    if activation is None:
        raise ValueError(f"{family}: hidden_act {act!r} is not supported (supported: silu, relu)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = {"qwen2": True, "mistral": False, "phi3": False}.get(family, attention_bias)
    out_bias = False if family in ("qwen2", "mistral", "phi3") else attention_bias
    theta, scaling = _rope_from_hf(hf)
    max_len = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window") if family in ("mistral", "phi3") else None
    window = int(window) if window and int(window) < max_len else None  # a window over the context is causal
    cap = _sliding_window_cap(family, hf)
    if cap:  # Qwen's per-layer windows (max_window_layers) are not modelled: cap the context inside them
        max_len = min(max_len, int(cap))
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"], max_seq_len=max_len,
        head_dim=None if head_dim * n_heads == d_model else head_dim, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=theta, rope_scaling=scaling,
        activation=activation, qk_norm=family == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
        init_std=float(hf.get("initializer_range", 0.02)), sliding_window=window,
    )
    return family, cfg


def _gemma_layer_types(family: str, hf: dict[str, Any]) -> list[str]:
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    n = hf["num_hidden_layers"]
    if family == "gemma2":  # transformers' default: every other layer, starting with the first, is local
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    pattern = int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _gemma_config_from_hf(family: str, hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{family}: hidden_activation {act!r} is not supported (supported: gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{family}: use_bidirectional_attention=true (an encoder) is not a causal LM")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    max_len = int(hf.get("max_position_embeddings", 8192))
    layer_types = _gemma_layer_types(family, hf)
    window = hf.get("sliding_window")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{family}: layer types {unknown} are not supported")
    if not window or not any(sliding):
        sliding, window = None, None
    rope_params = hf.get("rope_parameters") or {}
    local_theta = None
    if family == "gemma3_text":
        full = dict(rope_params.get("full_attention") or {})
        local = dict(rope_params.get("sliding_attention") or {})
        if not full:  # legacy keys
            full = {"rope_theta": hf.get("rope_theta", 1_000_000.0), **(hf.get("rope_scaling") or {})}
        local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{family}: scaled RoPE on sliding layers is not supported")
        theta, scaling = _rope_from_hf({"rope_parameters": full, "max_position_embeddings": max_len})
        if sliding is None:
            local_theta = None
    else:
        theta, scaling = _rope_from_hf(hf)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"], max_seq_len=max_len,
        head_dim=None if head_dim * n_heads == d_model else head_dim, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=theta, rope_scaling=scaling,
        activation="geglu", qk_norm=family == "gemma3_text", tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bias, out_bias=bias, init_std=float(hf.get("initializer_range", 0.02)),
        sliding_window=int(window) if window else None, sliding_layers=sliding, rope_local_theta=local_theta,
        embed_scale=True, sandwich_norm=True, query_scale=float(hf.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=hf.get("attn_logit_softcapping"), logit_softcap=hf.get("final_logit_softcapping"),
    )


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
    if cfg.sandwich_norm or cfg.embed_scale or cfg.activation == "geglu":
        missing = [k for k, ok in (("sandwich_norm", cfg.sandwich_norm), ("embed_scale", cfg.embed_scale),
                                   ("activation=geglu", cfg.activation == "geglu"), ("rmsnorm", cfg.norm == "rmsnorm"),
                                   ("rope", cfg.position == "rope"), ("no mlp_bias", not cfg.mlp_bias)) if not ok]
        if missing:
            raise ValueError(f"a Gemma-shaped model needs {', '.join(missing)} to export as Gemma 2/3")
        if cfg.qk_norm:
            return "gemma3_text"
        if cfg.rope_local_theta is not None:
            raise ValueError("rope_local_theta without qk_norm: Gemma 2 has one RoPE theta for all layers")
        return "gemma2"
    if cfg.sliding_window is not None:
        raise ValueError("sliding_window is exported only with the Mistral/Phi-3 folders it came from; a native "
                         "model with a window has no Llama/Qwen3/GPT-2 equivalent")
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
    if family in GEMMA:
        return _gemma_hf_config(cfg, family, common, rope_parameters)
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


def _gemma_hf_config(cfg: ModelConfig, family: str, common: dict[str, Any],
                     rope_parameters: dict[str, Any]) -> dict[str, Any]:
    sliding = cfg.sliding_layers or (True,) * cfg.n_layers if cfg.sliding_window else (False,) * cfg.n_layers
    out = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
           "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.d_ff, "hidden_activation": "gelu_pytorch_tanh",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "query_pre_attn_scalar": cfg.query_scale or cfg.resolved_head_dim,
           "sliding_window": cfg.sliding_window or cfg.max_seq_len,
           "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
           "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": cfg.attn_softcap,
           "attention_bias": cfg.qkv_bias or cfg.out_bias, "attention_dropout": 0.0}
    if family == "gemma2":
        out.update(rope_parameters=rope_parameters, rope_theta=cfg.rope_theta)
    else:
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        out.update(rope_parameters={"full_attention": rope_parameters, "sliding_attention": local})
    return out


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


def _llama_name(path: tuple[str, ...], family: str = "llama") -> str:
    """HF name of one of our leaves (layer leaves get a `{i}` placeholder)."""
    top = {("embed_tokens",): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
           ("lm_head", "kernel"): "lm_head.weight"}
    if path in top:
        return top[path]
    modules = GEMMA_MODULES if family in GEMMA else LLAMA_MODULES
    if path[0] != "layers" or path[1:-1] not in modules:
        raise KeyError(f"no {family} name for param {'/'.join(path)}")
    return f"model.layers.{{i}}.{modules[path[1:-1]]}.{_LEAF_TO_HF[path[-1]]}"


def _gemma_norm_offset(params: Params, delta: float) -> Params:
    """Gemma stores RMSNorm weights as w and scales by 1 + w; ours scale by the stored value."""
    def walk(tree: Any, key: str = "") -> Any:
        if isinstance(tree, dict):
            return {k: walk(v, k) for k, v in tree.items()}
        return tree + delta if key == "scale" else tree
    return walk(params)


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
                      and not IGNORED_KEYS.search(k))
        if left:
            raise ValueError(f"{self.source}: {len(left)} weights do not fit the config (e.g. {left[:4]}); "
                             "the config.json and the weights disagree")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, family: str,
                   source: Path = Path("<tensors>")) -> Params:
    """Our float32 param tree from HF tensors, checked leaf by leaf against the Decoder's expected shapes."""
    expected = param_shapes(cfg)
    if family == "phi3":
        tensors = _phi3_unfused(tensors, cfg)
    pool = _Tensors(tensors, source)
    params = _gpt2_params_from_hf(pool, cfg, expected) if family == "gpt2" else _llama_params_from_hf(
        pool, cfg, expected, family)
    for path, shape in _flatten(expected):
        got = get_path(params, path)
        if got is None or tuple(got.shape) != shape:
            raise ValueError(f"{source}: param {'/'.join(path)} expected shape {shape}, "
                             f"got {None if got is None else got.shape}")
    optional = ("lm_head.weight",) if cfg.tie_embeddings else ()  # some tied checkpoints still store it
    pool.check_all_used(optional)
    return params


def _llama_params_from_hf(pool: _Tensors, cfg: ModelConfig, expected: Params, family: str = "llama") -> Params:
    params: Params = {}
    for path, _ in _flatten(expected):
        name = _llama_name(path, family)
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
    return _gemma_norm_offset(params, 1.0) if family in GEMMA else params


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
    if family in GEMMA:
        params = _gemma_norm_offset(params, -1.0)
    out: dict[str, np.ndarray] = {}
    for path, value in _flatten(params):
        name = _llama_name(path, family)
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
        if family in ("llama", "qwen3", *GEMMA) and (cfg.qkv_bias or cfg.out_bias):
            for p, width in widths.items():
                out.setdefault(f"model.layers.{i}.self_attn.{p}.bias", np.zeros(width, np.float32))
        if cfg.activation == "relu2":  # relu(gate(x)) * up(x) with gate == up is relu(up(x))^2
            for leaf in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                out[f"model.layers.{i}.mlp.gate_proj.{leaf}"] = out[f"model.layers.{i}.mlp.up_proj.{leaf}"].copy()
    return _phi3_fused(out, cfg) if family == "phi3" else out


def _phi3_widths(cfg: ModelConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Row blocks of Phi-3's fused qkv_proj and gate_up_proj weights, in order."""
    hd = cfg.resolved_head_dim
    qkv = [("q_proj", cfg.n_heads * hd), ("k_proj", cfg.n_kv_heads * hd), ("v_proj", cfg.n_kv_heads * hd)]
    return qkv, [("gate_proj", cfg.d_ff), ("up_proj", cfg.d_ff)]


def _phi3_unfused(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Phi-3 tensors renamed to Llama's: qkv_proj split into q/k/v_proj, gate_up_proj into gate/up_proj."""
    out = dict(tensors)
    qkv, gate_up = _phi3_widths(cfg)
    for i in range(cfg.n_layers):
        for fused, module, parts in (("qkv_proj", "self_attn", qkv), ("gate_up_proj", "mlp", gate_up)):
            name = f"model.layers.{i}.{module}.{fused}.weight"
            if name not in out:
                continue  # reported as missing by the llama reader
            weight, row = out.pop(name), 0
            for part, width in parts:
                out[f"model.layers.{i}.{module}.{part}.weight"] = weight[row:row + width]
                row += width
    return out


def _phi3_fused(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    qkv, gate_up = _phi3_widths(cfg)
    for i in range(cfg.n_layers):
        for fused, module, parts in (("qkv_proj", "self_attn", qkv), ("gate_up_proj", "mlp", gate_up)):
            tensors[f"model.layers.{i}.{module}.{fused}.weight"] = np.concatenate(
                [tensors.pop(f"model.layers.{i}.{module}.{part}.weight") for part, _ in parts])
    return tensors


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


def peft_module_path(target: str) -> str:
    """HF module path (under `model.layers.{i}.`) of one of our LoRA targets (q_proj, ..., down_proj)."""
    module = "attn" if target in ATTN_PROJ else "mlp"
    return LLAMA_MODULES[(module, target)]


def check_peft_family(family: str) -> None:
    if family not in PEFT_FAMILIES:
        raise ValueError(f"PEFT LoRA adapters are written for {', '.join(PEFT_FAMILIES)} models, not {family} "
                         "(use --peft none for full fine-tuning)")


# GPT-2 modules for our targets; q, k and v share the fused c_attn.
GPT2_PEFT_MODULES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


QKV = ("q_proj", "k_proj", "v_proj")
