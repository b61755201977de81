#!/usr/bin/env bash
# The allowed dependency directions (docs/ARCHITECTURE.md) hold over the source tree's BUILD deps
# and #includes (scripts/lint/check_deps.py), and the check fails on a copy of the tree with one
# forbidden include added (the attention node including the expert service) and with one forbidden
# BUILD dep added (the kernels depending on the model).
set -euo pipefail
check=$(readlink -f "$TEST_SRCDIR/dmoe/scripts/lint/check_deps.py")
root=$(cd "$(dirname "$check")/../.." && pwd)  # the source tree itself (the test is tagged external)
[ -f "$root/WORKSPACE" ] || { echo "no WORKSPACE at $root"; exit 1; }
python3 "$check" "$root" || { echo "forbidden dependencies in the tree"; exit 1; }

copy=$TEST_TMPDIR/tree
mkdir -p "$copy"
tar -C "$root" --exclude='./bazel-*' --exclude=./.git --exclude=./.cache --exclude=node_modules \
  -cf - . | tar -C "$copy" -xf -
python3 "$check" "$copy" > /dev/null || { echo "the copy itself fails"; exit 1; }

echo '#include "expert_service/expert_shard.h"' >> "$copy/attention_service/engine.cc"
if out=$(python3 "$check" "$copy"); then echo "a forbidden include passed"; exit 1; fi
echo "$out"
grep -q '^attention_service/engine.cc:[0-9]*: attention_service -> expert_service' <<< "$out"

undo_include() { sed -i '$ d' "$copy/attention_service/engine.cc"; }  # undo the include
undo_include
python3 "$check" "$copy" > /dev/null || { echo "the include was not undone"; exit 1; }
sed -i '0,/"\/\/common:dtype",/s//"\/\/common:dtype",\n        "\/\/model:config",/' "$copy/kernels/cpu/BUILD"
if out=$(python3 "$check" "$copy"); then echo "a forbidden BUILD dep passed"; exit 1; fi
echo "$out"
grep -q '^kernels/cpu/BUILD:[0-9]*: kernels -> model (rule cpu)' <<< "$out"
echo "dependency directions hold; a forbidden include and a forbidden dep are caught"
