#!/usr/bin/env bash
# Runs a libFuzzer binary for a bounded time on a copy of its seed corpus; fails on a crash or
# when no input was executed. Usage: run_fuzzer.sh FUZZER SEED_DIR SECONDS
set -euo pipefail
fuzzer=$1 seeds=$2 seconds=${3:-10}
# A later --seconds=N (scripts/test.sh passes one through --test_arg) overrides the default.
for a in "${@:4}"; do case "$a" in --seconds=*) seconds=${a#--seconds=} ;; esac; done
work=$(mktemp -d "${TEST_TMPDIR:-/tmp}/fuzz.XXXXXX")
cp -r "$seeds"/. "$work/"
log="$work.log"
"$fuzzer" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
  "$work" >"$log" 2>&1 || { tail -50 "$log"; exit 1; }
runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo 0)
grep -E 'stat::number_of_executed_units|Done' "$log" || true
[ "${runs:-0}" -gt 0 ] || { echo "no inputs executed"; tail -20 "$log"; exit 1; }
echo "fuzzed $(basename "$fuzzer") for ${seconds}s: $runs runs, no crash"
