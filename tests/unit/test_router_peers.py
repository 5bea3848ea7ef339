"""TritonPeer over a replica pool: spreading, and the retry rule (only calls that never left the router)."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.router.config import load_config
from services.router.peers import TritonPeer, raw_model_infer
from services.router.routing import ModelRoutes, RoutingTable, VersionInfo, ServingState
from services.shared.config import ConfigError, OutlierSettings, RetryBudgetSettings
from services.shared.errors import Unavailable
from services.shared.replica_pool import ReplicaPool
from tests.fixtures.replicas import eventually


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with its own name; or aborts with Triton's own UNAVAILABLE when told to, or
    with Triton's NOT_FOUND for a model it does not serve (restarted empty)."""

    def __init__(self, name: str, unavailable: bool = False, empty: bool = False):
        self.name, self.unavailable, self.empty, self.calls = name, unavailable, empty, 0

    async def ModelInfer(self, request, context):
        self.calls += 1
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is being unloaded")
        if self.empty:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}' is not found"
            )
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


async def peer_over(addresses: list[str], **pool_settings) -> TritonPeer:
    pool = ReplicaPool("test-triton", **pool_settings)
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
    table.replace_all(
        [
            ModelRoutes("m", {1: VersionInfo("m", 1), 2: VersionInfo("m", 2, ServingState.LOADING)}),
            ModelRoutes("n", {3: VersionInfo("n", 3)}),
        ],
        revision=1,
    )
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
    assert (discovery.mode, discovery.service, discovery.namespace) == (
        "endpointslices",
        "rel-triton-headless",
        "models",
    )
    monkeypatch.delenv("MAAS_TRITON_SERVICE")
    with pytest.raises(ConfigError, match="MAAS_TRITON_SERVICE"):
        load_config([])


def sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"pool": "test-triton"}) or 0.0


async def test_a_replica_failing_calls_in_a_row_is_ejected_then_probed_back(tritons):
    refusing, live = FakeTriton("refusing", unavailable=True), FakeTriton("live")
    addresses = await tritons(refusing, live)
    peer = await peer_over(addresses, outlier=OutlierSettings(consecutive_failures=3, base_ejection_seconds=0.2))
    ejections = sample("maas_replica_pool_ejections_total")
    try:
        failed = 0
        while not peer.pool.ejected():  # its own UNAVAILABLE: not retried, the caller sees it
            try:
                await peer.call("ModelInfer", infer_request(), 5)
            except Unavailable:
                failed += 1
        assert peer.pool.ejected() == {addresses[0]} and failed == 3 == refusing.calls
        assert sample("maas_replica_pool_ejections_total") == ejections + 1
        assert sample("maas_replica_pool_ejected_replicas") == 1
        answers = [(await peer.call("ModelInfer", infer_request(), 5)).id for _ in range(20)]
        assert answers == ["live"] * 20 and refusing.calls == 3

        refusing.unavailable = False  # healthy again: the probe after the ejection lets it back in
        await eventually(lambda: not peer.pool.ejected(), what="probed back")
        assert peer.pool.addresses == set(addresses)
        await eventually(lambda: _answered_by(peer, "refusing"), what="calls on it again")
    finally:
        await peer.pool.close()


async def _answered_by(peer: TritonPeer, name: str) -> bool:
    return (await peer.call("ModelInfer", infer_request(), 5)).id == name


async def test_the_last_replica_serving_is_never_ejected(tritons):
    refusing = FakeTriton("refusing", unavailable=True)
    peer = await peer_over(await tritons(refusing), outlier=OutlierSettings(consecutive_failures=2))
    try:
        for _ in range(10):
            with pytest.raises(Unavailable):
                await peer.call("ModelInfer", infer_request(), 5)
        assert not peer.pool.ejected() and refusing.calls == 10
    finally:
        await peer.pool.close()


async def test_a_replica_that_does_not_serve_the_version_is_retried_elsewhere(tritons):
    """Triton refused it before running it (NOT_FOUND, restarted empty): another replica may take it."""
    empty, live = FakeTriton("empty", empty=True), FakeTriton("live")
    addresses = await tritons(empty, live)
    peer = await peer_over(addresses, outlier=OutlierSettings(consecutive_failures=0))
    try:
        for replica in peer.pool.replicas():  # always pick the empty one first
            replica.inflight = 0 if replica.address == addresses[0] else 1000
        assert [(await peer.call("ModelInfer", infer_request(), 5)).id for _ in range(5)] == ["live"] * 5
        assert empty.calls == 5
        await peer.pool.set_replicas([addresses[0]])
        with pytest.raises(
            Unavailable,
            match=r"^Request for unknown model: 'm' version 1 is not at ready state "
            r"\(READY in the registry, \(re\)loading",
        ):
            await peer.call("ModelInfer", infer_request(), 5)
    finally:
        await peer.pool.close()


async def test_retries_stop_when_the_budget_is_spent(tritons):
    """Every replica refusing (restarted empty): only min_retries calls are retried (ratio 0), the rest
    fail at once, saying why. A call that never left (connect failure) costs no Triton and is not counted."""
    fakes = [FakeTriton("a", empty=True), FakeTriton("b", empty=True)]
    peer = await peer_over(
        await tritons(*fakes),
        outlier=OutlierSettings(consecutive_failures=0),
        retry_budget=RetryBudgetSettings(ratio=0.0, min_retries=3, window_seconds=600),
    )
    refusals, retries = (
        sample("maas_replica_pool_retry_budget_refusals_total"),
        sample("maas_replica_pool_retries_total"),
    )
    try:
        messages = []
        for _ in range(10):
            with pytest.raises(Unavailable) as failed:
                await peer.call("ModelInfer", infer_request(), 5)
            messages.append(failed.value.message)
    finally:
        await peer.pool.close()
    assert sample("maas_replica_pool_retries_total") - retries == 3
    assert sample("maas_replica_pool_retry_budget_refusals_total") - refusals == 7
    assert all(m.endswith("the retry budget is spent") for m in messages[3:]), messages
    assert not any("budget" in m for m in messages[:3]), messages


async def test_a_call_that_never_left_is_retried_whatever_the_budget(tritons):
    live = FakeTriton("live")
    peer = await peer_over(
        [*(await tritons(live)), await dead_address()],
        outlier=OutlierSettings(consecutive_failures=0),
        retry_budget=RetryBudgetSettings(ratio=0.0, min_retries=0, window_seconds=600),
    )
    try:
        assert [(await peer.call("ModelInfer", infer_request(), 5)).id for _ in range(20)] == ["live"] * 20
    finally:
        await peer.pool.close()
