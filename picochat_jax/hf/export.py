"""Writing Hugging Face folders: a model (config.json, model.safetensors, generation_config.json, tokenizer
files) that stock transformers loads, a native checkpoint exported with our tokenizer and chat template, an
imported HF model as a native checkpoint, and LoRA adapters in PEFT's format. Every folder is written
atomically (a temporary sibling renamed into place).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from picochat_jax.config import ModelConfig
from picochat_jax.fileio import save_json
from picochat_jax.hf.families import (
    GPT2_PEFT_MODULES,
    LLAMA_LIKE,
    QKV,
    Params,
    check_peft_family,
    export_family,
    hf_config_from_native,
    params_to_hf,
    peft_module_path,
)
from picochat_jax.hf.io import TOKENIZER_FILES, HFModel, atomic_dir, dtype_of, write_weights


def save_hf_model(out_dir: Path, params: Params, cfg: ModelConfig, family: str, hf_config: dict[str, Any],
                  tokenizer_dir: Path | None = None, generation_config: dict[str, Any] | None = None,
                  extra_json: dict[str, Any] | None = None) -> Path:
    """Write a complete HF folder atomically: config.json, model.safetensors (in the config's dtype),
    generation_config.json, the tokenizer files found in `tokenizer_dir` and any `extra_json` files (the
    out-dir marker, which must be inside before the folder appears)."""
    dtype = dtype_of(hf_config)
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
    if family == "phi3":
        return _phi3_peft_adapter(host, n_layers, rank, alpha)
    if family in LLAMA_LIKE:
        for target, (a, b) in host.items():
            for i in range(n_layers):
                prefix = f"base_model.model.model.layers.{i}.{peft_module_path(target)}"
                out[f"{prefix}.lora_A.weight"] = a[i].T
                out[f"{prefix}.lora_B.weight"] = b[i].T
        return out, {"target_modules": sorted(host), "fan_in_fan_out": False}
    modules = {GPT2_PEFT_MODULES[t]: t for t in host if t in GPT2_PEFT_MODULES}
    qkv = [t for t in QKV if t in host]
    for i in range(n_layers):
        prefix = f"base_model.model.transformer.h.{i}"
        for module, target in modules.items():
            out[f"{prefix}.{module}.lora_A.weight"] = host[target][0][i].T
            out[f"{prefix}.{module}.lora_B.weight"] = host[target][1][i].T
        if qkv:
            d = host[qkv[0]][0].shape[1]  # q, k and v all map d_model -> d_model in an MHA GPT-2
            fused_b = np.zeros((3 * d, len(qkv) * rank), np.float32)
            for j, target in enumerate(qkv):
                row = QKV.index(target) * d
                fused_b[row:row + d, j * rank:(j + 1) * rank] = host[target][1][i].T
            out[f"{prefix}.attn.c_attn.lora_A.weight"] = np.concatenate([host[t][0][i].T for t in qkv])
            out[f"{prefix}.attn.c_attn.lora_B.weight"] = fused_b
    config: dict[str, Any] = {"target_modules": sorted(modules) + (["attn.c_attn"] if qkv else []),
                              "fan_in_fan_out": True}  # GPT-2's Conv1D stores weights as (in, out)
    if len(qkv) > 1:
        config["rank_pattern"] = {"attn.c_attn": len(qkv) * rank}
        config["alpha_pattern"] = {"attn.c_attn": len(qkv) * alpha}
    return out, config


PHI3_FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def _phi3_peft_adapter(host: dict[str, tuple[np.ndarray, np.ndarray]], n_layers: int, rank: int,
                       alpha: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Phi-3 fuses q/k/v and gate/up: like GPT-2's c_attn, their adapters become one adapter per fused module
    (A stacked, B block-diagonal over the fused rows, rank and alpha scaled by the number of parts). A fused
    part without an adapter gets zero rows, which adds nothing."""
    out: dict[str, np.ndarray] = {}
    widths = {t: b.shape[-1] for t, (_, b) in host.items()}
    config: dict[str, Any] = {"fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}}
    targets = []
    for i in range(n_layers):
        prefix = f"base_model.model.model.layers.{i}"
        for target in ("o_proj", "down_proj"):
            if target in host:
                module = "self_attn.o_proj" if target == "o_proj" else "mlp.down_proj"
                out[f"{prefix}.{module}.lora_A.weight"] = host[target][0][i].T
                out[f"{prefix}.{module}.lora_B.weight"] = host[target][1][i].T
                if i == 0:
                    targets.append(module.split(".")[-1])
        for module, parts in PHI3_FUSED.items():
            present = [t for t in parts if t in host]
            if not present:
                continue
            part_widths = [widths.get(t) for t in parts]
            if None in part_widths:  # a fused part without an adapter: its width from a sibling (q/k/v differ)
                raise ValueError(f"phi3 LoRA: adapt all of {', '.join(parts)} or none (the {module} module is "
                                 "fused)")
            fused_b = np.zeros((sum(part_widths), len(present) * rank), np.float32)
            row = 0
            for t, w in zip(parts, part_widths, strict=True):
                j = present.index(t)
                fused_b[row:row + w, j * rank:(j + 1) * rank] = host[t][1][i].T
                row += w
            out[f"{prefix}.{module}.lora_A.weight"] = np.concatenate([host[t][0][i].T for t in present])
            out[f"{prefix}.{module}.lora_B.weight"] = fused_b
            if i == 0:
                name = module.split(".")[-1]
                targets.append(name)
                config["rank_pattern"][name] = len(present) * rank
                config["alpha_pattern"][name] = len(present) * alpha
    config["target_modules"] = sorted(targets)
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
