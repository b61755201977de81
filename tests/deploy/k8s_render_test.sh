#!/usr/bin/env bash
# kubectl kustomize renders every overlay, and the rendered objects pass check_manifests.js.
set -euo pipefail
check=$1
npm_dir=${DMOE_NPM_DIR:?set DMOE_NPM_DIR to the output of scripts/fetch_tokenizer.sh (js-yaml)}
# Runfiles are symlinks, which kustomize does not follow: render a real copy.
root=$TEST_TMPDIR/k8s
cp -rL "$TEST_SRCDIR/dmoe/deploy/k8s" "$root"
# Without the operator's secret files kustomize must stop, naming the missing file.
if kubectl kustomize "$root/overlays/cpu-dev" > /dev/null 2> "$TEST_TMPDIR/missing.txt"; then
  echo "rendered without base/secrets/: the secrets must come from the operator's files"; exit 1
fi
grep -q "secrets/api-keys.*no such file" "$TEST_TMPDIR/missing.txt" ||
  { echo "no clear error for the missing secret file:"; cat "$TEST_TMPDIR/missing.txt"; exit 1; }
mkdir -p "$root/base/secrets"
echo "test-key 8" > "$root/base/secrets/api-keys"
echo "test-token" > "$root/base/secrets/cluster-token"
for overlay in cpu-dev gpu-rdma; do
  kubectl kustomize "$root/overlays/$overlay" > "$TEST_TMPDIR/$overlay.yaml"
  NODE_PATH=$npm_dir/node_modules node "$check" "$overlay" "$root/prometheus-adapter/values.yaml" \
    < "$TEST_TMPDIR/$overlay.yaml"
done
