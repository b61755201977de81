#!/usr/bin/env bash
# Installs what dmoe needs, builds the `dmoe` command, writes the built-in tiny model (once) and
# serves a sample request with it. Until the distributed cluster lands ([deploy]), the request runs
# in one process through the same engine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bazel build //cli:dmoe
dmoe=bazel-bin/cli/dmoe
model=.cache/tiny-model
if [ ! -f "$model/config.json" ]; then
  "$dmoe" make-tiny-model "$model" --preset tiny --seed 0
fi
echo "sample request: greedy continuation of tokens 1,2,3,4 (16 new tokens)"
"$dmoe" generate --model "$model" --tokens 1,2,3,4 --max-tokens 16 --temperature 0
