"""The chart's pods under podman (tools/podman_mesh.py), started once for tests/cluster and removed at
the end, also on failure. Needs `make images` and `make models`; `make cluster-test` does both."""

from __future__ import annotations

import pytest

from tools import podman_kube as pk
from tools.podman_mesh import PodmanMesh


@pytest.fixture(scope="session")
def mesh():
    m = PodmanMesh(pk.REPO / "build/cluster")
    try:
        m.start()
        yield m
    finally:
        m.stop()
