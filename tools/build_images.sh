#!/usr/bin/env bash
# `make images`: the services image (Dockerfile) and the CPU Triton image
# (deploy/images/triton-cpu.Dockerfile), built with podman from a local Debian bookworm base.
# Cached: the base rootfs (build/images), the wheels of the lock (build/wheels), podman's layers.
# Set up on a fresh machine by itself: podman/buildah/debootstrap/runc from Debian's packages, and
# podman's settings from deploy/podman/containers.conf (through CONTAINERS_CONF, /etc untouched).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
TAG="${MAAS_IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/maas-mesh/Chart.yaml)}"
BASE="localhost/maas-base:bookworm"
export CONTAINERS_CONF="$ROOT/deploy/podman/containers.conf"
log() { echo "[images $(date +%T)] $*"; }

need=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  log "installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
fi

# 1. Base image: no registry to pull from, so a minimal bookworm with Debian's python3 (3.11).
if ! podman image exists "$BASE"; then
  tarball=build/images/bookworm-python3.tar
  if [[ ! -s $tarball ]]; then
    log "debootstrap bookworm (first build only)"
    rm -rf build/images/rootfs && mkdir -p build/images
    debootstrap --variant=minbase --include=python3,python3-venv bookworm build/images/rootfs >build/images/debootstrap.log
    # debootstrap can leave the rootfs's /proc mounted: unmount before tar and rm.
    { grep -o "$ROOT/build/images/rootfs/[^ ]*" /proc/mounts || true; } | sort -r | xargs -r -n1 umount -l
    rm -rf build/images/rootfs/var/cache/apt/archives/*.deb build/images/rootfs/var/lib/apt/lists/*
    tar --one-file-system -C build/images/rootfs -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf build/images/rootfs
  fi
  # An imported rootfs has no config: give it the PATH an image normally has.
  podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$tarball" "$BASE" >/dev/null
fi

# 2. Wheels of the lock for both images, built on this host (its pip finds the CPU torch wheel);
#    the builds then install from them with no index at all.
stamp=build/wheels/.lock-$(sha256sum constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -e $stamp ]]; then
  log "wheels for the lock -> build/wheels"
  mkdir -p build/wheels
  "$PY" - >build/wheels/requirements.txt <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"]))
# Build toolchain (services image) and the CPU Triton image's engines (deploy/images/triton-cpu.Dockerfile).
print("\n".join(["grpcio-tools", "setuptools", "nvidia-pytriton", "torch", "onnxruntime", "onnxruntime-genai"]))
PYEOF
  # (grep: the host's pip settings name local indexes that lack most packages; it warns for each.)
  "$PY" -m pip wheel --quiet -c constraints.txt -r build/wheels/requirements.txt -w build/wheels 2>&1 |
    { grep -v "^WARNING: Location .* is ignored" || true; }
  rm -f build/wheels/.lock-* && touch "$stamp"
fi

# 3. The images. Host network + this machine's CA bundle and pip settings reach Debian's packages
#    (apt-get in the build); mounted, never copied into a layer.
mounts=(-v "$ROOT/build/wheels:/wheels:ro")
for f in /etc/ssl/certs /etc/pip.conf; do [[ -e $f ]] && mounts+=(-v "$f:$f:ro"); done
build() {  # NAME DOCKERFILE
  local t0=$SECONDS
  podman build --network host "${mounts[@]}" --build-arg BASE_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
    -f "$2" -t "localhost/$1:$TAG" . >"build/images/$1.build.log" 2>&1 ||
    { tail -30 "build/images/$1.build.log"; log "FAILED $1 (build/images/$1.build.log)"; return 1; }
  log "built localhost/$1:$TAG in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "localhost/$1:$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
}
mkdir -p build/images
build maas-mesh Dockerfile
build maas-triton-cpu deploy/images/triton-cpu.Dockerfile
