#!/bin/bash
# One device call: smoke test (a hang or crash stops here), correctness, timings.
# Logs and JSON to $OUT.  Usage: bash benchmarks/run_gpu_decode_hopper.sh
export PYTHONUNBUFFERED=1 NANOFLOW_HOPPER_DECODE=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
timeout 45 python benchmarks/decode_hopper_gpu.py --section check --quick > $OUT/smoke.txt 2>&1
tail -4 $OUT/smoke.txt
grep -q "^check:" $OUT/smoke.txt || { echo "smoke test did not finish: stop"; exit 1; }
timeout 100 python benchmarks/decode_hopper_gpu.py --section check > $OUT/check.txt 2>&1
grep -v "^  ok" $OUT/check.txt | tail -25
timeout 200 python benchmarks/decode_hopper_gpu.py --section perf "$@" > $OUT/perf.txt 2>&1
cat $OUT/perf.txt | tail -40
