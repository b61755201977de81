#!/usr/bin/env bash
# kubectl kustomize renders every overlay, and the rendered objects pass check_manifests.js.
set -euo pipefail
check=$1
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh (js-yaml)}
# Runfiles are symlinks, which kustomize does not follow: render a real copy.
root=$TEST_TMPDIR/k8s
cp -rL "$TEST_SRCDIR/dmoe/deploy/k8s" "$root"
for overlay in cpu-dev gpu-rdma; do
  kubectl kustomize "$root/overlays/$overlay" > "$TEST_TMPDIR/$overlay.yaml"
  NODE_PATH=$npm_dir/node_modules node "$check" "$overlay" < "$TEST_TMPDIR/$overlay.yaml"
done
