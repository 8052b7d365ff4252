#!/bin/bash
# KV admission 'reserve' against 'peak' in one engine per workload (`--compare-kv-admission`), ~8 min on an
# H200: mixtral-8x7b constant:1024:512 and splitwise (600 requests each; the prediction from
# benchmarks/admission_sim.py's pool is 1.10-1.2x), then llama-3-8b sharegpt (1000 requests) if time is
# left. MIXTRAL_ARGS picks the KV dtype and budget (default: fp8 KV, 8192 tokens). Files to $OUT.
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=${NANOFLOW_TRACE_DIR:-$PWD/.carry/traces}
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
MIXTRAL_ARGS=${MIXTRAL_ARGS:---kv-cache-dtype fp8 --max-num-batched-tokens 8192}
run() {  # tag, timeout, bench arguments
  local tag=$1 limit=$2; shift 2
  timeout $limit python -m nanoflow.entrypoints.cli bench throughput --load-format dummy --disable-tqdm \
    --compare-kv-admission "$@" --output-json $OUT/admission_$tag.json > $OUT/admission_$tag.txt 2>&1
  echo "$tag rc=$?"; sed -n '/^== nanoflow bench throughput/,$p' $OUT/admission_$tag.txt | grep -v "^CUDA graphs" | tail -12
}
if [[ "$GPU" == *H200* ]]; then
  run mixtral_1024_512 230 --model mixtral-8x7b --num-requests 600 --workload constant:1024:512 $MIXTRAL_ARGS
  run mixtral_splitwise 200 --model mixtral-8x7b --num-requests 600 --workload splitwise $MIXTRAL_ARGS
fi
run llama_sharegpt 150 --model llama-3-8b --num-requests 1000 --workload sharegpt
date -u
