"""TritonPeer over a replica pool: spreading, and the retry rule (only calls that never left the router)."""
from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.router.config import load_config
from services.router.peers import TritonPeer, raw_model_infer
from services.router.routing import ModelRoutes, RoutingTable, VersionInfo, VersionState
from services.shared.config import ConfigError
from services.shared.errors import Unavailable
from services.shared.replica_pool import ReplicaPool


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with its own name; or aborts with Triton's own UNAVAILABLE when told to."""

    def __init__(self, name: str, unavailable: bool = False):
        self.name, self.unavailable, self.calls = name, unavailable, 0

    async def ModelInfer(self, request, context):
        self.calls += 1
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is being unloaded")
        return service_pb2.ModelInferResponse(model_name=request.model_name, id=self.name)


@pytest.fixture
async def tritons():
    """start(*fakes) -> their addresses; plus a free port where nothing listens (a dead replica)."""
    servers = []

    async def start(*fakes: FakeTriton) -> list[str]:
        addresses = []
        for fake in fakes:
            server = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            addresses.append(f"127.0.0.1:{port}")
        return addresses

    try:
        yield start
    finally:
        for server in servers:
            await server.stop(0)


async def dead_address() -> str:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(0)  # the port was free a moment ago and nothing listens now
    return f"127.0.0.1:{port}"


async def peer_over(addresses: list[str]) -> TritonPeer:
    pool = ReplicaPool("test-triton")
    await pool.set_replicas(addresses)
    return TritonPeer(pool)


def infer_request() -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name="m", model_version="1")


async def test_calls_spread_over_every_replica(tritons):
    fakes = [FakeTriton("a"), FakeTriton("b")]
    peer = await peer_over(await tritons(*fakes))
    try:
        answers = [(await peer.call("ModelInfer", infer_request(), 5)).id for _ in range(40)]
        raw = await peer.infer_raw(infer_request().SerializeToString(), 5)
    finally:
        await peer.pool.close()
    assert set(answers) == {"a", "b"} and sum(f.calls for f in fakes) == 41
    assert service_pb2.ModelInferResponse.FromString(raw).model_name == "m"


async def test_a_call_that_could_not_connect_is_retried_on_another_replica(tritons):
    live = FakeTriton("live")
    peer = await peer_over([*(await tritons(live)), await dead_address()])
    try:
        answers = [(await peer.call("ModelInfer", infer_request(), 5)).id for _ in range(20)]
    finally:
        await peer.pool.close()
    assert answers == ["live"] * 20 and live.calls == 20


async def test_an_unavailable_answer_from_triton_itself_is_not_retried(tritons):
    """The request reached Triton (maybe its model): running it again elsewhere could run it twice."""
    refusing, live = FakeTriton("refusing", unavailable=True), FakeTriton("live")
    addresses = await tritons(refusing, live)
    peer = await peer_over(addresses)
    try:
        for replica in peer.pool.replicas():  # always pick the refusing one first
            replica.inflight = 0 if replica.address == addresses[0] else 1000
        with pytest.raises(Unavailable, match=rf"Triton \({addresses[0]}\) is unavailable: model is being unloaded"):
            await peer.call("ModelInfer", infer_request(), 5)
    finally:
        await peer.pool.close()
    assert (refusing.calls, live.calls) == (1, 0)


async def test_every_replica_down_is_unavailable_naming_one(tritons):
    dead = [await dead_address(), await dead_address()]
    peer = await peer_over(dead)
    try:
        with pytest.raises(Unavailable, match=r"Triton \(127\.0\.0\.1:\d+\) is unavailable: failed to connect"):
            await peer.infer_raw(b"", 5)
        await peer.pool.set_replicas([])
        with pytest.raises(Unavailable, match="no test-triton replica is ready"):
            await peer.infer_raw(b"", 5)
    finally:
        await peer.pool.close()


async def test_no_retry_once_the_deadline_is_spent(tritons, monkeypatch):
    live, dead = FakeTriton("live"), await dead_address()
    peer = await peer_over([*(await tritons(live)), dead])
    try:
        for replica in peer.pool.replicas():  # the dead one first
            replica.inflight = 0 if replica.address == dead else 1000
        clock = iter([100.0, 200.0])  # the failed attempt "took" 100 s of a 5 s budget
        monkeypatch.setattr("services.router.peers.monotonic", lambda: next(clock))
        with pytest.raises(Unavailable, match=rf"Triton \({dead}\)"):
            await peer.call("ModelInfer", infer_request(), 5)
    finally:
        await peer.pool.close()
    assert live.calls == 0


async def test_stubs_are_built_once_per_replica(tritons):
    peer = await peer_over(await tritons(FakeTriton("a")))
    try:
        replica = peer.pool.replicas()[0]
        assert replica.stub(raw_model_infer) is replica.stub(raw_model_infer)
    finally:
        await peer.pool.close()


def test_ready_versions_are_what_a_new_replica_must_serve():
    table = RoutingTable()
    table.replace_all([ModelRoutes("m", {1: VersionInfo("m", 1), 2: VersionInfo("m", 2, VersionState.LOADING)}),
                       ModelRoutes("n", {3: VersionInfo("n", 3)})], revision=1)
    assert table.ready_versions() == {("m", "1"), ("n", "3")}


def test_static_and_discovered_triton_replicas_config(monkeypatch):
    cfg = load_config(["--triton", "a:8001, b:8001"])
    assert cfg.triton_discovery().static_addresses == ("a:8001", "b:8001")
    with pytest.raises(ConfigError, match="--triton"):
        load_config(["--triton", "a:8001,nope"])
    monkeypatch.setenv("MAAS_TRITON_DISCOVERY", "endpointslices")
    monkeypatch.setenv("MAAS_TRITON_SERVICE", "rel-triton-headless")
    monkeypatch.setenv("MAAS_NAMESPACE", "models")
    discovery = load_config([]).triton_discovery()
    assert (discovery.mode, discovery.service, discovery.namespace) == ("endpointslices", "rel-triton-headless",
                                                                        "models")
    monkeypatch.delenv("MAAS_TRITON_SERVICE")
    with pytest.raises(ConfigError, match="MAAS_TRITON_SERVICE"):
        load_config([])
