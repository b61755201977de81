#!/usr/bin/env bash
# The gateway's DeepSeek chat template vs tokenizer_config.json's chat_template rendered by
# @huggingface/jinja, on generated conversations: the strings must be identical.
set -euo pipefail
render=$1 convs_js=$2 jinja_mjs=$3
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh}
work=${TEST_TMPDIR:-/tmp}
node "$convs_js" 300 > "$work/convs.jsonl"
NODE_PATH=$npm_dir/node_modules node "$jinja_mjs" "$npm_dir/package/models/tokenizer_config.json" \
  < "$work/convs.jsonl" > "$work/jinja.jsonl"
"$render" < "$work/convs.jsonl" > "$work/ours.jsonl"
if ! cmp -s "$work/jinja.jsonl" "$work/ours.jsonl"; then
  paste -d '\n' "$work/convs.jsonl" "$work/jinja.jsonl" "$work/ours.jsonl" | head -12
  exit 1
fi
echo "$(wc -l < "$work/convs.jsonl") conversations: identical to the real chat template"
