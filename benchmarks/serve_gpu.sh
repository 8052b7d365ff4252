#!/usr/bin/env bash
# Serving benchmark on the GPU: start `nanoflow serve` (llama-3-8b dummy), Poisson arrivals of the
# splitwise trace at RATE req/s, then the offline figure for the same requests in the same call.
# Needs the server's wheels carried in .whl (see the device README).
set -uo pipefail
RATE=${RATE:-20}; N=${N:-600}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NANOFLOW_TRACE_DIR=$PWD/.carry/traces
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m nanoflow.entrypoints.cli serve --model llama-3-8b --load-format dummy --port 8011 > "$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 1 120); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null && break; sleep 1; done
python3 -m nanoflow.entrypoints.cli bench serve --base-url http://127.0.0.1:8011 --workload splitwise \
  --num-requests "$N" --request-rate "$RATE" --output-json "$OUT/serve.json" 2>&1 | tail -40 | tee "$OUT/serve.txt"
python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8011/metrics').read().decode())" | grep -E "^nanoflow:(request_success_total|kv_cache_usage)" | head
kill -INT $SERVER; wait $SERVER
python3 -m nanoflow.entrypoints.cli bench throughput --model llama-3-8b --load-format dummy --workload splitwise \
  --num-requests "$N" --disable-tqdm --output-json "$OUT/offline_same.json" 2>&1 | grep -v "^\[bench\]" | tail -8
