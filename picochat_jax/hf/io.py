"""Hugging Face folders at the file level: finding one (a path or a cached hub id, never the network), reading
config.json, generation_config.json and safetensors shards, writing weights, and loading a whole folder as our
Decoder's params (`load_hf_model`, through hf/families.py's maps). Weights are read and written with
`safetensors` on numpy: torch is never needed here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from picochat_jax.config import ModelConfig
from picochat_jax.fileio import discard_temp, replace_dir
from picochat_jax.hf.families import Params, config_from_hf, params_from_hf

WEIGHTS_NAME = "model.safetensors"


WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@dataclass(frozen=True)
class HFModel:
    """An HF checkpoint as our model: where it came from, its family, our config and float32 params."""

    path: Path
    family: str
    config: ModelConfig
    hf_config: dict[str, Any]
    params: Params


def resolve_model_dir(model: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """A local folder, or a hub id (at `revision`: a branch, tag or commit) already in the local HF cache. Never
    touches the network."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision} applies to hub ids; {path} is a local folder")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.exists():
        raise FileNotFoundError(f"--model must be a folder or a hub id, got the file {path}")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(str(model), local_files_only=True, cache_dir=cache_dir, revision=revision)
    except Exception as exc:  # the hub raises several types for "not cached"
        at = f" at revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"{model!r}{at} is neither a local folder nor a model in the local Hugging Face cache (no network is "
            f"used); download it first, e.g. `hf download {model}{' --revision ' + revision if revision else ''}`"
        ) from exc
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


def load_hf_model(model: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> HFModel:
    """Load an HF causal-LM folder (or cached hub id) as (family, ModelConfig, float32 params)."""
    path = resolve_model_dir(model, cache_dir, revision)
    hf = read_hf_config(path)
    family, cfg = config_from_hf(hf)
    params = params_from_hf(read_safetensors(path), cfg, family, path)
    return HFModel(path=path, family=family, config=cfg, hf_config=hf, params=params)


def dtype_of(hf_config: dict[str, Any]) -> str:
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


def read_generation_config(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else None
