#!/usr/bin/env bash
# No function over 80 lines outside tests and benches (scripts/lint/function_length.py over the
# source tree), and the checker itself finds long functions past raw strings, comments and class
# bodies (scripts/lint/function_length_test.sh).
set -euo pipefail
check=$(readlink -f "$TEST_SRCDIR/dmoe/scripts/lint/function_length.py")
self_test=$(readlink -f "$TEST_SRCDIR/dmoe/scripts/lint/function_length_test.sh")
root=$(cd "$(dirname "$check")/../.." && pwd)  # the source tree itself (the test is tagged external)
[ -f "$root/WORKSPACE" ] || { echo "no WORKSPACE at $root"; exit 1; }
bash "$self_test"
python3 "$check" --max 80 "$root"
