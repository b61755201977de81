#!/usr/bin/env bash
# dmoe up brings up router + experts + attention + gateway as separate processes; dmoe generate --target
# through it equals the in-process engine; dmoe down leaves none of those processes running.
set -euo pipefail
bin=$TEST_SRCDIR/dmoe
dmoe=$bin/cli/dmoe
work=$TEST_TMPDIR
state=$work/up.json
"$dmoe" up --model "$work/model" --experts 3 --attention 2 --expert-replicas 2 --state-file "$state" \
  --log-dir "$work/logs" --bin-dir "$bin" --wire-dtype f32 > "$work/up.out"
cat "$work/up.out"
gateway=$(sed -n 's/^gateway: //p' "$work/up.out")
[ -n "$gateway" ] || { echo "no gateway line"; exit 1; }
pids=$(grep -o '"pid": [0-9]*' "$state" | grep -o '[0-9]*')
[ "$(echo "$pids" | wc -w)" -eq 7 ] || { echo "expected 7 processes"; exit 1; }
cleanup() { "$dmoe" down --state-file "$state" >/dev/null 2>&1 || true; }
trap cleanup EXIT
via=$("$dmoe" generate --target "$gateway" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
local=$("$dmoe" generate --model "$work/model" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
echo "through the cluster: $via"
echo "in-process:          $local"
[ "$via" = "$local" ] || { echo "outputs differ"; exit 1; }
# The same through the OpenAI-compatible HTTP API (no tokenizer here: logprobs name the ids).
openai=$(sed -n 's/^openai: //p' "$work/up.out")
curl -sf "$openai/completions" -H 'Content-Type: application/json' \
  -d '{"prompt":[5,6,7,8],"max_tokens":12,"temperature":0,"logprobs":0}' > "$work/openai.json"
http_ids=$(python3 -c "import json,sys; print(','.join(t.split(':')[1] for t in json.load(open(sys.argv[1]))['choices'][0]['logprobs']['tokens']))" "$work/openai.json")
echo "through HTTP:        $http_ids"
[ "$http_ids" = "$local" ] || { echo "the OpenAI API differs"; exit 1; }
# Every service's /metrics answers, and counts what just happened (the services refresh their
# counters every 500 ms: scrape until they show the request, for at most 30 s).
metric() {  # metric URL NAME: the sum of the samples whose name (and labels) start with NAME
  curl -sf "$1" | awk -v n="$2" 'index($0, n) == 1 {s += $2} END {printf "%d\n", s}'
}
scrape_all() {
  generated=0 round_trips=0 expert_tokens=0 gateway_ok=0 services=0 router_version=0 steps=0 batches=0
  for url in $(grep -o '"metrics": "[^"]*"' "$state" | sed 's/"metrics": "\(.*\)"/http:\/\/\1\/metrics/'); do
    curl -sf "$url" > "$work/scrape" || { echo "cannot scrape $url"; exit 1; }
    grep -q '^# TYPE dmoe_' "$work/scrape" || { echo "no dmoe metrics at $url"; exit 1; }
    services=$((services + 1))
    if grep -q '^dmoe_router_' "$work/scrape"; then
      router_version=$(metric "$url" dmoe_router_placement_version)
      grep -q '^dmoe_router_oldest_heartbeat_age_seconds' "$work/scrape"
      [ "$(metric "$url" 'dmoe_router_nodes{role="attention"}')" -eq 2 ]
    elif grep -q '^dmoe_gateway_' "$work/scrape"; then
      gateway_ok=$(metric "$url" 'dmoe_gateway_requests_total{outcome="ok"}')
      # It found both attention nodes through the router (dmoe up gives it no --attention list).
      [ "$(metric "$url" 'dmoe_gateway_attention_nodes{state="healthy"}')" -eq 2 ]
      [ "$(metric "$url" dmoe_gateway_time_to_first_token_seconds_count)" -ge 1 ]
    elif grep -q '^dmoe_attention_' "$work/scrape"; then
      # The request went to one of the attention nodes.
      generated=$((generated + $(metric "$url" dmoe_attention_generated_tokens_total)))
      round_trips=$((round_trips + $(metric "$url" dmoe_transport_round_trip_seconds_count)))
      steps=$((steps + $(metric "$url" dmoe_attention_step_seconds_count)))
      [ "$(metric "$url" dmoe_attention_kv_blocks_total)" -gt 0 ]
      grep -q '^dmoe_attention_expert_tokens_total{' "$work/scrape"
      grep -q '^dmoe_attention_time_to_first_token_seconds_bucket' "$work/scrape"
      [ "$(metric "$url" dmoe_attention_placement_version)" -ge 1 ]
      grep -q '^dmoe_attention_heartbeat_age_seconds' "$work/scrape"
      # No expert is down: nothing is stalled now.
      [ "$(metric "$url" dmoe_attention_stalled_sequences)" -eq 0 ]
      [ "$(metric "$url" dmoe_attention_current_stall_seconds)" -eq 0 ]
    else
      expert_tokens=$((expert_tokens + $(metric "$url" dmoe_expert_tokens_total)))
      batches=$((batches + $(metric "$url" dmoe_expert_batch_seconds_count)))
      grep -q '^dmoe_expert_expert_tokens_total{' "$work/scrape"
      [ "$(metric "$url" dmoe_expert_placement_version)" -ge 1 ]
      grep -q '^dmoe_expert_heartbeat_age_seconds' "$work/scrape"
    fi
  done
}
shown() {
  [ "$services" -eq 7 ] && [ "$router_version" -ge 1 ] && [ "$gateway_ok" -ge 1 ] && [ "$generated" -ge 12 ] &&
    [ "$round_trips" -gt 0 ] && [ "$expert_tokens" -gt 0 ] && [ "$steps" -ge 12 ] && [ "$batches" -gt 0 ]
}
for _ in $(seq 1 150); do
  scrape_all
  shown && break
  sleep 0.2
done
echo "scraped: router placement version=$router_version, gateway ok=$gateway_ok, attention generated=$generated round trips=$round_trips steps=$steps, experts tokens=$expert_tokens batches=$batches"
shown || { echo "metrics do not show the request (30 s)"; exit 1; }
echo "metrics scraped from $(grep -c '"metrics"' "$state") services"
# A second `up` on the same state file is refused.
if "$dmoe" up --model "$work/model" --state-file "$state" --bin-dir "$bin" 2>"$work/err"; then
  echo "second up was not refused"; exit 1
fi
grep -q "exists" "$work/err"
# Graceful stop: SIGTERM to the attention nodes mid-stream; the stream still completes.
# The stream is running once the gateway has seen its first token (its time-to-first-token count
# grows at once, unlike the counters refreshed every 500 ms).
gw_metrics=$(grep -o '"metrics": "[^"]*"' "$state" | sed 's/"metrics": "\(.*\)"/http:\/\/\1\/metrics/' |
  while read -r url; do curl -sf "$url" | grep '^dmoe_gateway_' >/dev/null && echo "$url"; done)
first_tokens=$(metric "$gw_metrics" dmoe_gateway_time_to_first_token_seconds_count)
"$dmoe" generate --target "$gateway" --tokens 9,8,7 --max-tokens 400 --temperature 0 --ignore-eos \
  --print-token-ids > "$work/long.out" &
long=$!
for _ in $(seq 1 3000); do
  [ "$(metric "$gw_metrics" dmoe_gateway_time_to_first_token_seconds_count)" -gt "$first_tokens" ] && break
  sleep 0.01
done
[ "$(metric "$gw_metrics" dmoe_gateway_time_to_first_token_seconds_count)" -gt "$first_tokens" ] ||
  { echo "the long stream did not start in 30 s"; exit 1; }
for p in $(python3 -c "import json,sys; print(' '.join(str(p['pid']) for p in json.load(open(sys.argv[1]))['processes'] if p['role']=='attention'))" "$state"); do
  kill -TERM "$p"
done
wait "$long" || { echo "the stream failed during the graceful stop"; exit 1; }
[ "$(tr ',' '\n' < "$work/long.out" | grep -c .)" -eq 400 ] || { echo "the stream was cut short"; exit 1; }
echo "graceful stop: the running stream completed (400 tokens)"
"$dmoe" down --state-file "$state"
trap - EXIT
for p in $pids; do
  if [ -e "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat")" != "Z" ]; then
    echo "process $p is still running after dmoe down"; exit 1
  fi
done
[ ! -e "$state" ] || { echo "state file left behind"; exit 1; }
echo "dmoe up / generate / down: OK"
# dmoe serve: the same answer from one process.
"$dmoe" serve --model "$work/model" > "$work/serve.out" 2> "$work/serve.err" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 1200); do grep -q '^gateway: ' "$work/serve.out" && break; sleep 0.05; done
served=$(sed -n 's/^gateway: //p' "$work/serve.out")
[ -n "$served" ] || { cat "$work/serve.err"; echo "dmoe serve did not start"; exit 1; }
one=$("$dmoe" generate --target "$served" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
echo "dmoe serve:          $one"
[ "$one" = "$local" ] || { echo "dmoe serve differs"; exit 1; }
kill "$serve_pid"
wait "$serve_pid" || true
trap - EXIT
echo "dmoe serve: OK"
# 8-bit weights and an 8-bit KV cache serve through the same path (accuracy: bench/quant_bench).
"$dmoe" serve --model "$work/model" --kv-cache-dtype fp8_e4m3 --weight-dtype int8 \
  --expert-dtype fp8 > "$work/serve8.out" 2> "$work/serve8.err" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q '^gateway: ' "$work/serve8.out" && break; sleep 0.05; done
served=$(sed -n 's/^gateway: //p' "$work/serve8.out")
[ -n "$served" ] || { cat "$work/serve8.err"; echo "dmoe serve (8-bit) did not start"; exit 1; }
eight=$("$dmoe" generate --target "$served" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
echo "dmoe serve, 8-bit:   $eight"
[ "$(echo "$eight" | tr ',' '\n' | grep -c .)" -eq 12 ] || { echo "8-bit serving returned no 12 tokens"; exit 1; }
kill "$serve_pid"
wait "$serve_pid" || true
trap - EXIT
echo "dmoe serve 8-bit: OK"
