"""Triton replicas found through EndpointSlices: the fake Kubernetes API announces real Triton processes.

Each replica gets a slice of its own because the local Tritons share one IP and differ by port (in a
cluster they share the port and differ by pod IP; the watcher handles both).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from services.shared.discovery import TritonReplicaWatcher
from services.shared.replica_pool import ReplicaPool, triton_admission
from tests.fixtures.replicas import NS, SERVICE, WAIT, announce, eventually, inference_count
from tests.fixtures.registry import (
    header,
    tiny_onnx,
    triton_versions,
    upload_messages,
    wait_state,
)


async def all_live(addresses) -> bool:
    """Every address is a Triton answering on gRPC (not just a string the watcher made up)."""
    for address in addresses:
        client = triton_aio.InferenceServerClient(address)
        try:
            if not await client.is_server_ready():
                return False
        finally:
            await client.close()
    return True


@pytest.fixture
def two_tritons(tmp_path):
    """Two real Tritons, no models loaded, sharing one (empty) model repository like pods share a volume."""
    repository = tmp_path / "repository"
    repository.mkdir()
    replicas = [
        LocalTriton(TritonConfig(model_repository=repository, work_dir=tmp_path / f"triton-{i}")) for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.start()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


@pytest.fixture
async def watcher(fake_kube):
    started: list[TritonReplicaWatcher] = []

    async def start(on_change) -> TritonReplicaWatcher:
        w = TritonReplicaWatcher(
            SERVICE, NS, api_client=fake_kube.api_client(), backoff_initial_seconds=0.05, backoff_max_seconds=0.5
        )
        started.append(w)
        await w.start(on_change)
        return w

    try:
        yield start
    finally:
        for w in started:
            await w.stop()


async def test_watcher_follows_real_triton_replicas(fake_kube, two_tritons, watcher):
    a, b = two_tritons
    seen: list[frozenset[str]] = []
    announce(fake_kube, "triton-a", a)
    w = await watcher(seen.append)
    assert await w.wait_synced(WAIT) == {a.grpc_address}
    assert await all_live(w.addresses)

    announce(fake_kube, "triton-b", b, ready=False)  # starting: not routed to, not loaded on
    await asyncio.sleep(0.3)
    assert w.addresses == {a.grpc_address}
    announce(fake_kube, "triton-b", b, ready=True)
    await eventually(lambda: w.addresses == {a.grpc_address, b.grpc_address}, what="b joins")
    assert await all_live(w.addresses)

    a.stop()  # the pod dies; its slice goes away
    fake_kube.delete_slice(NS, "triton-a")
    await eventually(lambda: w.addresses == {b.grpc_address}, what="a leaves")
    assert await all_live(w.addresses)

    fake_kube.expire_history()  # 410 Gone: re-list gives the same answer
    fake_kube.wait_for(lambda k: len(k.lists()) == 2)
    await eventually(lambda: seen[-1] == {b.grpc_address}, what="delivered")
    assert seen == [{a.grpc_address}, {a.grpc_address, b.grpc_address}, {b.grpc_address}]


async def test_version_registered_before_a_replica_appears_is_loaded_on_it(
    fake_kube, start_registry, watcher, tmp_path
):
    """The registry's Triton fleet follows the watcher: a replica that appears later first loads every
    live version, and a replica that leaves stops getting loads."""
    env = await start_registry()
    first = env.triton
    announce(fake_kube, "triton-a", first)
    w = await watcher(lambda addresses: env.registry.set_triton_replicas(sorted(addresses)))
    await w.wait_synced(WAIT)
    assert env.registry.fleet.addresses == [first.grpc_address]

    data = tiny_onnx(2.0)
    v1 = await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))
    v1 = await wait_state(env.stub, "tiny", v1.version)
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason
    assert await triton_versions(first, "tiny") == {v1.version}

    # A second replica on the same repository (a new pod on the shared volume), started with nothing loaded.
    with LocalTriton(TritonConfig(model_repository=env.repository, work_dir=tmp_path / "triton-b")) as second:
        assert await triton_versions(second, "tiny") == set()
        announce(fake_kube, "triton-b", second)
        await eventually(lambda: second.grpc_address in env.registry.fleet.addresses, what="b joins the fleet")
        assert await triton_versions(second, "tiny") == {v1.version}
        client = triton_aio.InferenceServerClient(second.grpc_address)
        try:
            assert await client.is_model_ready("tiny", str(v1.version))
        finally:
            await client.close()

        # The first replica goes away: the next version loads on the second only, without errors.
        fake_kube.delete_slice(NS, "triton-a")
        await eventually(lambda: env.registry.fleet.addresses == [second.grpc_address], what="a leaves the fleet")
        data2 = tiny_onnx(3.0)
        v2 = await env.stub.RegisterVersion(upload_messages(header("tiny", data2), data2))
        v2 = await wait_state(env.stub, "tiny", v2.version)
        assert v2.state == pb.VERSION_STATE_READY, v2.state_reason
        assert await triton_versions(second, "tiny") == {v1.version, v2.version}
        assert await triton_versions(first, "tiny") == {v1.version}


async def infer_tiny(pool: ReplicaPool, version: str = "1") -> str:
    """One ModelInfer on the replica the pool picks; returns that replica's address."""
    request = service_pb2.ModelInferRequest(model_name="tiny", model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    with pool.lease() as replica:
        response = await replica.stub(service_pb2_grpc.GRPCInferenceServiceStub).ModelInfer(request, timeout=30)
    assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist() == [0.0, 2.0, 4.0, 6.0]
    return replica.address


async def test_calls_spread_over_the_replicas_that_serve_the_live_versions(
    fake_kube, start_registry, watcher, tmp_path
):
    """What the router does: a pool fed by the watcher, admitting a replica once the live versions are
    loaded there (by the registry), then spreading calls over every admitted replica."""
    env = await start_registry()
    first = env.triton
    data = tiny_onnx(2.0)
    v1 = await wait_state(
        env.stub, "tiny", (await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))).version
    )
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason

    pool = ReplicaPool("triton", admit=triton_admission(lambda: {("tiny", "1")}), admit_interval=0.05)
    try:
        with LocalTriton(TritonConfig(model_repository=env.repository, work_dir=tmp_path / "triton-b")) as second:
            announce(fake_kube, "triton-a", first)
            announce(fake_kube, "triton-b", second)
            await (await watcher(pool.set_replicas)).wait_synced(WAIT)
            await eventually(lambda: pool.addresses == {first.grpc_address}, what="a admitted")
            await asyncio.sleep(0.3)
            assert pool.addresses == {first.grpc_address}  # b is up but has no tiny yet: not used
            assert {await infer_tiny(pool) for _ in range(10)} == {first.grpc_address}

            # The registry (following the same slices) loads the live versions on b; then b serves too.
            await env.registry.set_triton_replicas([first.grpc_address, second.grpc_address])
            await eventually(lambda: pool.addresses == {first.grpc_address, second.grpc_address}, what="b admitted")
            before = {t.grpc_address: await inference_count(t, "tiny") for t in (first, second)}
            used = [await infer_tiny(pool) for _ in range(40)]
            expected = {a: before[a] + used.count(a) for a in before}

            async def counted():  # Triton updates its statistics just after it answers: poll briefly
                return {t.grpc_address: await inference_count(t, "tiny") for t in (first, second)} == expected

            # Triton's own statistics agree with the pool: both replicas served calls.
            await eventually(counted, timeout=5, what=f"Triton's inference counts reach {expected}")
            assert all(used.count(a) > 0 for a in expected)

            fake_kube.delete_slice(NS, "triton-b")  # b is going away: no new calls
            await eventually(lambda: pool.addresses == {first.grpc_address}, what="b retired")
            assert {await infer_tiny(pool) for _ in range(5)} == {first.grpc_address}
    finally:
        await pool.close()
