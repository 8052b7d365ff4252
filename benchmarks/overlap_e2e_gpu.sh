#!/usr/bin/env bash
# Issue 13 on one GPU, one device call (<= 4 minutes on an H100 / H200): CUDA graphs for every plan
# (the token tests of tests/gpu/test_graphs_gpu.py, then host time per step and the green-context
# probe), then the end-to-end comparison with the per-step-class table and the GPU busy share.
# Files under $OUT (or ./out).
#   bash benchmarks/overlap_e2e_gpu.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NANOFLOW_CACHE_DIR=${NANOFLOW_CACHE_DIR:-$OUT/cache}   # no tuned profile: plan choice by fixed rates
status=0
echo "== 1. graphs vs eager, every plan (tiny checkpoints), then host ms per step =="
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_graphs_gpu.py 2>&1 \
  | tee "$OUT/graphs_tests.txt" | tail -3 || status=1
timeout 60 python3 benchmarks/graph_step_time.py --plans sequential,nano-4,overlap-split \
  --json "$OUT/graph_step_time.json" 2>&1 | tee "$OUT/graph_step_time.txt" | grep -v -i "warn" || status=1
echo "== 2. llama-3-8b dummy, constant:512:1024, 300 requests, overlap-split vs sequential =="
timeout 150 python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy \
  --workload constant:512:1024 --num-requests 300 --plan overlap-split --compare sequential --disable-tqdm \
  --output-json "$OUT/overlap_e2e_8b.json" > "$OUT/overlap_e2e_8b.txt" 2>&1 || status=1
sed -n '/^== nanoflow bench throughput/,$p' "$OUT/overlap_e2e_8b.txt"
grep -E "error|Error|WARNING|graphs off" "$OUT/overlap_e2e_8b.txt" | grep -v "^nanoflow" | tail -5
exit $status
