#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, as named scenarios. Each writes JSON and a log under $OUT
# (copy it to docs/results/<date>-<gpu>/), keeps going when one step fails, and prints the environment first.
#   OUT=/some/dir bash tools/bench_gpu.sh pretrain       # h100-100m step vs the torch.compile Llama and Qwen3 peers,
#                                                        # timed in windows of SYNC_EVERY steps and every step; the
#                                                        # training driver loop; Pallas kernel tests first
#   OUT=/some/dir bash tools/bench_gpu.sh kernels        # Pallas kernel tests, the per-kernel tile sweep, the step
#                                                        # with each kernel against its XLA path
#   OUT=/some/dir bash tools/bench_gpu.sh lora           # hf-sft LoRA (SmolLM2-135M shape) vs transformers + peft
#   OUT=/some/dir bash tools/bench_gpu.sh qlora          # Qwen2.5-0.5B shape: QLoRA vs bf16 LoRA memory and loss
#   OUT=/some/dir bash tools/bench_gpu.sh lora-peers     # LoRA at the SmolLM2-135M and Qwen2.5-0.5B shapes vs peft
#   OUT=/some/dir bash tools/bench_gpu.sh lora-packing   # real tokens/s on a chat-length mix: packed vs padded peer
#                                                        # (PEER_PADDING="longest max_length")
#   OUT=/some/dir bash tools/bench_gpu.sh h200-1b        # the 1B scale's step (24 layers, 16 x 2048, remat dots)
#   OUT=/some/dir bash tools/bench_gpu.sh xla-flags      # the h100-100m step under XLA:GPU options, one process each
#   OUT=/some/dir bash tools/bench_gpu.sh mesh           # two GPUs: the step on 1x2 and 2x1 vs one GPU
#   OUT=/some/dir bash tools/bench_gpu.sh embed          # the embedding backward's ways (ops.EMBED_GRAD_IMPLS),
#                                                        # alone and in the h100-100m step, uniform and Zipf ids
#   OUT=/some/dir bash tools/bench_gpu.sh mesh-runs      # two GPUs: the whole factory (run tiny) on each mesh
#   OUT=/some/dir bash tools/bench_gpu.sh shards         # the real driver on disk shards: a synthetic corpus
#                                                        # (tools/bench_data.py), tokenizer, `data tokenize`, then
#                                                        # `train base --shards` at h100-100m against the bench step
#                                                        # (plain rows, and packed rows like the loader's);
#                                                        # CORPUS_MB, BASE_STEPS, EVAL_EVERY, CKPT_EVERY, RUN_TIMEOUT
#   bash tools/bench_gpu.sh detach SCENARIO; later: OUT=/some/dir bash tools/bench_gpu.sh collect SCENARIO
#                                                        # a scenario longer than one device call, run detached
#   OUT=/some/dir BEFORE=/old/checkout bash tools/bench_gpu.sh before-after
#                                                        # the h100-100m step and hf-sft LoRA step of another
#                                                        # checkout (BEFORE) and of this one, alternating
#                                                        # (ROUNDS=2, PARTS="step lora": split into two calls)
set -uo pipefail
OUT=${OUT:-/tmp/picochat_bench}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# A scenario that outlasts one device call (10 minutes): `detach SCENARIO` starts it detached (setsid), so it
# keeps running after the call returns, writing to DETACH_DIR/SCENARIO (the environment, CORPUS_MB and the like,
# goes with it); a later call's `collect SCENARIO` says whether it has finished and packs what it wrote into
# $OUT/SCENARIO.tar.gz.
case "${1:-}" in
  detach|collect)
    name=${2:?usage: bench_gpu.sh detach|collect SCENARIO}
    dir=${DETACH_DIR:-/tmp/detached}/$name
    if [ "$1" = detach ]; then
      mkdir -p "$dir"
      OUT=$dir setsid nohup bash -c 'bash "$0" "$1"; echo "exit $? at $(date -u +%H:%M:%S)" > "$2/finished"' \
        "$0" "$name" "$dir" > "$dir/run.log" 2>&1 < /dev/null &
      echo "started $name in $dir"
    else
      if [ -f "$dir/finished" ]; then echo "$name finished: $(cat "$dir/finished")"; else echo "$name still running"; fi
      tail -5 "$dir/run.log" 2>/dev/null
      tar czf "$OUT/$name.tar.gz" -C "$(dirname "$dir")" "$name" && echo "packed $OUT/$name.tar.gz"
    fi
    exit 0
    ;;
esac
scenario=${1:-pretrain}
steps=${STEPS:-20}
w=${SYNC_EVERY:-10}  # steps per synchronisation in the timed windows (the driver syncs only at log steps)
bench() { "$PY" tools/bench_train.py --steps "$steps" --timeout "${CHILD_TIMEOUT:-300}" "$@"; }
# the Pallas kernels compiled for this GPU against the XLA path, before anything is timed (the TPU splash
# tests are CPU interpret-mode tests: left out here)
kernel_tests() {
  JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not sharded and not splash and not tpu" 2>&1 | tail -15
}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  "$PY" - <<'PYEOF'
import importlib.metadata as md
import jax
print("jax", jax.__version__, jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "grain", "peft"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

case "$scenario" in
  pretrain)
    kernel_tests
    bench --scale h100-100m --peer torch --sync-every "$w" \
      --variant default \
      --variant llama_exact:qk_norm=off \
      --variant sync1:sync_every=1 \
      --json-out "$OUT/h100m.json"
    "$PY" tools/torch_baseline.py --arch llama --steps "$steps" --sync-every 1 --json-out "$OUT/peer_llama_sync1.json"
    "$PY" tools/torch_baseline.py --arch qwen3 --steps "$steps" --sync-every "$w" --json-out "$OUT/peer_qwen3.json"
    bench --scale h100-100m --mode loop --label driver_loop --json-out "$OUT/h100m_loop.json"
    ;;
  kernels)
    kernel_tests
    "$PY" tools/bench_kernels.py --json-out "$OUT/kernels.json"
    bench --scale h100-100m --sync-every "$w" \
      --variant default \
      --variant triton:norm_rope=pallas,rms_norm=pallas \
      --variant xla_norm_rope:norm_rope=xla \
      --variant xla_rms_norm:rms_norm=xla \
      --variant default_prof:profile=1 \
      --json-out "$OUT/h100m_kernels.json"
    ;;
  lora)
    "$PY" tools/bench_hf_lora.py --steps "$steps" --warmup 2 --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/hf_lora.json"
    ;;
  qlora)  # Qwen2.5-0.5B shape (batch 8 x 512): bf16 LoRA against QLoRA (NF4 base), peak memory and the loss
          # after QLORA_STEPS steps on a learnable chain, with and without gradient checkpointing; CE_CHUNK=N adds
          # cross-entropy in chunks of N tokens to every run (the logits are 2.3 GiB of the peak at this vocabulary)
    qwen="--layers 24 --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936 --batch-size 8"
    qwen="$qwen --ce-chunk-tokens ${CE_CHUNK:-0}"
    for ckpt in "" "--gradient-checkpointing"; do
      tag=${ckpt:+_ckpt}
      for q in none 4bit; do
        "$PY" tools/bench_hf_lora.py $qwen $ckpt --quantize $q --data markov --batches-count 16 --lr 1e-3 \
          --steps "${QLORA_STEPS:-200}" --warmup 2 --peer none --timeout "${CHILD_TIMEOUT:-300}" \
          --json-out "$OUT/qwen05_${q}${tag}.json"
      done
    done
    ;;
  lora-peers)  # LoRA speed against transformers + peft + torch.compile at both shapes of the speed table
    "$PY" tools/bench_hf_lora.py --steps "$steps" --warmup 2 --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/smollm2.json"
    "$PY" tools/bench_hf_lora.py --layers 24 --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936 \
      --batch-size 8 --steps "$steps" --warmup 2 --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/qwen05.json"
    ;;
  lora-packing)  # chat-length mix (log-normal, median 180, up to 1024): our packed rows vs the peer's padded ones,
                 # padded to each batch's longest example (trl's default collator) and to 1024 (padding="max_length")
    for padding in ${PEER_PADDING:-longest max_length}; do
      "$PY" tools/bench_hf_lora.py --data chatmix --seq-len 1024 --batch-size 8 --batches-count 64 \
        --steps "${STEPS:-40}" --warmup 2 --peer-padding "$padding" --timeout "${CHILD_TIMEOUT:-300}" \
        --json-out "$OUT/lora_packing_$padding.json"
    done
    ;;
  xla-flags)  # the h100-100m step under XLA:GPU options not yet measured on one GPU, each in its own process,
              # the default first and last (clock drift); a crash or a compile past CHILD_TIMEOUT is a row
    bench --scale h100-100m --sync-every "$w" --steps 30 --warmup 5 --json-out "$OUT/xla_flags.json" \
      --variant default: \
      --variant triton_gemm_any:extra_xla_flags=--xla_gpu_triton_gemm_any=true \
      --variant exhaustive_tiling:extra_xla_flags=--xla_gpu_exhaustive_tiling_search=true \
      --variant cublaslt:extra_xla_flags=--xla_gpu_enable_cublaslt=true \
      --variant no_command_buffers:extra_xla_flags=--xla_gpu_enable_command_buffer= \
      --variant loop_double_buffering:extra_xla_flags=--xla_gpu_enable_while_loop_double_buffering=true \
      --variant default_again:
    ;;
  h200-1b)  # all 24 layers at the scale's micro-batch (16 x 2048); a rolled layer scan bounds the compile time
    bench --scale h200-1b --batch-size 16 --remat dots --ce-chunk 8192 --scan-unroll 1 --steps 10 \
      --label h200-1b_rolled_dots --json-out "$OUT/h200_1b.json"
    ;;
  mesh)  # one host, two GPUs; global batch 128 = 64 per GPU; MESH_FLAGS="none gpu" = without and with
          # picochat_jax.train.step.GPU_XLA_FLAGS (the latency-hiding scheduler that overlaps collectives);
          # PROFILE=1 adds a kernel profile (NCCL kernels included) to each two-GPU run
    # per-GPU throughput at 64 rows on one GPU: the scaling reference (the flags only move collectives)
    CUDA_VISIBLE_DEVICES=0 bench --scale h100-100m --batch-size 64 --sync-every "$w" --label one_gpu_b64 \
      --json-out "$OUT/one_b64.json"
    # what each mesh moves, read from the GPU's own optimized program (two layers: the dtypes, not the totals)
    for mesh in 2x1 1x2; do
      "$PY" tools/collectives.py --scale h100-100m --layers 2 --batch-size 128 --mesh "$mesh" \
        > "$OUT/collectives_$mesh.txt" 2>&1
    done
    # MESH_EXTRA_FLAGS="..." (verbatim XLA flags, e.g. a smaller all-reduce combine threshold so that layers'
    # gradient reductions can overlap the rest of the backward) adds each mesh once more with them and the GPU set
    for flags in ${MESH_FLAGS:-none} ${MESH_EXTRA_FLAGS:+extra}; do
      if [ "$flags" = extra ]; then xla=(--xla-flags gpu "--extra-xla-flags=$MESH_EXTRA_FLAGS")
      else xla=(--xla-flags "$flags"); fi
      for mesh in 2x1 1x2; do
        bench --scale h100-100m --mesh "$mesh" --batch-size 128 --sync-every "$w" "${xla[@]}" \
          ${PROFILE:+--profile} --label "mesh_${mesh}_$flags" --json-out "$OUT/mesh_${mesh}_$flags.json"
      done
    done
    ;;
  embed)  # the embedding backward alone, then the h100-100m step, each way of summing it, uniform and Zipf ids
    "$PY" tools/bench_embed_grad.py --vocab 8192 --width 768 --json-out "$OUT/embed_grad_100m.json"
    "$PY" tools/bench_embed_grad.py --vocab 32768 --width 2048 --json-out "$OUT/embed_grad_1b.json"
    for ids in "--zipf 1.1" ""; do
      bench --scale h100-100m --sync-every "$w" $ids --segments 400 --positions \
        --variant scatter_bf16:embed_grad=scatter --variant scatter_f32:embed_grad=scatter_f32 \
        --variant onehot:embed_grad=onehot --json-out "$OUT/h100m_embed${ids:+_zipf}.json"
    done
    ;;
  mesh-runs)  # the whole factory at h100-100m on each two-GPU mesh (preflight warns on the tiny pack)
    for mesh in ${MESHES:-1x2 2x1}; do
      timeout "${RUN_TIMEOUT:-280}" "$PY" -c "from picochat_jax.cli import main; main()" run tiny \
        --dataset-pack examples/tiny_pack/dataset_pack.json --out-dir "/tmp/run_$mesh" --scale h100-100m \
        --mesh "$mesh" --base-steps "${BASE_STEPS:-300}" --sft-steps "${SFT_STEPS:-40}" --no-dpo --no-progress \
        --allow-preflight-warnings --overwrite > "$OUT/run_$mesh.log" 2>&1
      echo "run tiny --mesh $mesh: exit $?"
      tail -5 "$OUT/run_$mesh.log"
      cp "/tmp/run_$mesh/base/metrics.jsonl" "$OUT/base_metrics_$mesh.jsonl" 2>/dev/null
    done
    ;;
  shards)  # BOS-aligned best-fit rows streamed from token shards by the driver, vs the step alone
    work=${WORK:-/tmp/shards_bench}
    mkdir -p "$work"
    "$PY" - "$work" "${CORPUS_MB:-300}" <<'PYEOF'
import sys
sys.path.insert(0, "tools")
from pathlib import Path
from bench_data import make_corpus
print(make_corpus(Path(sys.argv[1]) / "corpus", float(sys.argv[2])))
PYEOF
    # data tokenize encodes on the Rust tokenizer's thread pool, which TOKENIZERS_PARALLELISM=false (set above
    # for the torch peers) would switch off.
    cli() { TOKENIZERS_PARALLELISM=true "$PY" -c "from picochat_jax.cli import main; main()" "$@"; }
    cli tokenizer train --input "$work/corpus" --out "$work/tokenizer.json" --vocab-size 8192 \
      --max-bytes 67108864 --overwrite 2>&1 | tail -1
    TIMEFORMAT="data tokenize: %R s wall"
    time cli data tokenize "$work/corpus" --tokenizer "$work/tokenizer.json" --out-dir "$work/tokens" \
      --no-progress --overwrite 2>&1 | tail -3
    timeout "${RUN_TIMEOUT:-300}" "$PY" -c "from picochat_jax.cli import main; main()" train base \
      --shards "$work/tokens" --tokenizer "$work/tokenizer.json" --out-dir "$work/base" --scale h100-100m \
      --steps "${BASE_STEPS:-200}" --set "base.eval_every=${EVAL_EVERY:-100}" \
      --set "base.checkpoint_every=${CKPT_EVERY:-100}" --no-progress \
      --overwrite > "$OUT/train_base_shards.log" 2>&1
    echo "train base --shards: exit $?"; tail -3 "$OUT/train_base_shards.log"
    cp "$work/base/metrics.jsonl" "$OUT/base_shards_metrics.jsonl" 2>/dev/null
    cp "$work/base/summary.json" "$OUT/base_shards_summary.json" 2>/dev/null
    cp "$work/tokens/manifest.json" "$OUT/tokens_manifest.json" 2>/dev/null
    bench --scale h100-100m --sync-every "$w" --json-out "$OUT/h100m_step.json"
    # the step on rows like the loader's: documents of the corpus's mean length, per-segment positions, ids as
    # skewed as real text (Zipf 1.1)
    doc_len=$("$PY" -c "import json,sys; t=json.load(open(sys.argv[1]))['splits']['train']; \
print(max(1, round(t['tokens'] / t['documents'])))" "$work/tokens/manifest.json")
    bench --scale h100-100m --sync-every "$w" --segments "$doc_len" --positions --zipf 1.1 \
      --label "packed_zipf_seg$doc_len" --json-out "$OUT/h100m_step_packed_zipf.json"
    ;;
  before-after)  # our side only (no peers): the same step, two checkouts, alternating to spread clock drift
    : "${BEFORE:?set BEFORE to the other checkout (its tools/ and picochat_jax/)}"
    for round in $(seq "${ROUNDS:-2}"); do
      for side in before after; do
        root=.; [ "$side" = before ] && root="$BEFORE"
        case " ${PARTS:-step lora} " in *" step "*)
          "$PY" "$root/tools/bench_train.py" --scale h100-100m --steps "$steps" --sync-every "$w" \
            --timeout "${CHILD_TIMEOUT:-300}" --label "${side}_${round}" --json-out "$OUT/step_${side}_${round}.json";;
        esac
        case " ${PARTS:-step lora} " in *" lora "*)
          "$PY" "$root/tools/bench_hf_lora.py" --peer none --steps "$steps" --warmup 2 \
            --timeout "${CHILD_TIMEOUT:-300}" --json-out "$OUT/lora_${side}_${round}.json";;
        esac
      done
    done
    ;;
  *)
    echo "unknown scenario $scenario (pretrain|kernels|lora|qlora|lora-peers|lora-packing|h200-1b|mesh|embed|mesh-runs|shards|before-after)" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
