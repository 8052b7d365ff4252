#!/bin/bash
# Issue 16 on an H200 (~9 min, one call): the grouped GEMM's TMA path against the pointer kernels at
# Mixtral shapes, then mixtral-8x7b with FP8 KV and an 8192-token dense batch (pointer kernels; again
# with NANOFLOW_MOE_TMA=1 if the TMA path was correct and faster), then splitwise on the faster path.
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=${NANOFLOW_TRACE_DIR:-$PWD/.carry/traces}
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
timeout 150 python benchmarks/moe_gpu.py --only tma --json $OUT/moe_tma.json > $OUT/moe_tma.txt 2>&1
echo "moe tma rc=$?"; grep -v Warning $OUT/moe_tma.txt | tail -16
TMA=0; grep -q "tma verdict: faster" $OUT/moe_tma.txt && TMA=1
[[ "$GPU" == *H200* ]] || { echo "not an H200 (93 GB of weights): stop"; exit 0; }
M="python -m nanoflow.entrypoints.cli bench throughput --model mixtral-8x7b --load-format dummy --num-requests 600 --disable-tqdm --kv-cache-dtype fp8 --max-num-batched-tokens 8192"
run() {  # tag, timeout, NANOFLOW_MOE_TMA, bench arguments
  local tag=$1 limit=$2 tma=$3; shift 3
  NANOFLOW_MOE_TMA=$tma timeout $limit $M "$@" --output-json $OUT/mixtral_$tag.json > $OUT/mixtral_$tag.txt 2>&1
  echo "$tag (NANOFLOW_MOE_TMA=$tma) rc=$?"; grep -A3 "^system" $OUT/mixtral_$tag.txt | tail -1
  grep -A6 "^step class" $OUT/mixtral_$tag.txt | tail -4
}
run 1024_512_fp8_b8192 170 0 --workload constant:1024:512
[[ $TMA == 1 ]] && run 1024_512_fp8_b8192_tma 170 1 --workload constant:1024:512
run splitwise_fp8_b8192 130 $TMA --workload splitwise
date -u
