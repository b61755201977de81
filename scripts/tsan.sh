#!/usr/bin/env bash
# Runs tests under ThreadSanitizer with the suppressions for the uninstrumented system libraries
# (tests/tsan.supp). Default: the transport conformance suite and the multi-process expert tests.
#   bash scripts/tsan.sh [BAZEL TARGETS...]
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(//transport:transport_conformance_test //tests:distributed_experts_test)
exec bazel test --config=tsan --test_env=TSAN_OPTIONS="suppressions=$PWD/tests/tsan.supp" \
  --test_output=errors "${targets[@]}"
