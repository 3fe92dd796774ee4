"""Checkpoints.

* `resume_checkpoint/`: an orbax CheckpointManager (async saves, last K kept) holding the full TrainState
  (step, params, optimizer state, RNG) plus JSON metadata (data position, best val loss, config).
* `checkpoint/` (final) and `best_checkpoint/` (best val loss): self-contained model folders with the
  params, `model_config.json`, a copy of `tokenizer.json` and `checkpoint.json`, so
  `eval chat --checkpoint DIR` needs nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from picochat_jax.config import ModelConfig
from picochat_jax.fileio import save_json


class ResumeManager:
    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no resume checkpoint under {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def save_model_checkpoint(directory: Path, params: Any, model_cfg: ModelConfig, tokenizer_path: Path | None,
                          meta: dict[str, Any]) -> None:
    """Write a self-contained model folder atomically: a `.partial` folder, then a rename over the old one.

    Params are saved by orbax straight from their (possibly sharded, multi-host) device arrays; every
    process takes part in that save, and process 0 alone writes the small files and does the rename.
    """
    directory = Path(directory).absolute()
    tmp = directory.with_name(f".{directory.name}.partial")
    primary = jax.process_index() == 0
    if primary:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _sync(f"picochat-ckpt-start-{directory.name}")
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        if primary:
            save_json(tmp / "model_config.json", model_cfg.to_dict())
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            save_json(tmp / "checkpoint.json", {"format": "picochat-jax/1", **meta})
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if directory.exists():
                directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
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
    meta_path = directory / "checkpoint.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return params, cfg, meta
