#!/usr/bin/env bash
# dmoe-gateway drains on SIGTERM (real processes: one attention node, one gateway, tiny model).
#  1. With streams in progress on both APIs (held there: the attention node is SIGSTOPped), SIGTERM
#     turns readiness off and closes the HTTP listener and idle keep-alive connections at once;
#     the streams then finish whole (the gRPC one equal to the in-process engine, the HTTP one
#     with every token and [DONE], its connection closed after it), and the gateway exits 0.
#  2. With --drain-seconds 1, a request that never finishes arriving is cut when the drain runs
#     out: the gateway exits within seconds and says what it cut.
set -euo pipefail
bin=$TEST_SRCDIR/dmoe
dmoe=$bin/cli/dmoe
work=$TEST_TMPDIR

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
fail() {
  echo "FAILED: $*"
  for f in "$work"/*.err; do [ -e "$f" ] && { echo "--- $f (last 20 lines)"; tail -20 "$f"; }; done
  exit 1
}
expect() {  # expect WHAT WANT GOT
  [ "$2" = "$3" ] || fail "$1: expected $2, got $3"
  echo "ok $1"
}
ready_field() {  # ready_field FILE KEY: waits (60 s at most) for FILE, prints its KEY
  for _ in $(seq 1 600); do
    [ -s "$1" ] && { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; return; }
    sleep 0.1
  done
  fail "$1 was not written in 60 s"
}
metric() {  # metric URL NAME: the value of the sample NAME (0 when absent)
  curl -sf --max-time 5 "$1" | awk -v n="$2" '$1 == n {v = $2} END {printf "%d\n", v}'
}

"$dmoe" make-tiny-model "$work/model" --preset tiny --seed 0 > /dev/null
"$bin/attention_service/dmoe-attention" --model "$work/model" --ready-file "$work/attention.json" \
  2> "$work/attention.err" &
node_pid=$!
pids+=("$node_pid")
node=$(ready_field "$work/attention.json" grpc)

start_gateway() {  # start_gateway NAME FLAGS...: sets gw_pid, gw_grpc, gw_http, gw_metrics
  local name=$1
  shift
  "$bin/gateway/dmoe-gateway" --attention "$node" --model "$work/model" \
    --ready-file "$work/$name.json" "$@" 2> "$work/$name.err" &
  gw_pid=$!
  pids+=("$gw_pid")
  gw_grpc=$(ready_field "$work/$name.json" grpc)
  gw_http=$(ready_field "$work/$name.json" http)
  gw_metrics=$(ready_field "$work/$name.json" metrics)
}
wait_exit() {  # wait_exit PID SECONDS: sets rc to PID's exit status, or "running" after SECONDS
  rc=running
  for _ in $(seq 1 $(($2 * 10))); do
    if ! kill -0 "$1" 2>/dev/null; then
      rc=0
      wait "$1" || rc=$?
      return
    fi
    sleep 0.1
  done
}

# 1. Streams in progress finish.
start_gateway gw1 --drain-seconds 60
want=$("$dmoe" generate --model "$work/model" --tokens 5,6,7,8 --max-tokens 40 --temperature 0 --print-token-ids)
# The client below makes its idle connections, SIGSTOPs the node and says so in $work/stopped;
# then the gRPC stream starts (held by the stopped node).
python3 - "$gw_http" "$gw_pid" "$node_pid" "$gw_metrics" "$work/stopped" > "$work/http.out" 2> "$work/http.err" <<'PY' &
import json, os, signal, socket, sys, time, urllib.request
host, port = sys.argv[1].rsplit(":", 1)
gw, node, metrics = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def connect():
    return socket.create_connection((host, int(port)), timeout=10)

def active_streams():
    for line in urllib.request.urlopen("http://%s/metrics" % metrics, timeout=5).read().decode().splitlines():
        if line.startswith("dmoe_gateway_active_streams "):
            return float(line.split()[1])
    return 0.0

# Idle keep-alive connections: one request answered, then nothing. One ran a completion (its
# connection then waits differently, reading for a disconnect).
idle = connect()
idle.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
assert idle.recv(4096).startswith(b"HTTP/1.1 200"), "GET /version"
done = json.dumps({"prompt": [5, 6], "max_tokens": 2, "temperature": 0}).encode()
idle2 = connect()
idle2.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(done) + done)
reply = b""
while b'"usage"' not in reply:
    chunk = idle2.recv(65536)
    assert chunk, "the completion's connection closed"
    reply += chunk
assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
os.kill(node, signal.SIGSTOP)
open(sys.argv[5], "w").close()
# A stream, held by the stopped node.
body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0, "stream": True,
                   "ignore_eos": True, "logprobs": 0}).encode()
stream = connect()
stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
deadline = time.time() + 30
while active_streams() < 2:  # this one and the gRPC one
    assert time.time() < deadline, "the two streams did not start in 30 s"
    time.sleep(0.05)
os.kill(gw, signal.SIGTERM)
# The idle connection is closed, and new ones are refused, while the streams are still held.
idle.settimeout(10)
idle2.settimeout(10)
print("idle connection closed:", idle.recv(4096) == b"" and idle2.recv(4096) == b"")
refused = False
for _ in range(100):
    try:
        connect().close()
    except ConnectionRefusedError:
        refused = True
        break
    time.sleep(0.05)
print("new connections refused:", refused)
os.kill(node, signal.SIGCONT)
stream.settimeout(30)
data = b""
while True:
    chunk = stream.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
events = [l[6:] for l in rest.decode().splitlines() if l.startswith("data: ")]
ids = []
for e in events[:-1]:
    for c in json.loads(e)["choices"]:
        ids += [t.split(":")[1] for t in (c.get("logprobs") or {}).get("tokens") or []]
print("status:", head.split(b"\r\n")[0].decode())
print("last event:", events[-1] if events else "none")
print("ids:", ",".join(ids))
PY
http_pid=$!
pids+=("$http_pid")
for _ in $(seq 1 300); do [ -e "$work/stopped" ] && break; sleep 0.1; done
[ -e "$work/stopped" ] || fail "the HTTP client did not set up its connections in 30 s"
"$dmoe" generate --target "$gw_grpc" --tokens 5,6,7,8 --max-tokens 40 --temperature 0 \
  --print-token-ids > "$work/grpc.out" 2> "$work/grpc.err" &
grpc_pid=$!
pids+=("$grpc_pid")
wait_exit "$http_pid" 60
expect "the HTTP client" 0 "$rc"
cat "$work/http.out"
expect "idle keep-alive connection closed at SIGTERM" "idle connection closed: True" "$(sed -n 1p "$work/http.out")"
expect "new HTTP connections refused while draining" "new connections refused: True" "$(sed -n 2p "$work/http.out")"
expect "the HTTP stream in progress finished" "status: HTTP/1.1 200 OK" "$(sed -n 3p "$work/http.out")"
expect "  with [DONE]" "last event: [DONE]" "$(sed -n 4p "$work/http.out")"
expect "  every token, the engine's" "ids: $want" "$(sed -n 5p "$work/http.out")"
wait_exit "$grpc_pid" 60
expect "the gRPC stream in progress finished" 0 "$rc"
expect "  the engine's tokens" "$want" "$(cat "$work/grpc.out")"
wait_exit "$gw_pid" 30
expect "the gateway exits 0 once they are done" 0 "$rc"
grep -q "draining, up to 60 s" "$work/gw1.err" || fail "no drain log line"
grep -q "cut" "$work/gw1.err" && fail "the drain cut something: $(grep cut "$work/gw1.err")"

# 2. The drain's deadline: a request whose headers never end is cut after --drain-seconds.
start_gateway gw2 --drain-seconds 1
python3 - "$gw_http" "$gw_pid" > "$work/cut.out" 2> "$work/cut.err" <<'PY'
import os, signal, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
time.sleep(0.3)
t = time.time()
os.kill(int(sys.argv[2]), signal.SIGTERM)
s.settimeout(20)
try:
    got = s.recv(4096)
except ConnectionResetError:
    got = b""
print("cut after %.1f s, %d bytes" % (time.time() - t, len(got)))
PY
cat "$work/cut.out"
cut_s=$(sed -n 's/^cut after \([0-9.]*\) s.*/\1/p' "$work/cut.out")
python3 -c "import sys; sys.exit(0 if 0.8 <= float(sys.argv[1]) <= 10 else 1)" "$cut_s" ||
  fail "the unfinished request was cut after $cut_s s (want about 1 s)"
echo "ok the unfinished request was cut when the 1 s drain ran out"
wait_exit "$gw_pid" 10
expect "the gateway exits 0 after its drain" 0 "$rc"
grep -q "drain over: 1 HTTP connection(s) still open are cut" "$work/gw2.err" ||
  fail "the gateway did not say what it cut: $(tail -3 "$work/gw2.err")"
echo "ok it says what it cut"
echo "PASS"
