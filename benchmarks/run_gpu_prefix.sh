#!/usr/bin/env bash
# Issue 15 (KV reuse) on one GPU: run one case per call (each fits the 10-minute limit of a device call).
#   bash benchmarks/run_gpu_prefix.sh check          # tests/gpu/test_prefix_gpu.py (greedy parity on CUDA), copy bandwidth
#   bash benchmarks/run_gpu_prefix.sh multi-round    # prefill computed and throughput, caching on (+host tier) vs off
#   bash benchmarks/run_gpu_prefix.sh shared-prefix  # 1024 shared + 128 unique + 128 out, 2000 requests, on vs off
#   bash benchmarks/run_gpu_prefix.sh host-tier      # single-round sharegpt, host tier on vs off (cost)
#   bash benchmarks/run_gpu_prefix.sh serve          # bench serve, multi-round, server with caching + host tier
# Results go to $OUT (JSON + the printed tables).
set -uo pipefail
CASE=${1:?usage: run_gpu_prefix.sh check|multi-round|shared-prefix|host-tier|serve}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d .carry/traces ] && export NANOFLOW_TRACE_DIR=$PWD/.carry/traces
BENCH=(python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --disable-tqdm)
case "$CASE" in
  check)
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_prefix_gpu.py 2>&1 | tee "$OUT/prefix_gpu_tests.txt" | tail -3
    python3 benchmarks/host_tier_bandwidth.py 2>&1 | grep -v Warning | tee "$OUT/host_tier_bandwidth.txt" ;;
  multi-round)
    "${BENCH[@]}" --workload multi-round:sharegpt:4 --num-requests 500 --kv-host-gb 64 --compare-prefix-caching \
      --output-json "$OUT/prefix_multi_round.json" 2>&1 | grep -v Warning | tee "$OUT/prefix_multi_round.txt" | tail -16 ;;
  shared-prefix)
    "${BENCH[@]}" --workload shared-prefix:1024:128:128 --num-requests 2000 --compare-prefix-caching \
      --output-json "$OUT/prefix_shared_prefix.json" 2>&1 | grep -v Warning | tee "$OUT/prefix_shared_prefix.txt" | tail -16 ;;
  host-tier)
    "${BENCH[@]}" --workload sharegpt --num-requests 2000 --kv-host-gb 64 --compare-host-tier \
      --output-json "$OUT/prefix_host_tier_single_round.json" 2>&1 | grep -v Warning \
      | tee "$OUT/prefix_host_tier_single_round.txt" | tail -16 ;;
  serve)
    python3 -m nanoflow.entrypoints.cli serve --model llama-3-8b --load-format dummy --kv-host-gb 64 --port 8011 \
      > "$OUT/server.log" 2>&1 &
    SERVER=$!
    for i in $(seq 1 240); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break; sleep 1; done
    python3 -m nanoflow.entrypoints.cli bench serve --base-url http://127.0.0.1:8011 --workload multi-round:sharegpt:4 \
      --num-requests 200 --request-rate 4 --output-json "$OUT/prefix_serve_multi_round.json" 2>&1 | tail -40 \
      | tee "$OUT/prefix_serve_multi_round.txt"
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8011/metrics').read().decode())" \
      | grep -E "^nanoflow:(prefix_cache|kv_cache_usage)" | tee -a "$OUT/prefix_serve_multi_round.txt"
    kill -INT $SERVER; wait $SERVER ;;
  *) echo "unknown case $CASE" >&2; exit 2 ;;
esac
