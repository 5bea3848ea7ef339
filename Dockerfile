# One image for the four MaaS services; the chart picks the component by command
# (maas-router, maas-registry, maas-tokenizer, maas-vision). Triton uses NVIDIA's image.
FROM python:3.11-slim AS build
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

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # The chart mounts a read-only root; /tmp is its writable emptyDir.
    HOME=/tmp
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && groupadd --gid 10001 maas \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin maas
# Numeric, so runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50051 50052 50053 50054 9090
CMD ["maas-router"]
