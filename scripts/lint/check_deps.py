#!/usr/bin/env python3
"""Checks the allowed dependency directions between dmoe's top-level packages (docs/ARCHITECTURE.md).

Two sources are checked, so that neither can drift from the rule:
  - every `//pkg...` label in a BUILD rule's deps/srcs/data/hdrs (a rule that is a test, testonly,
    or in a fuzz/ folder may depend on anything: nothing depends on tests);
  - every `#include "pkg/..."` in a .h/.cc file (test and fuzz sources excepted likewise).
Usage: check_deps.py [ROOT]   (ROOT: the repository root; default: two folders above this script)
Prints one line per forbidden edge (file:line: A -> B) and exits 1 if there is any.
"""
import os
import re
import sys

# Package -> the packages it may depend on (besides itself). Packages not listed (cli, bench,
# tests, tools, ...) may depend on everything.
ALLOWED = {
    "third_party": set(),
    "proto": {"third_party"},
    "common": {"third_party", "proto"},
    "kernels": {"common", "third_party"},
    "model": {"common", "kernels", "third_party"},
    "transport": {"common", "third_party"},
    "router": {"common", "model", "proto", "third_party"},
    "expert_service": {"common", "kernels", "model", "transport", "router", "proto", "third_party"},
    "attention_service": {"common", "kernels", "model", "transport", "router", "proto",
                          "third_party"},
    "gateway": {"common", "model", "proto", "router", "third_party"},
    "deploy": set(),
}
SKIP_DIRS = {".git", ".cache", "node_modules"}
RULE = re.compile(r"^(\w+)\(\n(.*?)^\)", re.M | re.S)
LABEL = re.compile(r'"//([A-Za-z0-9_]+)[/:"]')
INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_]+)/', re.M)


def is_test_path(rel):
    base = os.path.basename(rel)
    return (base.endswith(("_test.cc", "_test.h", "_fuzz.cc")) or "/fuzz/" in "/" + rel or
            rel.startswith(("tests/", "bench/")))


def top(rel):
    return rel.split("/", 1)[0]


def check_build(root, rel, text, errors):
    pkg = top(rel)
    allowed = ALLOWED.get(pkg)
    if allowed is None or "/fuzz/" in "/" + rel:
        return
    for m in RULE.finditer(text):
        kind, body = m.group(1), m.group(2)
        if kind.endswith("_test") or re.search(r"testonly\s*=\s*(True|1)", body):
            continue
        line = text.count("\n", 0, m.start()) + 1
        name = re.search(r'name\s*=\s*"([^"]+)"', body)
        for dep in sorted(set(LABEL.findall(body))):
            if dep == "conditions":  # Bazel's own //conditions:default in a select()
                continue
            if dep != pkg and dep not in allowed:
                errors.append(f"{rel}:{line}: {pkg} -> {dep} "
                              f"(rule {name.group(1) if name else kind})")


def check_source(rel, text, errors):
    pkg = top(rel)
    allowed = ALLOWED.get(pkg)
    if allowed is None or is_test_path(rel):
        return
    for m in INCLUDE.finditer(text):
        dep = m.group(1)
        if dep != pkg and dep not in allowed and os.path.isdir(os.path.join(ROOT, dep)):
            line = text.count("\n", 0, m.start()) + 1
            errors.append(f"{rel}:{line}: {pkg} -> {dep} (#include \"{dep}/...\")")


def main():
    errors = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not d.startswith("bazel-") and
                       not (rel_dir == "." and d == "third_party")]
        for f in filenames:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)
            if f in ("BUILD", "BUILD.bazel"):
                check_build(ROOT, rel, open(path, encoding="utf-8").read(), errors)
            elif f.endswith((".h", ".cc")):
                check_source(rel, open(path, encoding="utf-8", errors="replace").read(), errors)
    for e in sorted(errors):
        print(e)
    print(f"check_deps: {len(errors)} forbidden dependencies")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    sys.exit(main())
