#!/usr/bin/env bash
# The measurement sequence behind docs/performance.md, for one GPU machine, in as few calls as possible.
#   OUT=/some/dir bash tools/bench_gpu.sh main      # kernels check, h100-100m variants vs the torch peer
#   OUT=/some/dir bash tools/bench_gpu.sh opt       # remat policies, unrolling, with kernel profiles
#   OUT=/some/dir bash tools/bench_gpu.sh final     # chosen defaults vs the peer, the driver loop, h200-1b
#   OUT=/some/dir bash tools/bench_gpu.sh fused     # fused projections/CE, the peer's exact architecture, HLO dump
#   OUT=/some/dir bash tools/bench_gpu.sh vjp       # + packed-gradient custom VJPs; Qwen3 (QK-norm) peer too
#   OUT=/some/dir bash tools/bench_gpu.sh packed    # packed gradients without concatenates; hf-sft LoRA vs peft
#   OUT=/some/dir bash tools/bench_gpu.sh last      # closing figures: defaults vs Llama and Qwen3 peers, LoRA vs peft
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
  fused)  # second session, 2026-11-25: fused q/k/v and gate/up matmuls, fused cross-entropy, RoPE tables once
    bench --scale h100-100m --peer torch \
      --variant "fused_prof:profile=1,extra_xla_flags=--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*" \
      --variant llama_exact:qk_norm=off \
      --variant unfused:fuse_projections=off \
      --variant no_triton_gemm:extra_xla_flags=--xla_gpu_enable_triton_gemm=false \
      --json-out "$OUT/h100m_fused.json"
    hlo=$(ls -S /tmp/hlo/*after_optimizations.txt 2>/dev/null | head -1)
    [ -n "$hlo" ] && gzip -c "$hlo" > "$OUT/step_after_optimizations.txt.gz"
    ;;
  vjp)  # second session: + custom VJPs writing the packed q|k|v and gate|up gradients in one pass
    bench --scale h100-100m --peer torch \
      --variant "default_prof:profile=1,extra_xla_flags=--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*" \
      --variant llama_exact:qk_norm=off \
      --variant unfused:fuse_projections=off \
      --json-out "$OUT/h100m_vjp.json"
    hlo=$(ls -S /tmp/hlo/*after_optimizations.txt 2>/dev/null | head -1)
    [ -n "$hlo" ] && gzip -c "$hlo" > "$OUT/step_after_optimizations.txt.gz"
    # the same shape with QK-norm on the torch side too (Qwen3ForCausalLM), against default_prof above
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --json-out "$OUT/peer_qwen3.json"
    ;;
  packed)  # second session: packed-gradient VJPs as select/pad (no concatenate), then hf-sft LoRA vs peft
    bench --scale h100-100m --peer torch \
      --variant default \
      --variant llama_exact:qk_norm=off \
      --variant unfused:fuse_projections=off \
      --variant default_prof:profile=1 \
      --json-out "$OUT/h100m_packed.json"
    "$PY" tools/bench_hf_lora.py --steps "$steps" --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/hf_lora.json"
    ;;
  last)  # second session's closing figures: shipped defaults vs both peers, one XLA flag, hf-sft LoRA vs peft
    bench --scale h100-100m --peer torch \
      --variant default \
      --variant llama_exact:qk_norm=off \
      --variant llama_exact_no_triton:qk_norm=off,extra_xla_flags=--xla_gpu_enable_triton_gemm=false \
      --json-out "$OUT/h100m_last.json"
    "$PY" tools/bench_hf_lora.py --steps "$steps" --warmup 2 --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/hf_lora.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --json-out "$OUT/peer_qwen3.json"
    ;;
  *)
    echo "unknown phase $phase (main|opt|final|fused|vjp|packed|last)" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
