#!/usr/bin/env python
"""XLA's memory plan of hf-sft's LoRA train step, without running it: temp and argument bytes of the compiled
step (`compiled.memory_analysis()`) for bf16 LoRA and QLoRA, with and without gradient checkpointing.

    python tools/lora_step_memory.py                      # CPU: 4 layers, d 512, batch 4 x 256 (about a minute)
    python tools/lora_step_memory.py --layers 24 --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 \\
        --vocab 32768 --batch-size 8 --seq-len 512      # the Qwen2.5-0.5B body, a smaller vocabulary

The model and trainer are bench_hf_lora.py's (its flags: a random-init Llama of the given shape, LoRA r 16 on all
seven projections by default); its --quantize and --gradient-checkpointing are swept here. One JSON line per
configuration. The plan is the compiling backend's: on CPU it shows what a program keeps alive between the
forward and the backward; a GPU's own peak is what tools/bench_hf_lora.py reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def main(argv: list[str] | None = None) -> list[dict]:
    import bench_hf_lora
    import jax
    import numpy as np

    from picochat_jax.hf.io import load_hf_model

    defaults = ["--layers", "4", "--hidden", "512", "--intermediate", "2048", "--heads", "8", "--kv-heads", "2",
                "--vocab", "4096", "--batch-size", "4", "--seq-len", "256"]
    args = bench_hf_lora.build_parser().parse_args(defaults + list(sys.argv[1:] if argv is None else argv))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora_step_memory.") as tmp:
        args.model_dir = bench_hf_lora.save_random_llama(Path(tmp) / "model", args)
        hf = load_hf_model(args.model_dir)
        shape = (1, args.batch_size, args.seq_len)
        host_batch = {"inputs": np.ones(shape, np.int32), "targets": np.ones(shape, np.int32),
                      "loss_mask": np.ones(shape, np.float32)}
        for quantize in ("none", "4bit"):
            for checkpointing in (False, True):
                run = argparse.Namespace(**{**vars(args), "quantize": quantize,
                                            "gradient_checkpointing": checkpointing})
                trainer, train_cfg, _, _ = bench_hf_lora.build_lora_trainer(run, hf, args.batch_size, args.seq_len)
                state = trainer.init(jax.random.key_data(jax.random.key(train_cfg.seed)))
                plan = trainer.step.lower(state, trainer.put_batch(host_batch)).compile().memory_analysis()
                row = {"backend": jax.default_backend(), "quantize": quantize, "gradient_checkpointing": checkpointing,
                       "temp_mib": plan.temp_size_in_bytes / 2**20, "argument_mib": plan.argument_size_in_bytes / 2**20}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
