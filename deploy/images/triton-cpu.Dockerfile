# CPU-only Triton (the edge / no-GPU profile): tritonserver and its Python backend from the
# nvidia-pytriton wheel, plus our Python-based backends (triton_backends/: onnxruntime, pytorch,
# onnxruntime_genai) which serve the model repository's config.pbtxt files on CPU. The chart's
# cpu-only values use it; GPU values keep NVIDIA's image. Build from the repository root:
#   podman build -f deploy/images/triton-cpu.Dockerfile .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/triton/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp
# The Python backend stub embeds libpython (Debian ships it apart from the interpreter; the
# python:*-slim images have it already, then this installs nothing new).
RUN apt-get update && apt-get install -y --no-install-recommends libpython3.11 \
 && rm -rf /var/lib/apt/lists/*
# The backends' engines, pinned by the lock. torch: the CPU build (the index's default is CUDA's;
# `make images` takes the CPU wheel from its cache, users point PIP_EXTRA_INDEX_URL at PyTorch's CPU index).
COPY constraints.txt /tmp/lock/
RUN python3 -m venv /opt/triton \
 && pip install --no-cache-dir -c /tmp/lock/constraints.txt \
      nvidia-pytriton torch onnxruntime onnxruntime-genai numpy \
 && rm -rf /tmp/lock
COPY maas/local/triton_backends.py /opt/tritonserver/assemble_backends.py
COPY triton_backends/ /opt/tritonserver/source/
RUN python3 /opt/tritonserver/assemble_backends.py /opt/tritonserver/backends /opt/tritonserver/source \
 && rm -rf /opt/tritonserver/source \
 && ln -s "$(python3 -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')" /opt/tritonserver/server \
 && groupadd --gid 1000 triton-server \
 && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin triton-server
# The stub's embedded Python must see the venv's packages; tritonserver the wheel's bundled libraries.
ENV PYTHONPATH=/opt/triton/lib/python3.11/site-packages \
    LD_LIBRARY_PATH=/opt/triton/lib/python3.11/site-packages/nvidia_pytriton.libs
COPY deploy/images/tritonserver.sh /usr/local/bin/tritonserver
# Fail the build, not the pod, if a shared library is missing.
RUN ! ldd /opt/tritonserver/server/bin/tritonserver /opt/tritonserver/backends/python/triton_python_backend_stub | grep "not found"
# The chart's uid (NVIDIA's image's triton-server), numeric for runAsNonRoot.
USER 1000:1000
EXPOSE 8000 8001 8002
# The chart passes `tritonserver <flags>` as args (NVIDIA's image convention); no entrypoint here,
# so the wrapper below is the command.
CMD ["tritonserver"]
