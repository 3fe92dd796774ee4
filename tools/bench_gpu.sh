#!/usr/bin/env bash
# The measurement sequence behind docs/performance.md, for one GPU machine, in as few calls as possible.
#   OUT=/some/dir bash tools/bench_gpu.sh main      # kernels check, h100-100m variants vs the torch peer
#   OUT=/some/dir bash tools/bench_gpu.sh opt       # remat policies, unrolling, with kernel profiles
#   OUT=/some/dir bash tools/bench_gpu.sh final     # chosen defaults vs the peer, the driver loop, h200-1b
# Every step writes JSON under $OUT and keeps going when one fails; the log is $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/picochat_bench}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
phase=${1:-main}
steps=${STEPS:-20}
bench() { "$PY" tools/bench_train.py --steps "$steps" --timeout "${CHILD_TIMEOUT:-300}" "$@"; }

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.metadata as md
import jax
print("jax", jax.__version__, jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "grain", "peft"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
} 2>&1 | tee "$OUT/env.txt"

case "$phase" in
  main)  # run 2026-11-25 (docs/performance.md); the rolled layer scan was the default then
    bench --mode check-attention --json-out "$OUT/attention.json"
    bench --scale h100-100m --peer torch \
      --variant xla:attention=xla,scan_unroll=1 \
      --variant cudnn:attention=cudnn,scan_unroll=1 \
      --variant cudnn_ce8k:attention=cudnn,ce_chunk=8192,scan_unroll=1 \
      --variant cudnn_gpuflags:attention=cudnn,xla_flags=gpu,scan_unroll=1 \
      --variant cudnn_seg256:attention=cudnn,segments=256,scan_unroll=1 \
      --json-out "$OUT/h100m_main.json"
    ;;
  opt)  # run 2026-11-25
    bench --scale h100-100m --peer torch \
      --variant cudnn_prof:attention=cudnn,scan_unroll=1,profile=1 \
      --variant cudnn_dots:attention=cudnn,remat=dots,scan_unroll=1 \
      --variant cudnn_unroll16:attention=cudnn,scan_unroll=16 \
      --json-out "$OUT/h100m_opt.json"
    ;;
  final)  # run 2026-11-25: the shipped defaults (cuDNN attention, layers unrolled on GPU) vs the peer
    bench --scale h100-100m --peer torch \
      --variant default_prof:profile=1 \
      --variant unrolled_dots:remat=dots \
      --variant unrolled_seg256:segments=256 \
      --json-out "$OUT/h100m_final.json"
    # h200-1b's full 24 layers at its micro-batch (16 x 2048), rolled scan to bound compile time on this call
    bench --scale h200-1b --batch-size 16 --remat dots --ce-chunk 8192 --scan-unroll 1 --steps 10 \
      --label h200-1b_rolled_dots --json-out "$OUT/h200_1b.json"
    ;;
  *)
    echo "unknown phase $phase (main|opt|final)" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
