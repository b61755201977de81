#!/usr/bin/env bash
# A bad --metrics-listen is refused before the weights load (on a real checkpoint that takes
# minutes): dmoe-expert and dmoe-attention exit 2 naming the flag, having loaded nothing.
set -euo pipefail
bin=$TEST_SRCDIR/dmoe
work=$TEST_TMPDIR
"$bin/cli/dmoe" make-tiny-model "$work/model" --preset tiny --seed 0 > /dev/null
for cmd in "expert_service/dmoe-expert --experts 0/1" attention_service/dmoe-attention; do
  b=${cmd%% *}
  rc=0
  # shellcheck disable=SC2086
  "$bin/"$cmd --model "$work/model" --metrics-listen 127.0.0.1:99999 > "$work/out" 2> "$work/err" || rc=$?
  [ "$rc" -eq 2 ] || { echo "$b: exit $rc, want 2"; cat "$work/err"; exit 1; }
  grep -q -- "--metrics-listen" "$work/err" || { echo "$b: the error does not name --metrics-listen"; cat "$work/err"; exit 1; }
  if grep -q "loading\|loaded" "$work/err"; then
    echo "$b: loaded weights before refusing --metrics-listen:"
    cat "$work/err"
    exit 1
  fi
  echo "ok $b refuses a bad --metrics-listen before loading"
done
echo PASS
