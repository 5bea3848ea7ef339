"""The mesh as users deploy it: the images `make images` builds, the chart's own pods (container
profile ci/podman-values.yaml) under `podman kube play`, and callers from outside: the `maas demo`
story, an unmodified tritonclient through the router's OIP ports, `maas models list`, the chart's
probes, and a killed container coming back. Run with `make cluster-test` (-m cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from skimage import data

from maas.cli.mesh import demo_requests, demo_rollout
from maas.client import MeshClient
from maas.registry_client import RegistryClient
from tests.integration.test_triton_models import classify, preprocess
from tools import podman_kube as pk
from tools.podman_mesh import COMPONENTS

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CAT_CLASSES = range(281, 286)  # ImageNet's cats


def inspect(mesh, component: str, fmt: str) -> str:
    return pk.podman("inspect", mesh.play.container(mesh.deployment(component)), "--format", fmt).strip()


def versions(mesh) -> dict:
    with RegistryClient(mesh.address("registry"), timeout=30) as registry:
        return {
            m.name: ([(v.version, v.state) for v in m.versions], sorted((a.name, a.version) for a in m.aliases))
            for m in registry.list_models()
        }


def test_every_container_passes_the_charts_probes(mesh):
    for component in COMPONENTS:
        spec = mesh.play.spec(mesh.deployment(component))["containers"][0]
        kinds = [k for k in PROBES if k in spec]
        assert kinds == list(PROBES), component
        for kind in kinds:
            assert mesh.play.probe(mesh.deployment(component), kind), (component, kind)


def test_containers_run_non_root_on_a_read_only_root(mesh):
    for component in COMPONENTS:
        uid = mesh.play.spec(mesh.deployment(component))["securityContext"]["runAsUser"]
        assert inspect(mesh, component, "{{.Config.User}}") == f"{uid}:{uid}", component
        assert inspect(mesh, component, "{{.HostConfig.ReadonlyRootfs}}") == "true", component
        container = mesh.play.container(mesh.deployment(component))
        write = "import os, sys; open('/tmp/ok', 'w'); sys.exit(os.access('/', os.W_OK))"
        r = subprocess.run(["podman", "exec", container, "python3", "-c", write], env=pk.ENV, capture_output=True)
        assert r.returncode == 0, (component, r.stderr)  # /tmp (emptyDir) writable, / not


def test_services_reach_each_other_by_the_charts_names(mesh):
    """Every peer address the chart sets resolves, inside the pod, to the peer pod's address."""
    for component in ("router", "registry"):
        env = {
            e["name"]: e.get("value", "") for e in mesh.play.spec(mesh.deployment(component))["containers"][0]["env"]
        }
        peers = {a.rsplit(":", 1)[0] for k, v in env.items() if k.endswith("_ADDRESS") for a in v.split(",")}
        assert peers, component
        resolve = "import socket, sys; print(' '.join(socket.gethostbyname(h) for h in sys.argv[1:]))"
        out = pk.podman(
            "exec", mesh.play.container(mesh.deployment(component)), "python3", "-c", resolve, *sorted(peers)
        )
        expected = [mesh.play.address(next(d for d in mesh.names.values() if p.startswith(d))) for p in sorted(peers)]
        assert out.split() == expected, (component, sorted(peers))


def test_the_demo_story_through_the_router(mesh):
    summary: dict = {}
    with (
        MeshClient(mesh.address("router")) as client,
        RegistryClient(mesh.address("registry"), token=mesh.admin_token) as registry,
    ):
        demo_requests(client, summary)
        demo_rollout(client, registry, mesh.model_repository, summary)
    assert "cat" in summary["classify"]["top1"] and 0.2 < summary["embed"]["cosine"] < 1
    production, candidate = summary["versions"]["production"], summary["versions"]["candidate"]
    assert set(summary["canary"]) == {f"v{production}", f"v{candidate}"}
    assert summary["rollback"] == {"from": candidate, "to": production}


@pytest.mark.parametrize("port", ["grpc", "oip-fast"])
def test_unmodified_tritonclient_through_the_routers_oip_ports(mesh, port):
    client = grpcclient.InferenceServerClient(mesh.address("router", port))
    try:
        assert client.is_server_ready() and client.is_model_ready("efficientnet_lite0")
        logits = classify(client, preprocess(data.chelsea())[None])
        assert int(np.argmax(logits[0])) in CAT_CLASSES
    finally:
        client.close()


def test_maas_models_list(mesh):
    maas = [sys.executable, "-c", "import sys; from maas.cli import main; sys.argv[0] = 'maas'; main()"]
    r = subprocess.run(
        [*maas, "models", "list", "--registry", mesh.address("registry"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(models) == {"minilm", "efficientnet_lite0"}
    for m in models.values():
        assert any(a["name"] == "production" for a in m["aliases"])
        assert all(v["state"] == "VERSION_STATE_READY" for v in m["versions"])


def test_a_killed_container_comes_back_and_the_mesh_serves_with_no_version_lost(mesh):
    """Last here: the registry (SQLite on its claim), Triton (comes back empty, reloads from the
    repository) and the router, each SIGKILLed; restartPolicy brings each back."""
    before = versions(mesh)
    for component in ("registry", "triton", "router"):
        deployment = mesh.deployment(component)
        restarts = mesh.play.restarts(deployment)
        mesh.play.kill(deployment)
        deadline = time.monotonic() + 120
        while mesh.play.restarts(deployment) <= restarts:
            assert time.monotonic() < deadline, f"{component} was not restarted:\n{mesh.play.logs(deployment)}"
            time.sleep(0.5)
        mesh.play.wait_ready(deployment)
    mesh.wait_routable()
    assert versions(mesh) == before
    with MeshClient(mesh.address("router")) as client:
        summary: dict = {}
        demo_requests(client, summary)
        assert "cat" in summary["classify"]["top1"]
