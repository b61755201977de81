#!/usr/bin/env bash
# Bazel's --workspace_status_command (.bazelrc): the commit a stamped build (--stamp, as the
# Dockerfiles build) reports in --version and in the dmoe_build_info metric. $DMOE_COMMIT wins (a
# Docker build has no .git: docker build --build-arg DMOE_COMMIT=$(git rev-parse HEAD)); else
# git's HEAD, "-dirty" when tracked files differ from it; else "unknown". Unstamped builds (the
# default) do not read it.
commit="${DMOE_COMMIT:-}"
if [ -z "$commit" ] && command -v git > /dev/null && git rev-parse --git-dir > /dev/null 2>&1; then
  commit=$(git rev-parse --short=12 HEAD 2> /dev/null || true)
  if [ -n "$commit" ] && ! git diff-index --quiet HEAD -- 2> /dev/null; then commit="$commit-dirty"; fi
fi
echo "STABLE_DMOE_COMMIT ${commit:-unknown}"
