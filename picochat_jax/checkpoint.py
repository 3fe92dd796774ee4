"""Model folders: the self-contained `checkpoint/` and `best_checkpoint/` a training stage writes, and the
checks that pair them with a tokenizer.

A model folder holds the params (orbax), `model_config.json`, a copy of `tokenizer.json` and
`checkpoint.json` (stage, step, and the tokenizer's vocab size and content hash), so `eval chat --checkpoint
DIR` needs nothing else. Inference (generate, eval, serve, export) reads them through this module and never
imports the training package; resume checkpoints (full TrainState) are train/checkpoint.py's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from picochat_jax.config import ModelConfig
from picochat_jax.fileio import discard_temp, replace_dir, save_json


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def save_model_checkpoint(directory: Path, params: Any, model_cfg: ModelConfig, tokenizer_path: Path | None,
                          meta: dict[str, Any], extra_json: dict[str, Any] | None = None,
                          extra_files: dict[str, Path] | None = None) -> None:
    """Write a self-contained model folder atomically: a `.partial` folder, then a rename over the old one.

    checkpoint.json records the tokenizer's vocab size and content hash, so a tokenizer from another run is
    caught (`checkpoint_tokenizer`) instead of producing garbage; `extra_json` and `extra_files` (name -> source
    path) add files to the same atomic write (an out-dir marker, tokenizer files).

    Params are saved by orbax straight from their (possibly sharded, multi-host) device arrays; every
    process takes part in that save, and process 0 alone writes the small files and does the rename.
    """
    directory = Path(directory).absolute()
    tmp = directory.with_name(f".{directory.name}.partial")
    primary = jax.process_index() == 0
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        discard_temp(tmp)
    _sync(f"picochat-ckpt-start-{directory.name}")
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        if primary:
            save_json(tmp / "model_config.json", model_cfg.to_dict())
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
                meta = {**meta, "tokenizer": tokenizer_fingerprint(tmp / "tokenizer.json")}
            save_json(tmp / "checkpoint.json", {"format": "picochat-jax/1", **meta})
            for name, payload in (extra_json or {}).items():
                save_json(tmp / name, payload)
            for name, source in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
            replace_dir(tmp, directory)
    except BaseException:
        if primary:
            discard_temp(tmp)
        raise
    _sync(f"picochat-ckpt-done-{directory.name}")


def load_model_checkpoint(directory: str | Path) -> tuple[Any, ModelConfig, dict[str, Any]]:
    """(params on host as numpy-backed arrays, ModelConfig, checkpoint.json metadata)."""
    directory = Path(directory).absolute()
    cfg_path = directory / "model_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"not a picochat checkpoint (no model_config.json): {directory}")
    cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    params = ocp.StandardCheckpointer().restore(directory / "params")
    return params, cfg, checkpoint_meta(directory)


def checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """checkpoint.json of a model folder ({} for folders written before it existed)."""
    meta_path = Path(directory) / "checkpoint.json"
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def tokenizer_fingerprint(path: str | Path) -> dict[str, Any]:
    """Vocab size and sha256 of a tokenizer.json: what a model folder records of the tokenizer it was trained
    with."""
    from tokenizers import Tokenizer

    raw = Path(path).read_bytes()
    return {"vocab_size": Tokenizer.from_str(raw.decode("utf-8")).get_vocab_size(),
            "sha256": hashlib.sha256(raw).hexdigest()}


def checkpoint_tokenizer(checkpoint_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """The tokenizer.json to use with a model folder: `tokenizer_path`, or the folder's own copy.

    Fails, naming both files, when the tokenizer is not the one the model was trained with (content hash
    recorded in checkpoint.json) or, for folders without a record, when its vocabulary does not fit the model.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint_dir}")
    cfg_path = checkpoint_dir / "model_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"not a picochat checkpoint (no model_config.json): {checkpoint_dir}")
    path = Path(tokenizer_path) if tokenizer_path is not None else checkpoint_dir / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (pass --tokenizer RUN/tokenizer.json)")
    try:
        found = tokenizer_fingerprint(path)
    except Exception as exc:  # a JSON or tokenizers parse error: name the file, not the library's internals
        raise ValueError(f"{path}: not a readable tokenizer.json ({type(exc).__name__}: {exc})") from None
    recorded = checkpoint_meta(checkpoint_dir).get("tokenizer")
    model_vocab = json.loads(cfg_path.read_text()).get("vocab_size")
    if isinstance(recorded, dict) and recorded.get("sha256"):
        if recorded["sha256"] != found["sha256"]:
            raise ValueError(
                f"tokenizer {path} does not belong to the model in {checkpoint_dir}: the model was trained with a "
                f"{recorded.get('vocab_size')}-token tokenizer (sha256 {recorded['sha256'][:12]}, a copy is "
                f"{checkpoint_dir / 'tokenizer.json'}), this one has {found['vocab_size']} tokens (sha256 "
                f"{found['sha256'][:12]}). Leave out --tokenizer to use the checkpoint's own.")
    elif isinstance(model_vocab, int) and found["vocab_size"] != model_vocab:
        # Native models are built with exactly the tokenizer's vocabulary (pipeline.model_config_for).
        raise ValueError(f"tokenizer {path} has {found['vocab_size']} tokens but the model in {checkpoint_dir} has "
                         f"{model_vocab}: tokenizer and checkpoint come from different runs")
    return path
