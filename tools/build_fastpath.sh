#!/usr/bin/env bash
# Build the router's OIP fast path (services/router/native/oip_fastpath.cc) into
# build/bin/maas-oip-fastpath (used by `make fastpath`). Needs g++ and gRPC C++ (1.51+): Debian's
# libgrpc++-dev, installed here with apt-get when missing and this runs as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/services/router/native/oip_fastpath.cc"
OUT="${MAAS_FASTPATH_OUT:-$ROOT/build/bin/maas-oip-fastpath}"
DEB_PACKAGES=(g++ pkg-config libgrpc++-dev)

if ! pkg-config --exists 'grpc++ >= 1.51' 2>/dev/null || ! command -v g++ >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing ${DEB_PACKAGES[*]} (Debian packages) for the OIP fast path"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends -qq "${DEB_PACKAGES[@]}" >/dev/null ||
      { apt-get update -qq && apt-get install -y --no-install-recommends -qq "${DEB_PACKAGES[@]}" >/dev/null; }
  else
    echo "error: the OIP fast path needs g++ and gRPC C++ >= 1.51 (Debian: apt-get install ${DEB_PACKAGES[*]})" >&2
    exit 1
  fi
fi

mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2046  # pkg-config prints several flags on purpose
g++ -O2 -std=c++17 -Wall -Wextra -o "$OUT.tmp" "$SRC" $(pkg-config --cflags --libs 'grpc++')
mv "$OUT.tmp" "$OUT"
echo "built $OUT"
