#!/bin/bash
# Issue 16, second H200 call (~8 min): mixtral-8x7b with FP8 KV (twice the requests per 93 GB weight read)
# and a dense batch of 8192 tokens (2048 rows per expert in prefill), each against run_gpu_mixtral.sh's
# bf16 / 2048 runs. Files to $OUT.
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=${NANOFLOW_TRACE_DIR:-$PWD/.carry/traces}
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
[[ "$GPU" == *H200* ]] || { echo "not an H200 (93 GB of weights): stop"; exit 0; }
M="python -m nanoflow.entrypoints.cli bench throughput --model mixtral-8x7b --load-format dummy --num-requests 600 --disable-tqdm"
run() {  # tag, timeout, bench arguments
  local tag=$1 limit=$2; shift 2
  timeout $limit $M "$@" --output-json $OUT/mixtral_$tag.json > $OUT/mixtral_$tag.txt 2>&1
  echo "$tag rc=$?"; grep -A3 "^system" $OUT/mixtral_$tag.txt | tail -1; grep -A6 "^step class" $OUT/mixtral_$tag.txt | tail -4
}
run 1024_512_fp8_b8192 170 --workload constant:1024:512 --kv-cache-dtype fp8 --max-num-batched-tokens 8192
run splitwise_fp8_b8192 130 --workload splitwise --kv-cache-dtype fp8 --max-num-batched-tokens 8192
run 1024_512_bf16_b8192 150 --workload constant:1024:512 --max-num-batched-tokens 8192
run 1024_512_fp8_b2048 130 --workload constant:1024:512 --kv-cache-dtype fp8
date -u
