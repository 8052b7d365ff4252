#!/usr/bin/env bash
# Issue 13 on one GPU, one device call (<= 4 minutes on an H100 / H200): CUDA graphs for every plan
# (tokens, green-context probe, host time per step), then the end-to-end comparison with the
# per-step-class table and the GPU busy share. Files under $OUT (or ./out).
#   bash benchmarks/overlap_e2e_gpu.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NANOFLOW_CACHE_DIR=${NANOFLOW_CACHE_DIR:-$OUT/cache}   # no tuned profile: plan choice by fixed rates
status=0
echo "== 1. graphs vs eager, every plan (tiny checkpoints) =="
timeout 110 python3 benchmarks/overlap_e2e_check.py --json "$OUT/overlap_e2e_check.json" 2>&1 \
  | tee "$OUT/overlap_e2e_check.txt" | grep -v -i "warn" || status=1
echo "== 2. llama-3-8b dummy, constant:512:1024, 300 requests, overlap-split vs sequential =="
timeout 150 python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy \
  --workload constant:512:1024 --num-requests 300 --plan overlap-split --compare sequential --disable-tqdm \
  --output-json "$OUT/overlap_e2e_8b.json" > "$OUT/overlap_e2e_8b.txt" 2>&1 || status=1
sed -n '/^== nanoflow bench throughput/,$p' "$OUT/overlap_e2e_8b.txt"
grep -E "error|Error|WARNING|graphs off" "$OUT/overlap_e2e_8b.txt" | grep -v "^nanoflow" | tail -5
exit $status
