#!/usr/bin/env bash
# The ONE prepared GPU check (issue [cuda]): on a machine with a GPU, builds the CUDA code
# (-c opt, --config=cuda), runs every GPU test, and prints a summary table. Meant for the scarce
# minutes of a GPU machine: run it once, fix, run again; never explore interactively there.
#   bash scripts/gpu_check.sh [--timeout-s 480]
# Exit 0 when every GPU test passed (and none was skipped for want of a device). Each test runs in
# its own process; full outputs go to $OUT (default: a new temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
limit=480
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout-s) limit=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
out_dir=${OUT:-$(mktemp -d)}
echo "gpu_check: full outputs in $out_dir"
# The CUDA 13 runtime needs driver 580 or newer: with an older one every test would only skip.
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
# GPU_CHECK_DRY_RUN=1: go on without one (to try this script on a machine without a GPU).
if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ] && { [ -z "$driver" ] || [ "${driver%%.*}" -lt 580 ]; }; then
  echo "gpu_check: no usable GPU driver (found '${driver:-none}'; CUDA 13 needs >= 580): nothing to test"
  exit 1
fi
# The kernels against the CPU's, the experts on the GPU, the GPU engine against the CPU engine,
# and the engine / dmoe-attention --device cuda with shards in other processes.
tests=(//kernels/cuda:cuda_kernels_test //model:cuda_experts_test
       //attention_service:cuda_engine_test //tests:gpu_cluster_test)
if ! timeout "$limit" bazel build -c opt --config=cuda "${tests[@]}" //cli:dmoe; then
  echo "gpu_check: the CUDA build of the tests failed"; exit 1
fi
timeout "$limit" bazel build -c opt --config=cuda //bench:cuda_bench || echo "gpu_check: cuda_bench did not build"
rc=0
printf '%-64s %-8s\n' "test" "result"
for t in "${tests[@]}"; do
  bin=bazel-bin/${t#//}; bin=${bin/://}
  # Each test in its own process: a CUDA fault (an illegal address) poisons the process's context
  # and would fail every later test of the binary.
  for name in $("$bin" --gtest_list_tests | awk '/^[^ ]/ {s=$1} /^  / {print s $1}'); do
    left=$(( limit - ($(date +%s) - start) ))
    [ "$left" -lt 10 ] && { echo "gpu_check: out of time before $name"; rc=1; break 2; }
    log="$out_dir/${name//\//_}.log"
    mkdir -p "$out_dir/tmp"
    TEST_SRCDIR="$PWD/$bin.runfiles" TEST_TMPDIR="$out_dir/tmp" \
      timeout "$left" "$bin" --gtest_filter="$name" > "$log" 2>&1; trc=$?
    if grep -qE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$log"; then res=SKIPPED; rc=1
    elif [ $trc -eq 0 ] && grep -qE '^\[       OK \] .* \([0-9]+ ms\)$' "$log"; then res=PASSED
    else res=FAILED; rc=1; fi
    printf '%-64s %-8s\n' "$t $name" "$res"
    if [ "$res" = SKIPPED ]; then
      grep -m1 -A1 ': Skipped$' "$log" | tail -1 | sed 's/^/    /'  # the reason
    elif [ "$res" = FAILED ]; then
      grep -B2 -A12 -E 'Failure|error|CUDA' "$log" | head -40 | sed 's/^/    /'
    fi
  done
done
# The CLI end to end: the same greedy tokens from --device cuda as from the CPU.
left=$(( limit - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  m="$out_dir/tmp/cli_model"
  bazel-bin/cli/dmoe make-tiny-model "$m" --preset tiny --seed 3 > /dev/null 2>&1
  args=(generate --model "$m" --tokens 5,6,7,8,9 --max-tokens 16 --print-token-ids --prefill-chunk 3)
  want=$(timeout 60 bazel-bin/cli/dmoe "${args[@]}" 2>&1 | tail -1)
  got=$(timeout 60 bazel-bin/cli/dmoe "${args[@]}" --device cuda 2> "$out_dir/cli_gpu.log" | tail -1)
  if [ -n "$want" ] && [ "$want" = "$got" ]; then res=PASSED; else res=FAILED; rc=1; fi
  printf '%-64s %-8s\n' "dmoe generate --device cuda == --device cpu" "$res"
  [ "$res" = FAILED ] && { echo "    cpu: $want"; echo "    gpu: $got"; sed 's/^/    /' "$out_dir/cli_gpu.log" | tail -5; }
fi
left=$(( limit - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  echo; echo "benchmarks (bench/cuda_bench):"
  timeout "$left" bazel-bin/bench/cuda_bench 2>&1 | tee "$out_dir/cuda_bench.txt" ||
    { echo "gpu_check: cuda_bench failed"; rc=1; }
fi
echo "gpu_check: $(( $(date +%s) - start )) s, exit $rc"
bazel shutdown >/dev/null 2>&1 || true
exit $rc
