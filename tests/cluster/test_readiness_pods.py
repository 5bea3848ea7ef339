"""A wrong value in the chart (a Triton address that does not resolve) leaves the router pod running
- startup and liveness probes pass, no restart - but failing its readiness probe, with the reason in
its log; the right value brings it back ready. Runs after test_chart_pods.py on the same mesh and
leaves it as it found it. Run with `make cluster-test` (-m cluster)."""

from __future__ import annotations

import time

import pytest

from tools import podman_kube as pk

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
WRONG = "ct-wrong-triton:8001"


def deployment(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def test_a_wrong_triton_address_makes_the_router_unready_with_the_reason_not_restarted(mesh):
    router = mesh.deployment("router")
    good = deployment(mesh.docs, router)
    bad = deployment(pk.render("ct", pk.VALUES, *mesh.sets, f"triton.discovery.addresses={{{WRONG}}}"), router)
    env = {e["name"]: e.get("value") for e in bad["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MAAS_TRITON_ADDRESS"] == WRONG
    try:
        mesh.play.replay(bad)
        startup = bad["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        while not mesh.play.probe(router, "startupProbe"):  # it starts: no restart loop
            assert time.monotonic() < deadline, mesh.play.logs(router)
            time.sleep(0.25)
        line = f"not ready: Triton at {WRONG} unreachable"
        deadline = time.monotonic() + 60
        while line not in mesh.play.logs(router, tail=200):
            assert time.monotonic() < deadline, mesh.play.logs(router)
            time.sleep(0.5)
        assert not mesh.play.probe(router, "readinessProbe"), mesh.play.logs(router)
        assert mesh.play.probe(router, "livenessProbe"), mesh.play.logs(router)
        assert mesh.play.restarts(router) == 0
    finally:
        mesh.play.replay(good)
        mesh.play.wait_ready(router)
        mesh.wait_routable()
    assert mesh.play.probe(router, "readinessProbe")
