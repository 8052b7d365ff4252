#!/bin/bash
# Issues 12 and 13 on an H200 (~7 min): the Hopper decode kernel's GPU test (the fp8 default 4/2/64 has not
# passed it on a GPU yet), its bandwidth on the whole device and 64 / 48 / 40-SM partitions (the H200
# targets: 4.1 / 3.7 / 3.3 / 3.0 TB/s), overlap-split against sequential at 600 requests of 512:1024 (on an
# H200 the decode GEMMs turn compute-bound: the regime where overlap can win), and FP8 KV end to end.
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=${NANOFLOW_TRACE_DIR:-$PWD/.carry/traces}
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 100 python -m pytest -q -x tests/gpu/test_decode_hopper.py > $OUT/test_decode_hopper.txt 2>&1
echo "test_decode_hopper rc=$?"; tail -6 $OUT/test_decode_hopper.txt
OUT=$OUT timeout 120 python benchmarks/decode_hopper_gpu.py --section perf --split-kv 0 \
  --workloads 512:512:2048:16,256:2048:4096:16,1024:512:1024:16 --variants default --fp8-variants default,3/3/80 \
  > $OUT/perf.txt 2>&1
echo "perf rc=$?"; tail -30 $OUT/perf.txt
B="python -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --workload constant:512:1024 --num-requests 600 --disable-tqdm"
timeout 300 $B --plan overlap-split --compare sequential --output-json $OUT/bf16_split.json > $OUT/bf16_split.txt 2>&1
echo "bf16 split rc=$?"; sed -n '/^== nanoflow bench throughput/,$p' $OUT/bf16_split.txt | tail -30
timeout 150 $B --kv-cache-dtype fp8 --output-json $OUT/fp8_seq.json > $OUT/fp8_seq.txt 2>&1
echo "fp8 seq rc=$?"; sed -n '/^== nanoflow bench throughput/,$p' $OUT/fp8_seq.txt | tail -14
date -u
