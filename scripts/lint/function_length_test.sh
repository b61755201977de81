#!/usr/bin/env bash
# Tests scripts/lint/function_length.py on generated C++ sources in a temporary directory.
# Usage: scripts/lint/function_length_test.sh   (prints PASS/FAIL lines; exit 1 on any failure)
set -u

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script="$here/function_length.py"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=1; }

# emit FILE LINE...: append lines to FILE, keeping its line count in $lines.
lines=0
emit() {
  local f=$1
  shift
  local l
  for l in "$@"; do
    printf '%s\n' "$l" >>"$f"
    lines=$((lines + 1))
  done
}
filler() {  # filler FILE N INDENT: N statement lines
  local i
  for ((i = 0; i < $2; i++)); do emit "$1" "$3x += $i;"; done
}

# (a) a 10-line function.
write_small() {
  local f=$1
  emit "$f" "int Small(int x) {"
  filler "$f" 8 "  "
  emit "$f" "}"
}

mkdir -p "$tmp/full" "$tmp/small"
src="$tmp/full/sample.cc"
emit "$src" '#include <string>' '' 'namespace demo {' ''
a_start=$((lines + 1))
write_small "$src"
emit "$src" ''

# (b) a 90-line function; its body holds a raw string with unbalanced braces, a char literal
# brace, a `// }` comment and a `/* { */` comment.
b_start=$((lines + 1))
emit "$src" 'int Big(int x) {' \
  '  const char* help = R"doc(usage: { {{ unbalanced' \
  '  } "quoted" ) text' \
  ')doc";' \
  "  char c = '{';" \
  '  // }' \
  '  /* { */'
filler "$src" 81 "  "
emit "$src" '  return x + help[0] + c;' '}'
b_end=$lines
emit "$src" ''

# (c) a class with an inline method of 85 lines.
emit "$src" 'class Widget {' ' public:'
c_start=$((lines + 1))
emit "$src" '  int Method(int x) const {'
filler "$src" 82 "    "
emit "$src" '    return x;' '  }'
c_end=$lines
emit "$src" '' ' private:' '  int y_ = 0;' '};' ''

# (d) a lambda inside a (short) function.
emit "$src" 'int WithLambda(int x) {' '  auto f = [&](int y) {'
filler "$src" 5 "    "
emit "$src" '    return y;' '  };' '  return f(x);' '}' '' '}  // namespace demo'

[[ $((b_end - b_start + 1)) == 90 && $((c_end - c_start + 1)) == 85 ]] ||
  fail "test setup: (b) spans $((b_end - b_start + 1)) lines, (c) $((c_end - c_start + 1))"

expected="sample.cc:$b_start: Big() is 90 lines (max 80)
sample.cc:$c_start: Widget::Method() is 85 lines (max 80)
2 functions over 80 lines"
out=$(python3 "$script" --max 80 "$tmp/full" 2>&1)
rc=$?
if [[ "$out" == "$expected" ]]; then
  pass "reports exactly Big() (90 lines) and Widget::Method() (85 lines)"
else
  fail "unexpected report; expected:"
  echo "$expected" | sed 's/^/    /'
  echo "  got:"
  echo "$out" | sed 's/^/    /'
fi
if [[ $rc == 1 ]]; then pass "exit status 1 with offenders"; else fail "exit status $rc, want 1"; fi

# Only (a): nothing to report, exit 0.
lines=0
write_small "$tmp/small/small.cc"
out=$(python3 "$script" --max 80 "$tmp/small" 2>&1)
rc=$?
if [[ "$out" == "0 functions over 80 lines" ]]; then
  pass "a 10-line function alone is not reported"
else
  fail "unexpected report for (a) alone: $out"
fi
if [[ $rc == 0 ]]; then pass "exit status 0 without offenders"; else fail "exit status $rc, want 0"; fi

# (a) alone is over a limit of 9, and exactly at a limit of 10 (lengths count both brace lines).
out=$(python3 "$script" --max 9 "$tmp/small" 2>&1)
if [[ "$out" == *"small.cc:1: Small() is 10 lines (max 9)"* ]]; then
  pass "length counts the opening and closing brace lines"
else
  fail "--max 9 on (a): $out"
fi

# Tests are skipped unless --all, which reports them but exits 0.
mkdir -p "$tmp/small/tests"
cp "$src" "$tmp/small/tests/big.cc"
cp "$src" "$tmp/small/widget_test.cc"
out=$(python3 "$script" --max 80 "$tmp/small" 2>&1)
rc=$?
if [[ $rc == 0 && "$out" == "0 functions over 80 lines" ]]; then
  pass "tests/ and *_test.cc are skipped by default"
else
  fail "default run saw test files (exit $rc): $out"
fi
out=$(python3 "$script" --all --max 80 "$tmp/small" 2>&1)
rc=$?
if [[ $rc == 0 && "$out" == *"4 functions over 80 lines" ]]; then
  pass "--all reports tests too and exits 0"
else
  fail "--all (exit $rc): $out"
fi

if [[ $failed != 0 ]]; then
  echo "FAIL: function_length_test"
  exit 1
fi
echo "PASS: function_length_test"
