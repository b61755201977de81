#!/usr/bin/env bash
# The ONE prepared GPU check (issue [cuda]): on a machine with a GPU, builds the CUDA code
# (-c opt, --config=cuda), runs every GPU test, and prints a summary table. Meant for the scarce
# minutes of a GPU machine: run it once, fix, run again; never explore interactively there.
#   bash scripts/gpu_check.sh [--timeout-s 480]        build here and run here
#   bash scripts/gpu_check.sh --bundle FILE            build here, pack what the run needs into FILE
#   bash scripts/gpu_check.sh --prebuilt FILE [...]    run from a bundle (no Bazel needed there)
# A GPU machine without Bazel or the Debian packages (a bare CUDA image) runs a bundle made on a
# Debian 12 machine: the binaries, their runfiles and every shared library they need but the C and
# C++ runtimes (libstdc++ and libgcc_s travel as a fallback) and the CUDA driver; cuBLAS is taken
# from the GPU machine's CUDA (it is dlopen'ed). Exit 0 when every GPU test passed (and none was
# skipped for want of a device). Each test runs in its own process; full outputs go to $OUT
# (default: a new temporary folder).
set -uo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
limit=480
bundle=""
prebuilt=""
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout-s) limit=$2; shift 2 ;;
    --bundle|--prebuilt|--timeout-s)
      [ $# -ge 2 ] || { echo "gpu_check: $1 needs a value (--help)" >&2; exit 2; } ;;&
    --bundle) bundle=$(cd "$caller" && realpath -m "$2"); shift 2 ;;
    --prebuilt) prebuilt=$(cd "$caller" && realpath -m "$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# The kernels against the CPU's, the experts on the GPU, the GPU engine against the CPU engine,
# and the engine / dmoe-attention --device cuda with shards in other processes.
tests=(//kernels/cuda:cuda_kernels_test //model:cuda_experts_test
       //attention_service:cuda_engine_test //tests:gpu_cluster_test)
bench=//bench:cuda_bench
# bazel label -> path under bazel-bin
bin_path() { local b=${1#//}; echo "${b/://}"; }

if [ -n "$bundle" ]; then
  bazel build -c opt --config=cuda "${tests[@]}" "$bench" //cli:dmoe || exit 1
  stage=$(mktemp -d)
  mkdir -p "$stage/bin" "$stage/lib" "$stage/lib-fallback"
  paths=(_solib_k8 cli/dmoe "$(bin_path $bench)")
  for t in "${tests[@]}"; do paths+=("$(bin_path "$t")" "$(bin_path "$t").runfiles"); done
  # -h: the runfiles are links into Bazel's output base; the bundle holds the files.
  tar -C bazel-bin -ch "${paths[@]}" | tar -C "$stage/bin" -x || exit 1
  cp -r /usr/lib/x86_64-linux-gnu/ucx "$stage/lib/ucx"  # UCX's transports, found beside libucs
  # Every shared library any ELF file of the bundle needs, but glibc's and the CUDA driver.
  find "$stage" -type f -perm -u+x -o -type f -name '*.so*' | while read -r f; do
    ldd "$f" 2>/dev/null | awk '$3 ~ /^\// {print $1, $3}'
  done | sort -u | while read -r name path; do
    case "$name" in
      libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libresolv.so.*|ld-linux*|libcuda.so.*) ;;
      libstdc++.so.*|libgcc_s.so.*) cp -L "$path" "$stage/lib-fallback/$name" ;;
      lib*_S*.so) ;;  # the project's own, in bin/_solib_k8
      *) cp -L "$path" "$stage/lib/$name" ;;
    esac
  done
  git describe --always --dirty > "$stage/COMMIT"
  tar -C "$stage" -cJf "$bundle" . && rm -rf "$stage" || exit 1
  echo "gpu_check: bundle $bundle ($(du -h "$bundle" | cut -f1)) from $(git describe --always --dirty)"
  exit 0
fi

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
root=bazel-bin
unpacked=""
if [ -n "$prebuilt" ]; then
  if [ -f "$prebuilt" ]; then
    root_dir=$(mktemp -d); unpacked=$root_dir
    tar -C "$root_dir" -xJf "$prebuilt" || exit 1
  else
    root_dir=$prebuilt
  fi
  root=$root_dir/bin
  echo "gpu_check: prebuilt bundle of $(cat "$root_dir/COMMIT" 2>/dev/null || echo '?')"
  # cuBLAS is dlopen'ed: take the GPU machine's (the CUDA toolkit's or a Python wheel's).
  cublas=$(ldconfig -p | awk '/libcublas\.so\.13 / {print $NF; exit}')
  [ -z "$cublas" ] && cublas=$(find /usr/local /opt /usr/lib -name 'libcublas.so.13*' 2>/dev/null | head -1)
  echo "gpu_check: cuBLAS ${cublas:-not found}"
  export LD_LIBRARY_PATH="$root_dir/lib${cublas:+:$(dirname "$cublas")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Debian 12's libstdc++ only where the machine's is older (a newer one serves both).
  if ! "$root/cli/dmoe" --help > /dev/null 2> "$out_dir/loader.log"; then
    sed 's/^/gpu_check: /' "$out_dir/loader.log" | head -5
    export LD_LIBRARY_PATH="$root_dir/lib-fallback:$LD_LIBRARY_PATH"
    "$root/cli/dmoe" --help > /dev/null || { echo "gpu_check: the bundle does not load here"; exit 1; }
    echo "gpu_check: with the bundle's libstdc++"
  fi
else
  if ! timeout "$limit" bazel build -c opt --config=cuda "${tests[@]}" //cli:dmoe; then
    echo "gpu_check: the CUDA build of the tests failed"; exit 1
  fi
  timeout "$limit" bazel build -c opt --config=cuda "$bench" || echo "gpu_check: cuda_bench did not build"
fi
rc=0
printf '%-64s %-8s\n' "test" "result"
for t in "${tests[@]}"; do
  bin=$root/$(bin_path "$t")
  # Each test in its own process: a CUDA fault (an illegal address) poisons the process's context
  # and would fail every later test of the binary.
  # A binary that does not load lists no tests: a failure, not an empty pass.
  if ! names=$("$bin" --gtest_list_tests 2> "$out_dir/list.log" |
               awk '/^[^ ]/ {s=$1} /^  / {print s $1}') || [ -z "$names" ]; then
    printf '%-64s %-8s\n' "$t (listing its tests)" FAILED; rc=1
    sed 's/^/    /' "$out_dir/list.log" | head -5
    continue
  fi
  for name in $names; do
    left=$(( limit - ($(date +%s) - start) ))
    [ "$left" -lt 10 ] && { echo "gpu_check: out of time before $name"; rc=1; break 2; }
    log="$out_dir/${name//\//_}.log"
    mkdir -p "$out_dir/tmp"
    # At most 150 s a test: one that hangs must not take the rest's minutes.
    TEST_SRCDIR="$(realpath "$bin.runfiles")" TEST_TMPDIR="$out_dir/tmp" \
      timeout "$(( left < 150 ? left : 150 ))" "$bin" --gtest_filter="$name" > "$log" 2>&1; trc=$?
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
  "$root/cli/dmoe" make-tiny-model "$m" --preset tiny --seed 3 > /dev/null 2>&1
  args=(generate --model "$m" --tokens 5,6,7,8,9 --max-tokens 16 --print-token-ids --prefill-chunk 3)
  want=$(timeout 60 "$root/cli/dmoe" "${args[@]}" 2>&1 | tail -1)
  got=$(timeout 60 "$root/cli/dmoe" "${args[@]}" --device cuda 2> "$out_dir/cli_gpu.log" | tail -1)
  if [ -n "$want" ] && [ "$want" = "$got" ]; then res=PASSED; else res=FAILED; rc=1; fi
  printf '%-64s %-8s\n' "dmoe generate --device cuda == --device cpu" "$res"
  [ "$res" = FAILED ] && { echo "    cpu: $want"; echo "    gpu: $got"; sed 's/^/    /' "$out_dir/cli_gpu.log" | tail -5; }
fi
left=$(( limit - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  echo; echo "benchmarks (bench/cuda_bench):"
  timeout "$left" "$root/$(bin_path $bench)" 2>&1 | tee "$out_dir/cuda_bench.txt" ||
    { echo "gpu_check: cuda_bench failed"; rc=1; }
fi
echo "gpu_check: $(( $(date +%s) - start )) s, exit $rc"
[ -z "$prebuilt" ] && { bazel shutdown >/dev/null 2>&1 || true; }
[ -n "$unpacked" ] && rm -rf "$unpacked"
exit $rc
