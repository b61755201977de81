#!/usr/bin/env bash
# `dmoe bench` on the tiny-demo model against `dmoe up` (router, 2 expert shards over UCX, an
# attention node, the gateway: separate processes) and `dmoe serve` (one process), each through the
# OpenAI-compatible HTTP API and through the gRPC API, at concurrency 1, 8 and 32, in one run.
# Prints one table. The HTTP front's cost per streamed token, two ways: the ITL p50 of HTTP minus
# gRPC on the same server and load (back to back, so paired; noisy on 2 shared cores), and the
# dmoe-gateway process's CPU time per streamed token (`up` rows: utime+stime from /proc, over the
# run's output tokens) — the front's own work, whatever the machine's load.
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
gw_pid=$(python3 -c "import json,sys; print([p['pid'] for p in json.load(open(sys.argv[1]))['processes'] if p['role']=='gateway'][0])" "$up_state")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
printf '%-6s %4s %-5s %8s %10s %9s %9s %9s %9s %13s\n' target conc api 'req/s' 'out tok/s' \
  'TTFT p50' 'TPOT p50' 'ITL p50' 'ITL p99' 'gw CPU us/tok'
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
      before=$(cpu_ticks "$gw_pid")
      "$dmoe" bench "${args[@]}" --num-prompts "$n" --input-len "$in" --output-len "$out" \
        --max-concurrency "$c" --warmup 0 --seed 1 --quiet --json "$work/r.json" > /dev/null
      ticks=$(($(cpu_ticks "$gw_pid") - before))
      [ "$target" = up ] || ticks=-1
      python3 - "$work/r.json" "$target" "$c" "$api" "$ticks" "$(getconf CLK_TCK)" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
ticks, hz = int(sys.argv[5]), int(sys.argv[6])
tokens = j["output_throughput"] * j["duration_s"]
cpu = "%13.1f" % (ticks / hz / tokens * 1e6) if ticks >= 0 and tokens > 0 else "%13s" % "-"
print("%-6s %4s %-5s %8.2f %10.1f %9.2f %9.3f %9.3f %9.3f %s" % (sys.argv[2], sys.argv[3], sys.argv[4],
      j["request_throughput"], j["output_throughput"], j["ttft_ms"]["p50"], j["tpot_ms"]["p50"],
      j["itl_ms"]["p50"], j["itl_ms"]["p99"], cpu) + ("  failed=%d" % j["failed"] if j["failed"] else ""))
PY
    done
  done
done
echo "(times in ms; the HTTP front's cost per streamed token: ITL p50 http - grpc in a row pair, and gw CPU us/tok http - grpc)"
