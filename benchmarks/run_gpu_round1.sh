#!/usr/bin/env bash
# One device call: kernel checks, engine checks, throughput benchmarks. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=$PWD/.carry/traces
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
[ -f benchmarks/kernels_gpu.py ] && timeout 180 python3 benchmarks/kernels_gpu.py 2>&1 | tee "$OUT/kernels.txt"
timeout 240 python3 benchmarks/gpu_engine_check.py 2>&1 | tee "$OUT/engine_check.txt"
for w in "$@"; do
  name=$(echo "$w" | tr ':' '_')
  timeout 300 python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy \
    --workload "$w" --num-requests ${NREQ:-1000} --disable-tqdm ${EXTRA:-} \
    --output-json "$OUT/tp_$name.json" 2>&1 | tail -40 | tee "$OUT/tp_$name.txt"
done
