#!/usr/bin/env bash
# dmoe up brings up experts + attention + gateway as separate processes; dmoe generate --target
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
[ "$(echo "$pids" | wc -w)" -eq 6 ] || { echo "expected 6 processes"; exit 1; }
cleanup() { "$dmoe" down --state-file "$state" >/dev/null 2>&1 || true; }
trap cleanup EXIT
via=$("$dmoe" generate --target "$gateway" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
local=$("$dmoe" generate --model "$work/model" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
echo "through the cluster: $via"
echo "in-process:          $local"
[ "$via" = "$local" ] || { echo "outputs differ"; exit 1; }
# A second `up` on the same state file is refused.
if "$dmoe" up --model "$work/model" --state-file "$state" --bin-dir "$bin" 2>"$work/err"; then
  echo "second up was not refused"; exit 1
fi
grep -q "exists" "$work/err"
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
for _ in $(seq 1 200); do grep -q '^gateway: ' "$work/serve.out" && break; sleep 0.05; done
served=$(sed -n 's/^gateway: //p' "$work/serve.out")
[ -n "$served" ] || { cat "$work/serve.err"; echo "dmoe serve did not start"; exit 1; }
one=$("$dmoe" generate --target "$served" --tokens 5,6,7,8 --max-tokens 12 --temperature 0 --print-token-ids)
echo "dmoe serve:          $one"
[ "$one" = "$local" ] || { echo "dmoe serve differs"; exit 1; }
kill "$serve_pid"
wait "$serve_pid" || true
trap - EXIT
echo "dmoe serve: OK"
