#!/usr/bin/env bash
# The ONE prepared GPU check (issue [cuda]): on a machine with a GPU, builds the CUDA code
# (-c opt, --config=cuda), runs every GPU test, and prints a summary table. Meant for the scarce
# minutes of a GPU machine: run it once, fix, run again; never explore interactively there.
#   bash scripts/gpu_check.sh [--timeout-s 420]
# Exit 0 when every GPU test passed (and none was skipped for want of a device).
set -uo pipefail
cd "$(dirname "$0")/.."
limit=420
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout-s) limit=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
tests=(//kernels/cuda:cuda_kernels_test)
if ! timeout "$limit" bazel build -c opt --config=cuda "${tests[@]}" //bench:cuda_bench; then
  echo "gpu_check: the CUDA build failed"; exit 1
fi
rc=0
printf '%-44s %-8s %s\n' "test" "result" "cases (passed/failed/skipped)"
for t in "${tests[@]}"; do
  left=$(( limit - ($(date +%s) - start) ))
  [ "$left" -lt 10 ] && { echo "gpu_check: out of time before $t"; rc=1; break; }
  bin=bazel-bin/${t#//}; bin=${bin/://}
  out=$(timeout "$left" "$bin" --gtest_brief=0 2>&1); trc=$?
  # One line per test ends with its time; gtest's summary repeats the names without it.
  p=$(grep -cE '^\[       OK \] .* \([0-9]+ ms\)$' <<<"$out")
  f=$(grep -cE '^\[  FAILED  \] .* \([0-9]+ ms\)$' <<<"$out")
  s=$(grep -cE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' <<<"$out")
  res=PASSED; [ $trc -ne 0 ] && res=FAILED; [ "$s" -gt 0 ] && [ $trc -eq 0 ] && res=SKIPPED
  printf '%-44s %-8s %s/%s/%s\n' "$t" "$res" "$p" "$f" "$s"
  [ "$res" != PASSED ] && { rc=1; grep -E 'Failure|error|Expected|Which is|no CUDA' <<<"$out" | sort | uniq -c | head -20; }
done
left=$(( limit - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  echo; echo "benchmarks (bench/cuda_bench):"
  timeout "$left" bazel-bin/bench/cuda_bench || { echo "gpu_check: cuda_bench failed"; rc=1; }
fi
echo "gpu_check: $(( $(date +%s) - start )) s, exit $rc"
bazel shutdown >/dev/null 2>&1 || true
exit $rc
