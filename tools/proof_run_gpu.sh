#!/usr/bin/env bash
# One leg of a proof run on a GPU machine (repository root; the machine kept warm between legs).
#
#   tools/proof_run_gpu.sh SCALE SECONDS [run tiny flags...]
#
# Unpacks .proof/proof_pack.tar.xz (made by tools/make_proof_corpus.py, then tar+xz) once, then runs
# `picochat run tiny --resume-or-start` on it for at most SECONDS: SIGTERM at the limit makes the trainer save a
# resume checkpoint, and the next leg continues at the exact next batch. When the run has finished, the
# checkpoint is exported to a Hugging Face folder and checked in transformers (tools/check_hf_export.py).
# Every leg leaves in $OUT the log so far and the run's evidence (no checkpoints, no token shards) as
# evidence-SCALE.tar.gz. Wheels in .whl/ (packages the machine lacks) are installed to /tmp/site once.
set -uo pipefail
SCALE=${1:?usage: proof_run_gpu.sh SCALE SECONDS [run tiny flags...]}
SECONDS_LEFT=${2:?usage: proof_run_gpu.sh SCALE SECONDS [run tiny flags...]}
shift 2
WORK=${PROOF_WORK:-/tmp/proof}
RUN=$WORK/run-$SCALE
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
if [ ! -d /tmp/site ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Later legs load the compiled train, eval and decode programs instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax-cache}
[ -d "$WORK/proof_pack" ] || tar -xJf .proof/proof_pack.tar.xz -C "$WORK" || exit 1
LOG=$WORK/log-$SCALE.txt
{ date -u +"leg start %Y-%m-%dT%H:%M:%SZ"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; } \
  >>"$LOG"
timeout -s TERM "$SECONDS_LEFT" python3 -m picochat_jax.cli run tiny --dataset-pack "$WORK/proof_pack/dataset_pack.json" \
  --out-dir "$RUN" --scale "$SCALE" --device "${PROOF_DEVICE:-cuda}" --no-progress --resume-or-start "$@" >>"$LOG" 2>&1
echo "leg exit $? at $(date -u +%H:%M:%S)" >>"$LOG"
if [ -f "$RUN/release/gate.json" ] && [ ! -f "$WORK/check-$SCALE/hf_export_check.json" ]; then
  CANDIDATE=$RUN/sft/checkpoint  # the model the run evaluated and gated: DPO's when the pack had preferences
  [ -d "$RUN/dpo/checkpoint" ] && CANDIDATE=$RUN/dpo/checkpoint
  python3 tools/check_hf_export.py --checkpoint "$CANDIDATE" --eval "$WORK/proof_pack/eval.jsonl" \
    --out-dir "$WORK/check-$SCALE" >>"$LOG" 2>&1
  cp "$WORK/check-$SCALE/hf_export_check.json" "$RUN/hf_export_check.json" 2>/dev/null
fi
tar -C "$WORK" -czf "$OUT/evidence-$SCALE.tar.gz" --exclude='*checkpoint*' --exclude='tokens/*.bin' \
  --exclude='*.safetensors' "run-$SCALE"
cp "$LOG" "$OUT/"
tail -n 25 "$LOG"
