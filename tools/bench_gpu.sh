#!/usr/bin/env bash
# The measurement sequence behind docs/performance.md, for one GPU machine, in as few calls as possible.
#   OUT=/some/dir bash tools/bench_gpu.sh main      # kernels check, h100-100m variants vs the torch peer
#   OUT=/some/dir bash tools/bench_gpu.sh opt       # remat policies, unrolling, with kernel profiles
#   OUT=/some/dir bash tools/bench_gpu.sh final     # chosen defaults vs the peer, the driver loop, h200-1b
#   OUT=/some/dir bash tools/bench_gpu.sh fused     # fused projections/CE, the peer's exact architecture, HLO dump
#   OUT=/some/dir bash tools/bench_gpu.sh vjp       # + packed-gradient custom VJPs; Qwen3 (QK-norm) peer too
#   OUT=/some/dir bash tools/bench_gpu.sh packed    # packed gradients without concatenates; hf-sft LoRA vs peft
#   OUT=/some/dir bash tools/bench_gpu.sh last      # closing figures: defaults vs Llama and Qwen3 peers, LoRA vs peft
#   OUT=/some/dir bash tools/bench_gpu.sh kernel    # fused QK-norm+RoPE Pallas kernels: GPU correctness, vs XLA, peers
#   OUT=/some/dir bash tools/bench_gpu.sh norms     # + the pre-norm backward kernel: GPU correctness, vs XLA, peers
#   OUT=/some/dir bash tools/bench_gpu.sh sync      # timed windows of SYNC_EVERY steps (host runs ahead) vs every step
#   OUT=/some/dir bash tools/bench_gpu.sh tiles     # QK kernels with all heads per program: tuning sweep, step vs peer
#   OUT=/some/dir bash tools/bench_gpu.sh tuned     # kernel tiles chosen from that sweep: step vs both peers, both timings
#   OUT=/some/dir bash tools/bench_gpu.sh mesh2     # two GPUs: bench_train on 1x2 and 2x1 vs one GPU, run tiny per mesh
# Every step writes JSON under $OUT and keeps going when one fails; the log is $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/picochat_bench}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
phase=${1:-main}
steps=${STEPS:-20}
w=${SYNC_EVERY:-10}  # the timed-window phases (sync, tiles, tuned): steps per synchronisation
bench() { "$PY" tools/bench_train.py --steps "$steps" --timeout "${CHILD_TIMEOUT:-300}" "$@"; }
# the Pallas kernels compiled for this GPU against the XLA path, before anything is timed
kernel_tests() {
  JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not sharded" 2>&1 | tail -15
}

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
  kernel)  # third session: QK-norm + RoPE as Pallas kernels (GPU 0 of whatever machine)
    JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_norm_rope_kernel.py -k "not sharded" \
      2>&1 | tail -15
    bench --scale h100-100m --peer torch \
      --variant default \
      --variant xla_norm_rope:norm_rope=xla \
      --json-out "$OUT/h100m_kernel.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --json-out "$OUT/peer_qwen3.json"
    bench --scale h100-100m --variant default_prof:profile=1 --json-out "$OUT/h100m_kernel_prof.json"
    ;;
  norms)  # third session: + the pre-norms' backward as a Pallas kernel (GPU 0 of whatever machine)
    kernel_tests
    bench --scale h100-100m --peer torch \
      --variant default \
      --variant xla_rms_norm:rms_norm=xla \
      --variant default_prof:profile=1 \
      --json-out "$OUT/h100m_norms.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --json-out "$OUT/peer_qwen3.json"
    ;;
  sync)  # fourth session: the same step timed with the host queueing ahead (windows of SYNC_EVERY steps, as the
         # training driver runs between log steps) and synchronised every step; both peers timed both ways too
    kernel_tests
    bench --scale h100-100m --peer torch --sync-every "$w" \
      --variant default \
      --variant llama_exact:qk_norm=off \
      --variant sync1:sync_every=1 \
      --json-out "$OUT/h100m_sync.json"
    "$PY" tools/torch_baseline.py --arch llama --steps "$steps" --sync-every 1 --json-out "$OUT/peer_llama_sync1.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --sync-every "$w" --json-out "$OUT/peer_qwen3.json"
    bench --scale h100-100m --mode loop --label driver_loop --json-out "$OUT/h100m_loop.json"
    ;;
  tiles)  # fourth session: the QK-norm+RoPE kernels with one program per token block (all heads), RoPE tables
          # read once per token; per-kernel tuning sweep against XLA, then the step vs the peer (host running ahead)
    kernel_tests
    "$PY" tools/bench_kernels.py --json-out "$OUT/kernels.json"
    bench --scale h100-100m --peer torch --sync-every "$w" \
      --variant default \
      --variant xla_norm_rope:norm_rope=xla \
      --variant sync1:sync_every=1 \
      --json-out "$OUT/h100m_tiles.json"
    ;;
  tuned)  # fourth session: 16-token QK programs (4 warps) and 16-row pre-norm programs (8 warps), from `tiles`
    bench --scale h100-100m --peer torch --sync-every "$w" \
      --variant default \
      --variant sync1:sync_every=1 \
      --json-out "$OUT/h100m_tuned.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --sync-every "$w" --json-out "$OUT/peer_qwen3.json"
    bench --scale h100-100m --sync-every "$w" --qk-norm off --label llama_exact --json-out "$OUT/h100m_llama_exact.json"
    ;;
  mesh2)  # third session: one host, two GPUs (issue 7's fallback); global batch 128 = 64 per GPU
    bench --scale h100-100m --mesh 1x2 --batch-size 128 --label mesh_1x2 --json-out "$OUT/mesh_1x2.json"
    bench --scale h100-100m --mesh 2x1 --batch-size 128 --label mesh_2x1 --json-out "$OUT/mesh_2x1.json"
    # the same global batch on one GPU: the loss reference, and per-GPU throughput at 64 rows for scaling
    CUDA_VISIBLE_DEVICES=0 bench --scale h100-100m --batch-size 128 --label one_gpu_b128 --json-out "$OUT/one_b128.json"
    CUDA_VISIBLE_DEVICES=0 bench --scale h100-100m --batch-size 64 --label one_gpu_b64 --json-out "$OUT/one_b64.json"
    ;;
  runs2)  # third session: the whole factory at h100-100m on each two-GPU mesh (preflight warns on the tiny pack)
    for mesh in ${MESHES:-1x2 2x1}; do
      timeout "${RUN_TIMEOUT:-280}" "$PY" -c "from picochat_jax.cli import main; main()" run tiny --dataset-pack examples/tiny_pack/dataset_pack.json \
        --out-dir "/tmp/run_$mesh" --scale h100-100m --mesh "$mesh" --base-steps "${BASE_STEPS:-300}" \
        --sft-steps "${SFT_STEPS:-40}" --no-dpo --no-progress --allow-preflight-warnings --overwrite \
        > "$OUT/run_$mesh.log" 2>&1
      echo "run tiny --mesh $mesh: exit $?"
      tail -5 "$OUT/run_$mesh.log"
      cp "/tmp/run_$mesh/base/metrics.jsonl" "$OUT/base_metrics_$mesh.jsonl" 2>/dev/null
    done
    ;;
  *)
    echo "unknown phase $phase (main|opt|final|fused|vjp|packed|last|kernel|norms|sync|tiles|tuned|mesh2|runs2)" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
