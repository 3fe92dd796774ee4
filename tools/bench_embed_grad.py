"""Time the token embedding's backward alone, for each way of summing it (model/ops.py EMBED_GRAD_IMPLS), on
uniformly drawn token ids and on Zipf-distributed ones (real text's repetition: frequent ids spread over the
vocabulary, as bench_train.py --zipf draws them).

    python tools/bench_embed_grad.py --vocab 8192 --width 768 --tokens 32768 --json-out embed.json

Each row: the backward's mean ms over --iters calls (one sync at the end), and its largest difference from the
float32 scatter's gradient (bf16 dy, so differences are rounding in the sums).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # bench_train's helpers, also when this file is loaded by path (tests)

from bench_train import zipf_ids  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent of the second id distribution")
    ap.add_argument("--impls", default="scatter,scatter_f32,onehot")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from picochat_jax.model.ops import embed_lookup

    rng = np.random.default_rng(0)
    table = jax.random.normal(jax.random.key(0), (args.vocab, args.width), jnp.float32) * 0.02
    dy = (jax.random.normal(jax.random.key(1), (args.tokens, args.width), jnp.float32)).astype(jnp.bfloat16)
    id_sets = {"uniform": rng.integers(0, args.vocab, args.tokens, dtype=np.int32),
               f"zipf{args.zipf}": zipf_ids(rng, args.vocab, args.tokens, args.zipf)}
    # The exact gradient: float32 rows scattered into float32.
    exact = jax.jit(lambda t, i, g: jax.vjp(lambda tt: embed_lookup(tt, i, jnp.float32, "scatter_f32"), t)[1](
        g.astype(jnp.float32))[0])
    rows = []
    for dist, ids in id_sets.items():
        ids = jnp.asarray(ids)
        top_share = float(np.bincount(np.asarray(ids), minlength=args.vocab).max()) / args.tokens
        reference = exact(table, ids, dy)
        for impl in args.impls.split(","):
            def backward(t: Any, i: Any, g: Any, impl: str = impl) -> Any:
                return jax.vjp(lambda tt: embed_lookup(tt, i, jnp.bfloat16, impl), t)[1](g)[0]

            fn = jax.jit(backward)
            t0 = time.perf_counter()
            grad = jax.block_until_ready(fn(table, ids, dy))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.iters):
                out = fn(table, ids, dy)
            jax.block_until_ready(out)
            ms = (time.perf_counter() - t0) / args.iters * 1e3
            row = {"ids": dist, "impl": impl, "ms": round(ms, 3), "compile_s": round(compile_s, 2),
                   "max_abs_diff": float(jnp.max(jnp.abs(grad.astype(jnp.float32) - reference))),
                   "max_abs_grad": float(jnp.max(jnp.abs(reference))), "top_id_share": round(top_share, 4),
                   "vocab": args.vocab, "width": args.width, "tokens": args.tokens,
                   "device": str(jax.devices()[0].device_kind)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
