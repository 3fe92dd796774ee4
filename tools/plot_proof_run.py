"""Curves and figures of a proof run from its own files (RUN/base/metrics.jsonl, RUN/summary.json, ...).

    python tools/plot_proof_run.py RUN --out docs/results/DATE-proof/SCALE

Writes OUT/bpb.png (train and held-out bits per byte against tokens seen), OUT/throughput.png (tokens/s and
MFU against step) and OUT/proof_figures.json: steps, tokens seen (batch x gradient accumulation x context a
step), tokens per parameter, epochs over the train split, mean and spread of tokens/s and MFU over the logged
windows, the same per leg (a run resumed across calls restarts its clock: each leg's first window, which holds
the compile and the restore, is left out), first/last/best held-out BPB, and the stability checks (non-finite
losses, loss spikes: a logged loss above 1.5x the mean of the ten before it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from picochat_jax.fileio import read_json_object, read_jsonl_objects, save_json
from picochat_jax.train.loop import training_legs

SPIKE_RATIO = 1.5


def _spread(values: np.ndarray, **extra: int) -> dict | None:
    if not len(values):
        return None
    return {"mean": float(values.mean()), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), **extra}


def tokens_per_step(config: dict) -> int:
    base = config["base"]
    return base["batch_size"] * base.get("grad_accum_steps", 1) * config["model"]["max_seq_len"]


def figures(rows: list[dict], config: dict, summary: dict, tokens_manifest: dict) -> dict:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_bpb" in r]
    batch, seq = config["base"]["batch_size"], config["model"]["max_seq_len"]
    steps = max(r["step"] for r in train)
    tokens_seen = steps * tokens_per_step(config)
    params = summary.get("parameters") or summary.get("params")
    by_leg = training_legs(train)
    timed = [r for leg in by_leg for r in leg]
    tok_s = np.array([r["tokens_per_sec"] for r in timed])
    mfu = np.array([r["mfu"] for r in timed if r.get("mfu") is not None])
    losses = np.array([r["loss"] for r in train])
    spikes = [int(train[i]["step"]) for i in range(10, len(train))
              if losses[i] > SPIKE_RATIO * losses[i - 10:i].mean()]
    out = {
        "steps": steps, "batch": batch, "grad_accum_steps": config["base"].get("grad_accum_steps", 1),
        "seq_len": seq, "tokens_seen": tokens_seen,
        "parameters": params, "tokens_per_parameter": round(tokens_seen / params, 2) if params else None,
        "tokens_per_sec": _spread(tok_s, windows=len(tok_s)), "mfu": _spread(mfu),
        "legs": [{"first_step": leg[0]["step"], "last_step": leg[-1]["step"],
                  "tokens_per_sec": _spread(np.array([r["tokens_per_sec"] for r in leg]), windows=len(leg))}
                 for leg in by_leg if leg],
        "train_bpb": {"first": train[0].get("bpb"), "last": train[-1].get("bpb")},
        "val_bpb": {"first": val[0]["val_bpb"], "last": val[-1]["val_bpb"],
                    "best": min(r["val_bpb"] for r in val)} if val else None,
        "non_finite_losses": int((~np.isfinite(losses)).sum()), "loss_spikes": spikes,
    }
    if tokens_manifest:
        train_tokens = tokens_manifest["splits"]["train"]["tokens"]
        out["train_split_tokens"] = train_tokens
        out["val_split_tokens"] = tokens_manifest["splits"]["val"]["tokens"]
        out["epochs"] = round(tokens_seen / train_tokens, 2)
    return out


def plot(name: str, rows: list[dict], config: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = tokens_per_step(config)
    train = [r for r in rows if "bpb" in r and math.isfinite(r["bpb"])]
    val = [r for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] * per_step / 1e6 for r in train], [r["bpb"] for r in train], lw=0.8, label="train")
    ax.plot([r["step"] * per_step / 1e6 for r in val], [r["val_bpb"] for r in val], "o-", ms=3,
            label="held-out documents")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(top=min(4.0, max(r["bpb"] for r in train)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{name}: base pretraining")
    fig.tight_layout()
    fig.savefig(out_dir / "bpb.png", dpi=110)
    plt.close(fig)

    by_leg = [leg for leg in training_legs([r for r in rows if "loss" in r]) if leg]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    twin = ax.twinx() if any(r.get("mfu") is not None for leg in by_leg for r in leg) else None
    for i, leg in enumerate(by_leg):  # one line per leg: a resumed run's legs are not joined up
        ax.plot([r["step"] for r in leg], [r["tokens_per_sec"] / 1e3 for r in leg], lw=0.8, marker=".", ms=2,
                color="tab:blue")
        if i:
            ax.axvline(leg[0]["step"], color="grey", lw=0.6, ls="--")
        if twin is not None:
            with_mfu = [r for r in leg if r.get("mfu") is not None]
            twin.plot([r["step"] for r in with_mfu], [100 * r["mfu"] for r in with_mfu], lw=0.6, color="tab:orange")
    ax.set_xlabel("step" + (" (dashed: a resumed leg starts)" if len(by_leg) > 1 else ""))
    ax.set_ylabel("tokens/s (thousands)")
    ax.grid(alpha=0.3)
    if twin is not None:
        twin.set_ylabel("MFU (%)", color="tab:orange")
    ax.set_title(f"{name}: throughput per logged window")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    written = [args.out / n for n in ("proof_figures.json", "bpb.png", "throughput.png")]
    if any(p.exists() for p in written):
        parser.error(f"{args.out} already holds {', '.join(p.name for p in written if p.exists())}: "
                     "give a folder without them")
    rows = read_jsonl_objects(args.run / "base" / "metrics.jsonl")
    config = json.loads((args.run / "run_config.json").read_text())["config"]
    result = figures(rows, config, read_json_object(args.run / "summary.json"),
                     read_json_object(args.run / "tokens" / "manifest.json"))
    save_json(args.out / "proof_figures.json", result)
    plot(args.run.name, rows, config, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
