#!/usr/bin/env bash
# Round 2: step profile, then throughput tables (1000 requests each; HF baseline on 1024:512).
set -uo pipefail
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=$PWD/.carry/traces
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 120 python3 benchmarks/profile_step.py 2>&1 | grep -v Warning | tee "$OUT/profile.txt" | tail -70
bench() {  # workload, extra flags
  name=$(echo "$1" | tr ':' '_')
  timeout 400 python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy \
    --workload "$1" --num-requests 1000 --disable-tqdm ${@:2} --output-json "$OUT/tp_$name.json" 2>&1 \
    | grep -v "^\[bench\]" | tail -12 | tee "$OUT/tp_$name.txt"
}
bench constant:1024:512 --baseline hf --hf-batch-size 128 --hf-num-requests 256
bench splitwise
bench constant:512:1024
