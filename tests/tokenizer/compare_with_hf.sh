#!/usr/bin/env bash
# The DeepSeek tokenizer.json through `dmoe tokenize` vs Hugging Face's `tokenizers` on the same
# generated strings: every id sequence must be identical, and decode(encode(s)) == s.
# Needs DMOE_NPM_DIR (scripts/fetch_tokenizer.sh) and node; scripts/test.sh passes both.
set -euo pipefail
dmoe=$1 strings_js=$2 hf_js=$3 count=${4:-2200}
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh}
tok=$npm_dir/package/models/tokenizer.json
[ -f "$tok" ] || { echo "missing $tok (run scripts/fetch_tokenizer.sh)"; exit 1; }
work=${TEST_TMPDIR:-/tmp}
node "$strings_js" "$count" > "$work/strings.jsonl"
NODE_PATH=$npm_dir/node_modules node "$hf_js" "$tok" < "$work/strings.jsonl" > "$work/hf.jsonl"
"$dmoe" tokenize --tokenizer "$tok" --jsonl "$work/strings.jsonl" > "$work/ours.jsonl"
"$dmoe" tokenize --tokenizer "$tok" --jsonl "$work/ours.jsonl" --decode > "$work/decoded.jsonl"
n=$(wc -l < "$work/strings.jsonl")
mismatch=$(paste -d '\n' "$work/hf.jsonl" "$work/ours.jsonl" | awk 'NR % 2 == 1 {a = $0} NR % 2 == 0 && $0 != a {m++} END {print m + 0}')
roundtrip=$(cmp -s "$work/strings.jsonl" "$work/decoded.jsonl" && echo 0 || echo 1)
echo "$n strings: $mismatch id mismatches against Hugging Face tokenizers; decode(encode(s)) differs: $roundtrip"
if [ "$mismatch" -ne 0 ] || [ "$roundtrip" -ne 0 ]; then
  paste -d '\n' "$work/strings.jsonl" "$work/hf.jsonl" "$work/ours.jsonl" | head -30
  exit 1
fi
[ "$n" -ge 2000 ]
# The same strings through a variant of the tokenizer whose split regex uses every class escape on
# which Oniguruma (HF) and PCRE2 differ: \s \S \h \H \v, outside and inside a class.
variant=$work/variant.json
node -e '
const fs = require("fs");
const t = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
t.pre_tokenizer.pretokenizers[2].pattern.Regex = "\\h+|\\H\\v|\\v|[\\s\\h]\\S|\\s+(?!\\S)|\\s+|\\S";
fs.writeFileSync(process.argv[2], JSON.stringify(t));' "$tok" "$variant"
NODE_PATH=$npm_dir/node_modules node "$hf_js" "$variant" < "$work/strings.jsonl" > "$work/hf_variant.jsonl"
"$dmoe" tokenize --tokenizer "$variant" --jsonl "$work/strings.jsonl" > "$work/ours_variant.jsonl"
vmismatch=$(paste -d '\n' "$work/hf_variant.jsonl" "$work/ours_variant.jsonl" | awk 'NR % 2 == 1 {a = $0} NR % 2 == 0 && $0 != a {m++} END {print m + 0}')
echo "$n strings through a regex with \\s \\S \\h \\H \\v: $vmismatch id mismatches against Hugging Face tokenizers"
if [ "$vmismatch" -ne 0 ]; then
  paste -d '\n' "$work/strings.jsonl" "$work/hf_variant.jsonl" "$work/ours_variant.jsonl" | head -30
  exit 1
fi
