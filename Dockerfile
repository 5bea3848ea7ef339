# One image for the four MaaS services; the chart picks the component by command
# (maas-router, maas-registry, maas-tokenizer, maas-vision). Triton uses NVIDIA's image.
# Every stage is Debian bookworm: the fast-path binary is linked against bookworm's gRPC C++
# (1.51) and the runtime stage installs the matching shared libraries by package name.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The gRPC stubs (maas/v1) are generated, not committed: `make protos`. That target
# normally sets up the dev venv first; here the image's python is the toolchain, so
# mark the venv as installed and point the Makefile's PY at it.
RUN pip install --no-cache-dir "grpcio-tools>=1.81" \
 && mkdir -p .venv && touch .venv/.installed \
 && make protos PY=python \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The router's compiled Open Inference Protocol data path (maas-oip-fastpath, C++). The router
# starts it as a child process when it is on PATH; without it the router serves OIP only on its
# main port. Built in its own stage so g++ and the -dev headers stay out of the runtime image;
# only the router's sources and the build script are copied, so Python-only changes reuse it.
FROM python:3.11-slim-bookworm AS fastpath
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ pkg-config libgrpc++-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY tools/build_fastpath.sh tools/
COPY services/router/ services/router/
RUN MAAS_FASTPATH_OUT=/out/maas-oip-fastpath bash tools/build_fastpath.sh

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # The chart mounts a read-only root; /tmp is its writable emptyDir.
    HOME=/tmp
# gRPC C++ runtime for maas-oip-fastpath (pulls libgrpc29, libprotobuf32, abseil).
RUN apt-get update && apt-get install -y --no-install-recommends libgrpc++1.51 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=fastpath /out/maas-oip-fastpath /usr/local/bin/maas-oip-fastpath
# Fail the build, not the pod, if a shared library is missing.
RUN ! ldd /usr/local/bin/maas-oip-fastpath | grep "not found"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && groupadd --gid 10001 maas \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin maas
# Numeric, so runAsNonRoot can verify it.
USER 10001:10001
# 50055: the router's OIP fast path (router.oipFastPath in the chart).
EXPOSE 50051 50052 50053 50054 50055 9090
CMD ["maas-router"]
