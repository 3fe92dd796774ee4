"""What the compiled train step moves between devices on a mesh: every collective in the optimized HLO, with its
result shapes and bytes, counted once per op in the program text (ops inside a rolled layer scan count once).

    python tools/collectives.py --scale h100-100m --layers 2 --batch-size 8 --mesh 1x2 --devices 2

Runs on CPU with fake devices (`--devices N` sets XLA's host device count before JAX starts), so a mesh's
communication can be read without the hardware; docs/multihost.md quotes it for the FSDP fix.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
ARRAY = re.compile(r"(f64|f32|bf16|f16|s64|s32|u32|s8|u8|pred)\[([0-9,]*)\]")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def count_collectives(hlo_text: str) -> dict[str, Any]:
    """{"ops": [(op, result type, count)], "bytes": {op: bytes}} for the collectives in HLO text."""
    ops: collections.Counter = collections.Counter()
    moved: collections.Counter = collections.Counter()
    for match in COLLECTIVE.finditer(hlo_text):
        types, op = match.group(1), match.group(2)
        ops[(op, types)] += 1
        for dtype, dims in ARRAY.findall(types):
            moved[op] += math.prod(int(d) for d in dims.split(",") if d) * BYTES[dtype]
    return {"ops": [(op, types, n) for (op, types), n in ops.most_common()], "bytes": dict(moved)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="h100-100m")
    p.add_argument("--layers", type=int, default=2, help="override the scale's layer count (compile time)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the scale's context")
    p.add_argument("--mesh", default="1x2", help="DATAxFSDP[xTENSOR]")
    p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0 = what JAX finds)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import dataclasses

    import jax
    import numpy as np

    from picochat_jax.config import load_scale
    from picochat_jax.model.transformer import training_model
    from picochat_jax.parallel import BATCH_AXES, make_mesh, parse_mesh
    from picochat_jax.train.optim import make_optimizer
    from picochat_jax.train.step import build_trainer

    scale = load_scale(args.scale)
    cfg = dataclasses.replace(scale.model, n_layers=args.layers or scale.model.n_layers)
    seq = args.seq_len or cfg.max_seq_len
    shape = parse_mesh(args.mesh)
    optimizer, schedule = make_optimizer(dataclasses.replace(scale.base, batch_size=args.batch_size, steps=100))
    model = training_model(cfg, args.precision, "none", shape.tensor)
    trainer = build_trainer(model, optimizer, schedule, np.ones(cfg.vocab_size, np.float32), make_mesh(shape))
    sharding = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec(None, BATCH_AXES))
    batch = {k: jax.ShapeDtypeStruct((1, args.batch_size, seq), dtype, sharding=sharding)
             for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                              ("segment_ids", np.int32)]}
    result = count_collectives(trainer.step.lower(trainer.abstract_state(), batch).compile().as_text())
    print(f"mesh {shape}, {args.scale} with {cfg.n_layers} layers, {args.batch_size} x {seq} tokens, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices")
    print("bytes by collective: " + ", ".join(f"{op} {n / 1e6:.1f} MB" for op, n in result["bytes"].items())
          + f"; total {sum(result['bytes'].values()) / 1e6:.1f} MB")
    for op, types, n in result["ops"]:
        print(f"  {n} x {op} {types[:110]}")
    return result


if __name__ == "__main__":
    main()
