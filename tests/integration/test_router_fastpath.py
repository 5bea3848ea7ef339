"""The router's OIP fast path (maas-oip-fastpath) in the real mesh: an unmodified
tritonclient on the router's fast port gets Triton's answers, the traffic policy holds, and what
the forwarder cannot settle is answered by the Python router exactly as on the main port."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from maas.registry_client import parse_target
from services.router.fastpath import find_binary
from tests.fixtures.mesh import register_tiny
from tests.integration.test_router_traffic import wait_for

TIMEOUT = 30
X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def fast(mesh):
    with grpcclient.InferenceServerClient(mesh.addresses["router_oip_fast"]) as client:
        yield client


def tiny_input(x: np.ndarray = X) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def answer(client, model: str, version: str = "", headers=None) -> tuple[str, float]:
    """(version that answered, the scale it applied: y = x * scale)."""
    result = client.infer(model, tiny_input(), model_version=version, client_timeout=TIMEOUT, headers=headers)
    return result.get_response().model_version, float(result.as_numpy("y")[0, 0])


def status_of(call) -> tuple[grpc.StatusCode | str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_the_binary_was_built():
    assert find_binary(), "build/bin/maas-oip-fastpath is missing: `make fastpath`"


def test_canary_split_explicit_versions_and_aliases(mesh, mesh_registry, fast, tmp_path):
    v1 = register_tiny(mesh_registry, "fast_tiny", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "fast_tiny", tmp_path, scale=2.0)
    mesh_registry.set_alias("fast_tiny", "production", v1)
    mesh_registry.set_alias("fast_tiny", "candidate", v2)
    mesh_registry.set_traffic("fast_tiny", [parse_target("production", 90), parse_target(str(v2), 10)])
    wait_for(lambda: {answer(fast, "fast_tiny")[0] for _ in range(30)} == {str(v1), str(v2)}, "the canary policy")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: answer(fast, "fast_tiny"), range(2000)))
    versions = Counter(version for version, _ in answers)
    assert 0.07 <= versions[str(v2)] / len(answers) <= 0.13, versions
    assert all(scale == {str(v1): 1.0, str(v2): 2.0}[version] for version, scale in answers)

    assert answer(fast, "fast_tiny", str(v2)) == (str(v2), 2.0)  # explicit version beats the policy
    assert answer(fast, "fast_tiny", "candidate") == (str(v2), 2.0)  # an alias as model_version
    # A routing key keeps each key on one version, the same one on both ports (one routing spec).
    keyed = {
        key: {answer(fast, "fast_tiny", headers={"x-maas-routing-key": key})[0] for _ in range(3)}
        for key in (f"user-{i}" for i in range(40))
    }
    assert all(len(seen) == 1 for seen in keyed.values()) and len(set().union(*keyed.values())) == 2
    with grpcclient.InferenceServerClient(mesh.router_address) as main:
        on_main = {key: {answer(main, "fast_tiny", headers={"x-maas-routing-key": key})[0]} for key in keyed}
    assert on_main == keyed


def test_what_the_forwarder_cannot_settle_is_answered_like_the_main_port(mesh, mesh_registry, fast, tmp_path):
    register_tiny(mesh_registry, "fast_errors", tmp_path, scale=3.0)
    wait_for(lambda: fast.is_model_ready("fast_errors"), "fast_errors routable")
    with grpcclient.InferenceServerClient(mesh.router_address) as main:
        for version in ("", "77", "no_such_alias"):
            model = "no_such_model" if not version else "fast_errors"
            on_fast = status_of(lambda: fast.infer(model, tiny_input(), model_version=version, client_timeout=TIMEOUT))
            on_main = status_of(lambda: main.infer(model, tiny_input(), model_version=version, client_timeout=TIMEOUT))
            assert on_fast == on_main and on_fast[0] == "StatusCode.NOT_FOUND", (on_fast, on_main)
        # Readiness and metadata are forwarded to the Python router too.
        assert fast.is_server_ready() and fast.is_model_ready("fast_errors")
        assert not fast.is_model_ready("fast_errors", "77")
        assert fast.get_model_metadata("fast_errors", as_json=True)["inputs"][0]["name"] == "x"
    # Streaming inference is the main port's: the fast path refuses it, pointing there.
    with grpc.insecure_channel(mesh.addresses["router_oip_fast"]) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(iter([b""]), timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            list(stream)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and "main port" in refused.value.details()
    # Bad tensors are Triton's to refuse, with its own status, through the fast path.
    code, message = status_of(
        lambda: fast.infer("fast_errors", tiny_input(np.ones((1, 5), np.float32)), client_timeout=TIMEOUT)
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "x" in message


def test_fast_path_calls_reach_the_router_metrics(mesh, fast, mesh_registry, tmp_path):
    register_tiny(mesh_registry, "fast_metrics", tmp_path, scale=1.0)
    wait_for(lambda: fast.is_model_ready("fast_metrics"), "fast_metrics routable")

    def metric(prefix: str, *labels: str) -> float:
        with urllib.request.urlopen(f"http://{mesh.addresses['router_metrics']}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        return sum(
            float(line.split()[-1])
            for line in lines
            if line.startswith(prefix + "{") and all(label in line for label in labels)
        )

    timed = ("maas_rpc_server_duration_seconds_count", 'service="router"', 'method="ModelInfer"')
    timed_before = metric(*timed)
    for _ in range(5):
        answer(fast, "fast_metrics")
    wait_for(
        lambda: (
            metric("maas_rpc_server_requests_total", 'method="ModelInfer"', 'model="fast_metrics"', 'code="OK"') >= 5
            and metric(*timed) >= timed_before + 5
        ),
        "fast path request counts and durations in the router's metrics",
        timeout=10,
    )


def test_the_forwarder_exits_when_its_router_goes_away(tmp_path):
    """Its stdin is the router's pipe: when the router dies, however it dies, the forwarder stops."""
    process = subprocess.Popen(
        [find_binary(), "--listen", "127.0.0.1:0", "--fallback", "127.0.0.1:1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith("listening\t")
        process.stdin.close()
        started = time.monotonic()
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        process.kill()
        process.wait()


async def test_deadline_and_cancellation_reach_triton_through_the_forwarder():
    """The in-process router of tests/unit/test_router_service.py (fake Triton whose "slow" model
    notices cancellation), with its fast path started."""
    import asyncio

    import tritonclient.grpc.aio as triton_aio

    from maas.local.processes import free_ports
    from tests.unit.test_router_service import Mesh

    fast_address = f"127.0.0.1:{free_ports(1)[0]}"
    mesh = await Mesh().start(oip_fast_listen=fast_address, oip_fast_binary=find_binary())
    try:
        await mesh.synced()
        client = triton_aio.InferenceServerClient(fast_address)
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        response = await client.infer("tiny", [inp], model_version="canary", client_timeout=5)
        assert response.get_response().model_version == "2"  # the alias, resolved by the forwarder
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            await client.infer("slow", [inp], client_timeout=0.3)
        assert "DEADLINE_EXCEEDED" in str(err.value.status()) and time.monotonic() - started < 1.5
        await asyncio.wait_for(mesh.triton.cancelled.wait(), 2)  # Triton saw the call end too
        assert mesh.triton.calls[-1][:2] == ("slow", "1")  # sent by the forwarder, version from the table
        await client.close()
    finally:
        await mesh.stop()


async def test_fast_path_calls_are_counted_once_in_the_router_metrics(monkeypatch):
    """maas_router_inflight_requests (the HPA's signal) counts a call the forwarder hands to the main
    port once, not by both; maas_router_requests_total counts the calls the forwarder sends to Triton."""
    import asyncio

    import tritonclient.grpc.aio as triton_aio
    from prometheus_client import REGISTRY

    from maas.local.processes import free_ports
    from services.router.fastpath import FastPath
    from services.router.version_stats import LATENCY_BOUNDS_MS
    from tests.unit.test_router_service import Mesh

    reports: list[int] = []
    report = FastPath._report_inflight
    monkeypatch.setattr(FastPath, "_report_inflight", lambda self, n: (reports.append(n), report(self, n))[1])

    def sample(name: str, labels: dict | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0

    async def until(predicate, what: str) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(what)

    fast_address = f"127.0.0.1:{free_ports(1)[0]}"
    mesh = await Mesh().start(oip_fast_listen=fast_address, oip_fast_binary=find_binary())
    client = triton_aio.InferenceServerClient(fast_address)
    slow_calls = []
    try:
        await mesh.synced()
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        alias = {"model": "tiny", "version": "2", "route": "alias"}
        before = sample("maas_router_requests_total", alias)
        await client.infer("tiny", [inp], model_version="canary", client_timeout=5)
        await until(
            lambda: sample("maas_router_requests_total", alias) == before + 1,
            "the forwarder's call in maas_router_requests_total",
        )

        def reported(model: str, version: int) -> list:
            return [s for s in mesh.registry.version_stats if (s.model, s.version) == (model, version)]

        # ... and in the per-version figures the registry's rollout analysis reads (ReportVersionStats):
        # one request, answered, timed by the forwarder in the version's latency histogram.
        await until(
            lambda: (
                sum(s.requests for s in reported("tiny", 2)) == 1
                and sum(sum(s.latency_counts) for s in reported("tiny", 2)) == 1
            ),
            "the forwarder's call and its latency reported",
        )
        assert not any(s.errors for s in reported("tiny", 2))
        assert all(tuple(s.latency_bounds_ms) == LATENCY_BOUNDS_MS for s in reported("tiny", 2))

        assert sample("maas_router_inflight_requests") == 0
        at_triton = len(mesh.triton.calls)
        for headers in ({"x-maas-routing-key": "user-1"}, None):  # the main port's call, then the forwarder's
            slow_calls.append(asyncio.ensure_future(client.infer("slow", [inp], headers=headers, client_timeout=20)))
            await until(lambda: len(mesh.triton.calls) == at_triton + len(slow_calls), "the slow call at Triton")
        reported = len(reports)
        await until(lambda: len(reports) > reported, "a report of the forwarder's in-flight calls")
        assert sample("maas_router_inflight_requests") == 2
    finally:
        for call in slow_calls:
            call.cancel()
        await asyncio.gather(*slow_calls, return_exceptions=True)
        await client.close()
        await mesh.stop()
