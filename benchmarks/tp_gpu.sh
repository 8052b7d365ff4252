#!/usr/bin/env bash
# Tensor parallelism (issue 17) on a 4-GPU machine: checks, then the criteria. Each section
# fits one 10-minute device call: run it as `bash benchmarks/tp_gpu.sh SECTION` (check | 70b-constant
# | 70b-splitwise | 70b-tune | 8b). Logs and JSON go to $OUT; benchmarks/tp_summary.py prints the table.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NF="python3 -m nanoflow.entrypoints.cli"
BENCH70="$NF bench throughput --model llama-3-70b --load-format dummy --tensor-parallel-size 4 --num-requests 1000"
case "${1:-check}" in
  check)  # TP=2 vs TP=1 tokens (tests/gpu/test_tp_gpu.py), plans on the 70B dummy, step time per plan, NCCL CTA limit
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tp_gpu.py 2>&1 | tee "$OUT/tp_tests.txt" | tail -3
    timeout 380 python3 benchmarks/tp_gpu_check.py --tp 4 --model llama-3-70b --json "$OUT/tp_check.json" 2>&1 \
      | grep -v Warning | tee "$OUT/tp_check.txt" ;;
  70b-constant)  # >= 70% of optimal; overlap plan >= 1.15x sequential in the same run
    timeout 590 $BENCH70 --workload constant:1024:512 --plan tp-nano-4 --compare sequential \
      --output-json "$OUT/tp4_llama-3-70b_constant_1024_512.json" 2>&1 | grep -v Warning | tail -12 ;;
  70b-splitwise)
    timeout 590 $BENCH70 --workload splitwise --plan tp-nano-4 --compare sequential \
      --output-json "$OUT/tp4_llama-3-70b_splitwise.json" 2>&1 | grep -v Warning | tail -12 ;;
  70b-tune)  # the searched TP plan (collectives profiled), then the same run with it
    timeout 300 $NF tune --model llama-3-70b --load-format dummy --tensor-parallel-size 4 --quick \
      --workload constant:1024:512 --no-progress --output "$OUT/auto_tp4_llama-3-70b.json" 2>&1 \
      | grep -v Warning | tee "$OUT/tune_tp4_llama-3-70b.txt" | tail -22
    timeout 290 $BENCH70 --workload constant:1024:512 --plan "$OUT/auto_tp4_llama-3-70b.json" --compare sequential \
      --output-json "$OUT/tp4_llama-3-70b_constant_1024_512_auto.json" 2>&1 | grep -v Warning | tail -12 ;;
  8b)  # tokens/s per GPU: TP=2 on GPUs 0,1 against one TP=1 engine on GPU 0
    CUDA_VISIBLE_DEVICES=0,1 timeout 290 $NF bench throughput --model llama-3-8b --load-format dummy \
      --tensor-parallel-size 2 --workload constant:1024:512 --num-requests 1000 \
      --output-json "$OUT/tp2_llama-3-8b_constant_1024_512.json" 2>&1 | grep -v Warning | tail -12
    CUDA_VISIBLE_DEVICES=0 timeout 290 $NF bench throughput --model llama-3-8b --load-format dummy \
      --workload constant:1024:512 --num-requests 1000 \
      --output-json "$OUT/tp1_llama-3-8b_constant_1024_512.json" 2>&1 | grep -v Warning | tail -12 ;;
  *) echo "unknown section $1" >&2; exit 2 ;;
esac
python3 benchmarks/tp_summary.py "$OUT"/tp[0-9]_*.json 2>/dev/null || true
