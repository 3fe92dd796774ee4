"""Resume checkpoints: `resume_checkpoint/`, an orbax CheckpointManager (async saves, last K kept) holding the
full TrainState (step, params, optimizer state, RNG) plus JSON metadata (data position, best val loss, the
settings a resume must match). Model folders (`checkpoint/`, `best_checkpoint/`) are picochat_jax/checkpoint.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


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

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a saved step (latest by default) without restoring the state: enough to check
        that a resume uses the settings the checkpoint was made with."""
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


