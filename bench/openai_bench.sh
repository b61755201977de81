#!/usr/bin/env bash
# `dmoe bench` on the tiny-demo model against `dmoe up` (router, 2 expert shards over UCX, an
# attention node, the gateway: separate processes) and `dmoe serve` (one process), each through the
# OpenAI-compatible HTTP API and through the gRPC API, at concurrency 1, 8 and 32, in one run.
# Prints one table; the HTTP front's cost per streamed token is the ITL p50 of HTTP minus gRPC on
# the same server and load (measured back to back, so paired).
# Usage: bazel build //cli:dmoe //router:dmoe-router //expert_service:dmoe-expert \
#          //attention_service:dmoe-attention //gateway:dmoe-gateway && bash bench/openai_bench.sh
# Env: PROMPTS (per run; default 4 x concurrency, at least 16), INPUT_LEN (64), OUTPUT_LEN (64),
#      CONCURRENCY ("1 8 32").
set -euo pipefail
cd "$(dirname "$0")/.."
dmoe=bazel-bin/cli/dmoe
work=$(mktemp -d)
model=$work/model
"$dmoe" make-tiny-model "$model" --preset tiny-demo --seed 0 > /dev/null
up_state=$work/up.json
serve_pid=
cleanup() {
  "$dmoe" down --state-file "$up_state" > /dev/null 2>&1 || true
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$dmoe" up --model "$model" --experts 2 --attention 1 --state-file "$up_state" \
  --log-dir "$work/logs" > "$work/up.out"
"$dmoe" serve --model "$model" > "$work/serve.out" 2> "$work/serve.err" &
serve_pid=$!
for _ in $(seq 600); do grep -q '^openai: ' "$work/serve.out" && break; sleep 0.1; done
in=${INPUT_LEN:-64} out=${OUTPUT_LEN:-64}
printf '%-6s %4s %-7s %9s %10s %10s %10s %10s %10s\n' target conc api 'req/s' 'out tok/s' \
  'TTFT p50' 'TPOT p50' 'ITL p50' 'ITL p99'
for target in up serve; do
  o=$work/$target.out
  [ "$target" = up ] || o=$work/serve.out
  url=$(sed -n 's/^openai: //p' "$o")
  grpc=$(sed -n 's/^gateway: //p' "$o")
  for c in ${CONCURRENCY:-1 8 32}; do
    n=${PROMPTS:-$((4 * c > 16 ? 4 * c : 16))}
    for api in http grpc; do
      args=(--url "$url")
      [ "$api" = grpc ] && args=(--backend grpc --target "$grpc")
      "$dmoe" bench "${args[@]}" --num-prompts "$n" --input-len "$in" --output-len "$out" \
        --max-concurrency "$c" --warmup 4 --seed 1 --quiet --json "$work/r.json" > /dev/null
      python3 - "$work/r.json" "$target" "$c" "$api" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print("%-6s %4s %-7s %9.2f %10.1f %10.2f %10.3f %10.3f %10.3f" % (sys.argv[2], sys.argv[3], sys.argv[4],
      j["request_throughput"], j["output_throughput"], j["ttft_ms"]["p50"], j["tpot_ms"]["p50"],
      j["itl_ms"]["p50"], j["itl_ms"]["p99"]) + ("  failed=%d" % j["failed"] if j["failed"] else ""))
PY
    done
  done
done
echo "(times in ms; HTTP front's cost per streamed token = ITL p50 http - grpc at the same row pair)"
