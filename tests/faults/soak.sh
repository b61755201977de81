#!/usr/bin/env bash
# Soak: 256 concurrent streams through the gateway of a local cluster (`dmoe up`: router, 2 expert
# shards with 2 replicas of every expert, an attention node, the gateway) for SOAK_SECONDS
# (default 60; the long run is 600: `bazel run //tests/faults:soak_long`), sampling the resident
# memory of every process each second. Prints, per process, the RSS at warm-up's end and at the
# end and its slope (least squares over the samples after the first quarter, MiB/min), the
# requests completed and failed. Fails on any failed request or a process that died.
set -euo pipefail
bin=${TEST_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin}/dmoe
[ -x "$bin/cli/dmoe" ] || bin=$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin
dmoe=$bin/cli/dmoe
seconds=${1:-${SOAK_SECONDS:-60}}
work=${TEST_TMPDIR:-$(mktemp -d)}
state=$work/soak_up.json
"$dmoe" up --model "$work/model" --experts 2 --attention 1 --expert-replicas 2 \
  --state-file "$state" --log-dir "$work/logs" --bin-dir "$bin" > "$work/up.out"
cleanup() { kill "$sampler" 2>/dev/null || true; "$dmoe" down --state-file "$state" >/dev/null 2>&1 || true; }
sampler=
trap cleanup EXIT
url=$(sed -n 's/^openai: //p' "$work/up.out")
[ -n "$url" ] || { echo "no openai line"; cat "$work/up.out"; exit 1; }
# role:pid per process, from the state file.
procs=$(python3 -c '
import json, sys
for p in json.load(open(sys.argv[1]))["processes"]:
    print("%s:%d" % (p["role"], p["pid"]))' "$state")
# One line per second: elapsed seconds, then VmRSS (KiB) of each process (0 once it is gone).
(
  start=$(date +%s.%N)
  while true; do
    line=$(python3 -c "import time; print('%.1f' % (time.time() - $start))")
    for rp in $procs; do
      pid=${rp#*:}
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      line="$line ${rss:-0}"
    done
    echo "$line"
    sleep 1
  done
) > "$work/rss.txt" &
sampler=$!
end=$((SECONDS + seconds))
round=0
: > "$work/bench.txt"
while [ "$SECONDS" -lt "$end" ]; do
  round=$((round + 1))
  "$dmoe" bench --url "$url" --max-concurrency 256 --num-prompts 512 --input-len 24 \
    --range-ratio 0.5 --output-len 48 --seed "$round" --warmup 0 --quiet \
    --json "$work/bench$round.json" > /dev/null 2>> "$work/bench_err.txt" || true
  [ -f "$work/bench$round.json" ] || { echo "bench round $round wrote no results"; cat "$work/bench_err.txt"; exit 1; }
done
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
# The end of every process's log, for a failure's reason (a dead process says why there).
dump_logs() {
  for f in "$work"/logs/*.log; do
    echo "== $f (last 40 lines)"
    tail -n 40 "$f"
  done
}
if ! python3 - "$work" "$round" "$procs" "$seconds" <<'PY'
import json, sys
work, rounds, procs, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
done = failed = 0
for r in range(1, rounds + 1):
    j = json.load(open("%s/bench%d.json" % (work, r)))
    done += j["completed"]
    failed += j.get("failed", 0)
rows = [list(map(float, l.split())) for l in open(work + "/rss.txt") if l.strip()]
t = [r[0] for r in rows]
print("soak: %s s, 256 concurrent streams through the gateway, %d rounds of 512 requests" % (seconds, rounds))
print("| process | RSS after warm-up (MiB) | RSS at the end (MiB) | slope after warm-up (MiB/min) |")
print("|---|---|---|---|")
dead = []
for i, rp in enumerate(procs):
    ys = [r[i + 1] / 1024 for r in rows]
    k = len(ys) // 4
    xs, ys2 = t[k:], ys[k:]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys2) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys2)) / sxx * 60 if sxx > 0 else 0.0
    print("| %s | %.1f | %.1f | %+.2f |" % (rp, ys2[0], ys[-1], slope))
    if ys[-1] == 0:
        dead.append(rp)
print("requests: %d completed, %d failed" % (done, failed))
if failed or dead or done == 0:
    print("FAIL: %d failed requests, processes gone: %s" % (failed, dead))
    sys.exit(1)
PY
then
  dump_logs
  exit 1
fi
for rp in $procs; do
  kill -0 "${rp#*:}" 2>/dev/null || { echo "FAIL: ${rp%%:*} (pid ${rp#*:}) died"; dump_logs; exit 1; }
done
echo PASS
