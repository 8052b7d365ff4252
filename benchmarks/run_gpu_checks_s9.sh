#!/bin/bash
# Kernel checks that fit any Hopper GPU (~8 min; an H100 when no H200 comes): the grouped MoE GEMM's TMA
# path against the pointer kernels and the tile sweep at T = 512 / 2048, Mixtral shapes (issue 16), the Hopper decode kernel's GPU test
# (the fp8 default 4/2/64 and the pipeline_pv strict xfail: XPASS = the race fix holds; issue 12) and
# its bandwidth table. Files to $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p $OUT; OUT=$(realpath $OUT); export NANOFLOW_CACHE_DIR=$OUT/cache
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 150 python benchmarks/moe_gpu.py --only tma --json $OUT/moe_tma.json > $OUT/moe_tma.txt 2>&1
echo "moe tma rc=$?"; grep -v Warning $OUT/moe_tma.txt | tail -14
timeout 170 python benchmarks/moe_gpu.py --only sweep --tokens 512,2048 --json $OUT/moe_sweep.json > $OUT/moe_sweep.txt 2>&1
echo "moe sweep rc=$?"; grep -E "T=" $OUT/moe_sweep.txt | cut -c1-90
timeout 140 python -m pytest -q -rxX tests/gpu/test_decode_hopper.py tests/gpu/test_moe_gpu.py > $OUT/test_decode_hopper.txt 2>&1
echo "test_decode_hopper rc=$?"; tail -8 $OUT/test_decode_hopper.txt
OUT=$OUT timeout 120 python benchmarks/decode_hopper_gpu.py --section perf --split-kv 0 \
  --workloads 512:512:2048:16,256:2048:4096:16,1024:512:1024:16 --variants default --fp8-variants default,3/3/80 \
  > $OUT/perf.txt 2>&1
echo "perf rc=$?"; tail -30 $OUT/perf.txt
date -u
