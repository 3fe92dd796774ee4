#!/usr/bin/env python
"""Memory and mesh plan for a scale on TPU v5e / v5p slices, computed from the model and train config.

    python tools/tpu_plan.py                               # h100-100m and h200-1b, markdown to stdout
    python tools/tpu_plan.py --scale h200-1b --tpu v5p --chips 8,16,32 --json-out plan.json

For each slice size and each data x fsdp mesh of it (tensor = 1), per chip:
- state: float32 params, AdamW's two float32 moments and float32 gradients, 16 bytes per parameter, divided by
  the fsdp axis (the `embed`-sharded rule of picochat_jax/parallel.py; data replicas each hold their copy);
- activations, bf16, for the chip's rows of one micro-batch: per layer and token 34·d bytes kept for the
  backward without remat (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", eq. 1 without the attention-score term, which the splash kernel never stores), or 2·d (the layer
  input) with remat full; plus the float32 logits and their gradient, 8·V bytes per token (0 with
  perf.ce_chunk_tokens);
- step time at an assumed MFU: the config's training FLOPs per token (6N + attention, config.flops_per_token)
  times the step's tokens over the slice's bf16 peak.

Chip figures are the published ones: v5e 16 GiB HBM and 197 bf16 TFLOP/s per chip, v5p 95 GiB and 459. The
plan is an estimate to choose a mesh and a remat policy before renting a slice; a real run's numbers come
from `picochat run tiny --mesh ...` on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float
    bf16_tflops: float
    slices: tuple[int, ...]  # chips per slice on offer


CHIPS = {
    "v5e": Chip("v5e", 16.0, 197.0, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Chip("v5p", 95.0, 459.0, (4, 8, 16, 32, 64, 128)),
}
HEADROOM = 0.9  # usable share of HBM (XLA's own buffers, fragmentation)


def mesh_options(chips: int) -> list[tuple[int, int]]:
    """(data, fsdp) pairs with data * fsdp = chips, fsdp first large."""
    return [(chips // f, f) for f in sorted((f for f in range(1, chips + 1) if chips % f == 0), reverse=True)]


def micro_batch(batch: int, accum: int, chips: int) -> tuple[int, int] | None:
    """(rows per micro-batch, accumulation steps) keeping the scale's rows per optimizer step: the scale's own
    micro-batch when the chips divide it, else the smallest multiple of the chips that divides the step."""
    step_rows = batch * accum
    for rows in range(batch, step_rows + 1):
        if rows % chips == 0 and step_rows % rows == 0:
            return rows, step_rows // rows
    return None


def plan_one(scale: Any, chip: Chip, chips: int, data: int, fsdp: int, mfu: float) -> dict[str, Any]:
    cfg, train = scale.model, scale.base
    n = cfg.num_params()
    T = train.seq_len or cfg.max_seq_len
    fitted = micro_batch(train.batch_size, train.grad_accum_steps, chips)
    rows, accum = fitted or (train.batch_size, train.grad_accum_steps)
    per_chip_rows = rows / chips
    state = 16 * n / fsdp
    tokens = per_chip_rows * T
    act_none = tokens * cfg.n_layers * 34 * cfg.d_model
    act_full = tokens * cfg.n_layers * 2 * cfg.d_model
    logits = tokens * 8 * cfg.vocab_size
    usable = chip.hbm_gib * GIB * HEADROOM
    step_tokens = rows * accum * T
    step_s = cfg.flops_per_token(T) * step_tokens / (chips * chip.bf16_tflops * 1e12 * mfu)
    total_none, total_full = state + act_none + logits, state + act_full + logits
    remat = "none" if total_none <= usable else ("full" if total_full <= usable else None)
    return {
        "scale": scale.name, "tpu": chip.name, "chips": chips, "mesh": f"{data}x{fsdp}", "params": n,
        "micro_batch": rows, "grad_accum": accum, "rows_per_chip": per_chip_rows, "feasible_batch": fitted is not None,
        "state_gib": state / GIB, "activations_gib_no_remat": act_none / GIB, "activations_gib_remat_full":
        act_full / GIB, "logits_gib": logits / GIB, "total_gib_no_remat": total_none / GIB,
        "total_gib_remat_full": total_full / GIB, "hbm_gib": chip.hbm_gib, "fits_with": remat,
        "step_tokens": step_tokens, "step_s_at_mfu": step_s, "tokens_per_s_at_mfu": step_tokens / step_s, "mfu": mfu,
    }


def plan(scale_names: list[str], tpus: list[str], chip_counts: list[int] | None, mfu: float) -> list[dict]:
    from picochat_jax.config import load_scale

    rows = []
    for name in scale_names:
        scale = load_scale(name)
        for tpu in tpus:
            chip = CHIPS[tpu]
            for chips in chip_counts or chip.slices:
                options = [plan_one(scale, chip, chips, d, f, mfu) for d, f in mesh_options(chips)]
                usable = [o for o in options if o["feasible_batch"] and o["fits_with"]]
                # Least sharding that fits without remat, else least that fits with it: fewer collectives.
                usable.sort(key=lambda o: (o["fits_with"] != "none", int(o["mesh"].split("x")[1])))
                best = usable[0] if usable else min(options, key=lambda o: o["total_gib_remat_full"])
                rows.append({**best, "chosen": bool(usable)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| scale | TPU | chips | mesh (data x fsdp) | micro-batch x accum | rows/chip | state GiB "
             "| activations GiB (none / full remat) | logits GiB | per chip GiB / HBM | remat "
             "| step s (tokens/s) at MFU |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        total = r["total_gib_no_remat"] if r["fits_with"] == "none" else r["total_gib_remat_full"]
        verdict = r["fits_with"] if r["chosen"] else (
            "step rows < chips" if not r["feasible_batch"] else "does not fit")
        lines.append(
            f"| {r['scale']} | {r['tpu']} | {r['chips']} | {r['mesh']} | {r['micro_batch']} x {r['grad_accum']} "
            f"| {r['rows_per_chip']:g} | {r['state_gib']:.2f} "
            f"| {r['activations_gib_no_remat']:.2f} / {r['activations_gib_remat_full']:.2f} | {r['logits_gib']:.2f} "
            f"| {total:.1f} / {r['hbm_gib']:.0f} | {verdict} | {r['step_s_at_mfu']:.3f} "
            f"({r['tokens_per_s_at_mfu']:,.0f}) at {r['mfu']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="h100-100m,h200-1b", help="comma-separated scale names")
    p.add_argument("--tpu", default="v5e,v5p", help="comma-separated: v5e, v5p")
    p.add_argument("--chips", default=None, help="comma-separated slice sizes (default: each TPU's offer)")
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation for step times")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    tpus = args.tpu.split(",")
    unknown = sorted(set(tpus) - set(CHIPS))
    if unknown:
        raise SystemExit(f"unknown TPU {unknown}; choose from {', '.join(CHIPS)}")
    chips = [int(c) for c in args.chips.split(",")] if args.chips else None
    rows = plan(args.scale.split(","), tpus, chips, args.mfu)
    print(markdown(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
