# One image for the MaaS services; the chart picks the component by command
# (maas-router, maas-registry, maas-tokenizer, maas-vision). Triton: NVIDIA's image (GPU) or
# deploy/images/triton-cpu.Dockerfile (CPU-only). Every stage is Debian bookworm: the fast-path
# binary is linked against bookworm's gRPC C++ (1.51) and the runtime stage installs the matching
# shared libraries by package name.
# BASE_IMAGE: any bookworm with python3 (3.11) and its venv module; `make images` passes a local one.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# Python packages come from the index, pinned by constraints.txt (the lock). `make images` sets
# PIP_NO_INDEX=1 and PIP_FIND_LINKS=/wheels, a wheel cache it mounts: it needs no index at all.

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
WORKDIR /src
COPY constraints.txt ./
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir -c constraints.txt grpcio-tools setuptools
COPY . .
# The gRPC stubs (maas/v1) are generated, not committed: the package build (setup.py) generates
# them into the wheel, with the build venv's grpcio-tools.
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /out .

# The router's OIP fast path (compiled) (maas-oip-fastpath, C++). The router
# starts it as a child process when it is on PATH; without it the router serves OIP only on its
# main port. Built in its own stage so g++ and the -dev headers stay out of the runtime image;
# only the router's sources and the build script are copied, so Python-only changes reuse it.
FROM ${BASE_IMAGE} AS fastpath
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ pkg-config libgrpc++-dev protobuf-compiler libprotobuf-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY tools/build_fastpath.sh tools/
COPY services/router/ services/router/
COPY protos/maas/v1/fastpath.proto protos/maas/v1/
RUN MAAS_FASTPATH_OUT=/out/maas-oip-fastpath bash tools/build_fastpath.sh

FROM ${BASE_IMAGE}
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/maas/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    # The chart mounts a read-only root; /tmp is its writable emptyDir.
    HOME=/tmp
# gRPC C++ runtime for maas-oip-fastpath (pulls libgrpc29, libprotobuf32, abseil, libssl3: its sha256).
RUN apt-get update && apt-get install -y --no-install-recommends libgrpc++1.51 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=fastpath /out/maas-oip-fastpath /usr/local/bin/maas-oip-fastpath
# Fail the build, not the pod, if a shared library is missing.
RUN ! ldd /usr/local/bin/maas-oip-fastpath | grep "not found"
# Dependencies first (their own layer: a code change reuses it), then the project without deps.
COPY constraints.txt pyproject.toml /tmp/lock/
RUN python3 -m venv /opt/maas \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/lock/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/lock/requirements.txt \
 && pip install --no-cache-dir -c /tmp/lock/constraints.txt -r /tmp/lock/requirements.txt
COPY --from=build /out /tmp/wheel
RUN pip install --no-cache-dir --no-deps /tmp/wheel/*.whl && rm -rf /tmp/wheel /tmp/lock \
 && pip check \
 && groupadd --gid 10001 maas \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin maas
# Numeric, so runAsNonRoot can verify it.
USER 10001:10001
# 50055: the router's OIP fast path (router.oipFastPath in the chart).
EXPOSE 50051 50052 50053 50054 50055 9090
CMD ["maas-router"]
