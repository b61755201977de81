#!/usr/bin/env bash
# Runs a libFuzzer binary as a test.
# Usage: run_fuzzer.sh FUZZER SEED_DIR SECONDS [--dict=FILE] [--seconds=N]
#   1. Regression: every file in SEED_DIR is run once on its own (a seed that crashes, hangs,
#      leaks or trips ASan/UBSan fails the test, and names the seed). An empty or missing SEED_DIR
#      fails: a fuzz test that silently runs no seeds proves nothing.
#   2. Fuzzing for SECONDS (a later --seconds=N, which scripts/test.sh passes through --test_arg,
#      overrides it; 0 skips this step) on a copy of the seeds. Fails on any finding, or when no
#      input was executed. A --dict (a libFuzzer dictionary of the format's keywords) guides it.
#      Crashing inputs go to $TEST_UNDECLARED_OUTPUTS_DIR (bazel-testlogs/<target>/test.outputs/)
#      and, when small, are printed as Base64: add them to SEED_DIR as regression seeds.
# UBSan findings are fatal: the fuzz config builds with -fno-sanitize-recover=all, and
# halt_on_error=1 below covers a build without it.
set -euo pipefail
fuzzer=$1 seeds=$2 seconds=${3:-10}
dict=()
for a in "${@:4}"; do
  case "$a" in
    --seconds=*) seconds=${a#--seconds=} ;;
    --dict=*) dict=(-dict="${a#--dict=}") ;;
    *) echo "unknown argument $a"; exit 1 ;;
  esac
done
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "bad --seconds=$seconds"; exit 1; }

export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}halt_on_error=1:print_stacktrace=1"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1"
name=$(basename "$fuzzer")
common=(-timeout=5 -rss_limit_mb=2048)
tmp=${TEST_TMPDIR:-/tmp}
artifacts=${TEST_UNDECLARED_OUTPUTS_DIR:-$tmp}/

shopt -s nullglob
seed_files=("$seeds"/*)
[ "${#seed_files[@]}" -gt 0 ] || { echo "$name: no seeds in $seeds"; exit 1; }

log=$(mktemp "$tmp/$name.seeds.XXXXXX")
"$fuzzer" "${common[@]}" -artifact_prefix="$artifacts" "${seed_files[@]}" >"$log" 2>&1 || {
  tail -60 "$log"; echo "$name: a seed failed (see above)"; exit 1; }
ran=$(grep -c '^Executed ' "$log" || true)
[ "$ran" -eq "${#seed_files[@]}" ] || {
  tail -20 "$log"; echo "$name: ran $ran of ${#seed_files[@]} seeds"; exit 1; }
echo "$name: all $ran seeds in $seeds pass"
[ "$seconds" -gt 0 ] || exit 0

work=$(mktemp -d "$tmp/$name.corpus.XXXXXX")
cp "${seed_files[@]}" "$work/"
log=$(mktemp "$tmp/$name.fuzz.XXXXXX")
"$fuzzer" "${common[@]}" "${dict[@]}" -max_total_time="$seconds" -print_final_stats=1 \
  -artifact_prefix="$artifacts" "$work" >"$log" 2>&1 || {
  tail -60 "$log"; echo "$name: fuzzing found a failure (see above)"; exit 1; }
runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo 0)
grep -E 'stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|Done' \
  "$log" || true
[ "${runs:-0}" -gt 0 ] || { echo "$name: no inputs executed"; tail -20 "$log"; exit 1; }
echo "fuzzed $name for ${seconds}s: $runs runs, corpus $(find "$work" -type f | wc -l) inputs, no failure"
