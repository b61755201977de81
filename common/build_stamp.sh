#!/usr/bin/env bash
# common/BUILD's build_stamp genrules: build_stamp.sh VERSION_FILE STATUS_FILE|- OUT.cc writes the
# version and the commit (STABLE_DMOE_COMMIT of Bazel's stable-status.txt; "-": "unstamped").
set -euo pipefail
version=$(tr -d ' \n' < "$1")
commit=unstamped
if [ "$2" != "-" ]; then
  commit=$(sed -n 's/^STABLE_DMOE_COMMIT //p' "$2" | tr -cd 'A-Za-z0-9._-')
  commit=${commit:-unknown}
fi
printf 'extern const char kDmoeVersion[] = "%s";\nextern const char kDmoeCommit[] = "%s";\n' \
  "$version" "$commit" > "$3"
