#!/usr/bin/env bash
# Round 11 (green-context SM partitions): tune --quick on two model shapes (the search now also
# validates each budgeted candidate on a green-context split), and the measured Gantt chart of
# overlap-split on a decode-only batch.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for model in llama-3-8b qwen2-7b; do
  timeout 240 python3 -m nanoflow.entrypoints.cli tune --model "$model" --load-format dummy --quick \
    --workload constant:512:1024 --no-store --no-progress --output "$OUT/auto_$model.json" 2>&1 \
    | grep -v Warning | tee "$OUT/tune_$model.txt" | tail -22
done
timeout 120 python3 -m nanoflow.entrypoints.cli plan show overlap-split --model llama-3-8b --load-format dummy \
  --batch-tokens 572 --decode-fraction 1.0 --context 1200 --out "$OUT/plan_show_overlap_split.png" 2>&1 \
  | grep -v Warning | tail -5
