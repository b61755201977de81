#!/usr/bin/env bash
# Every flag a binary's --help documents is accepted by that binary (each is passed with --help,
# which parses the flags and then prints the help).
set -euo pipefail
bin=$TEST_SRCDIR/dmoe
failures=0 checked=0
undocumented=0
check() {  # check "COMMAND..." : every --flag in its help parses, and every accepted flag is in its help
  local cmd=$1
  local flags help accepted
  help=$(DMOE_HELP_LIST_FLAGS=1 $cmd --help 2>"$TEST_TMPDIR/accepted")
  flags=$(echo "$help" | grep -o -- '--[a-z][a-z0-9-]*' | sort -u)
  accepted=$(sed -n 's/^accepted flag: //p' "$TEST_TMPDIR/accepted")
  [ -n "$accepted" ] || { echo "$cmd: no accepted flags listed"; failures=$((failures + 1)); }
  for f in $accepted; do
    if ! grep -qx -- "$f" <<< "$flags"; then  # (echo | grep -q under pipefail: SIGPIPE flakes)
      echo "$cmd: accepts $f but its --help does not document it"
      undocumented=$((undocumented + 1))
    fi
  done
  for f in $flags; do
    [ "$f" = "--help" ] && continue
    checked=$((checked + 1))
    if ! $cmd "$f" x --help > /dev/null 2>&1 && ! $cmd "$f" --help > /dev/null 2>&1; then
      echo "$cmd: documented flag $f is rejected"
      failures=$((failures + 1))
    fi
  done
}
for sub in logits generate make-tiny-model tokenize chat up down serve bench; do check "$bin/cli/dmoe $sub"; done
check "$bin/expert_service/dmoe-expert"
check "$bin/attention_service/dmoe-attention"
check "$bin/gateway/dmoe-gateway"
check "$bin/router/dmoe-router"
# --version: the program, the VERSION file's version, and the commit ("unstamped" unless --stamp).
version=$(tr -d ' \n' < "$bin/VERSION")
for b in cli/dmoe expert_service/dmoe-expert attention_service/dmoe-attention gateway/dmoe-gateway router/dmoe-router; do
  out=$("$bin/$b" --version)
  if ! [[ "$out" =~ ^${b#*/}\ ${version//./\.}\ \(commit\ [A-Za-z0-9._-]+\)$ ]]; then
    echo "$b --version printed \"$out\""
    failures=$((failures + 1))
  fi
done
echo "$checked documented flags checked, $failures rejected, $undocumented accepted but undocumented"
[ "$failures" -eq 0 ] && [ "$undocumented" -eq 0 ]
