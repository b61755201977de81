#!/usr/bin/env bash
# The HTTP front holds 1,000 concurrent streaming connections whose clients read slowly (one
# event loop, no thread per stream) and still answers new requests; prints the gateway's threads
# and memory at idle and with the streams open. Runs against `dmoe serve` (the same HTTP front as
# dmoe-gateway). N can be changed with OPENAI_SCALE_STREAMS.
set -euo pipefail
bin=$TEST_SRCDIR/dmoe
dmoe=$bin/cli/dmoe
work=$TEST_TMPDIR
n=${OPENAI_SCALE_STREAMS:-1000}
"$dmoe" make-tiny-model "$work/model" --preset tiny-demo --seed 0 > /dev/null
"$dmoe" serve --model "$work/model" --kv-cache-mib 64 > "$work/serve.out" 2> "$work/serve.err" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q '^openai: ' "$work/serve.out" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.err"; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/^openai: http:\/\/\(.*\)\/v1$/http:\/\/\1/p' "$work/serve.out")
[ -n "$url" ] || { echo "no openai: line"; cat "$work/serve.err"; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 8192 2>/dev/null || true
timeout 300 node "$bin/tests/openai_slow_clients.mjs" "$url" "$n" "$pid"
kill -0 "$pid" || { echo "the server died"; exit 1; }
echo "PASS"
