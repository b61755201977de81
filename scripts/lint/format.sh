#!/usr/bin/env bash
# clang-format (.clang-format: Google style, 100 columns) over every C++ file of the repository.
# Usage: scripts/lint/format.sh [--check]   (--check: change nothing, list the files that differ,
# exit 1 if any)
set -euo pipefail
cd "$(dirname "$0")/../.."
mapfile -t files < <(git ls-files '*.cc' '*.h' | grep -v '^third_party/')
if [ "${1:-}" = "--check" ]; then
  bad=()
  for f in "${files[@]}"; do
    clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
  done
  if [ ${#bad[@]} -gt 0 ]; then
    printf 'not clang-formatted: %s\n' "${bad[@]}"
    echo "format.sh: ${#bad[@]} of ${#files[@]} files differ (run scripts/lint/format.sh)"
    exit 1
  fi
  echo "format.sh: all ${#files[@]} files clang-formatted"
  exit 0
fi
clang-format -i "${files[@]}"
