#!/bin/bash
# Issue 16 on an H200 (93 GB of weights; one device call, ~7 min): grouped GEMM vs cuBLAS, tiny and dummy
# checks (benchmarks/moe_gpu.py), then mixtral-8x7b throughput on constant:1024:512 and splitwise. Files to $OUT.
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=${NANOFLOW_TRACE_DIR:-$PWD/.carry/traces}
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 270 python benchmarks/moe_gpu.py --quick --json $OUT/moe_gpu.json > $OUT/moe_gpu.txt 2>&1
echo "moe_gpu rc=$?"; grep -v "^  ok" $OUT/moe_gpu.txt | tail -45
for W in constant:1024:512 splitwise; do
  tag=$(echo $W | tr ':' '_')
  timeout 150 python -m nanoflow.entrypoints.cli bench throughput --model mixtral-8x7b --load-format dummy \
    --workload $W --num-requests 600 --disable-tqdm --output-json $OUT/mixtral_$tag.json > $OUT/mixtral_$tag.txt 2>&1
  echo "$tag rc=$?"; sed -n '/^== nanoflow bench throughput/,$p' $OUT/mixtral_$tag.txt | tail -12
done
date -u
