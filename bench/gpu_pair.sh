#!/usr/bin/env bash
# Two single-GPU lists of bench/gpu_kernels.sh parts at once on a 2-GPU machine, one list per GPU
# (CUDA_VISIBLE_DEVICES), so a call on nvidia-h200-x2 does twice the single-GPU work in the same
# device time. The GPUs are separate cards: a part's timings do not depend on what the other card
# runs (they share only the host's cores and memory; the "unsloth" offload copies use each card's
# own PCIe link). Part logs go into each list's results.tgz, so the call brings back 6 files:
# $OUT/g0/{gpu.txt,parts.log,results.tgz} and the same under $OUT/g1.
# A third list runs first, on both GPUs (multi-GPU parts), its files under $OUT/both (no gpu.txt:
# 8 files at most come back); the two single-GPU lists share what is left of BUDGET.
#   BUDGET=560 bash bench/gpu_pair.sh "unroll-ab anchors" "long-bf16 offload" ["fsdp-80"]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastft_out}
BUDGET=${BUDGET:-560}
start=$(date +%s)
if [ -n "${3:-}" ]; then
  OUT="$OUT/both" WORK=/tmp/fastft_work_both LOG_DIR=/tmp/fastft_work_both BUDGET=$BUDGET bash bench/gpu_kernels.sh $3
  rm -f "$OUT/both/gpu.txt"
fi
export BUDGET=$(( BUDGET - ($(date +%s) - start) ))
pids=()
for gpu in 0 1; do
  parts=${1:-}; [ "$gpu" = 1 ] && parts=${2:-}
  [ -z "$parts" ] && continue
  CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/g$gpu" WORK="/tmp/fastft_work_g$gpu" LOG_DIR="/tmp/fastft_work_g$gpu" \
    SITE="/tmp/site_g$gpu" bash bench/gpu_kernels.sh $parts &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
