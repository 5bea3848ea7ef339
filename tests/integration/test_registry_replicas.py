"""The registry keeps every Triton replica on the live versions, with replicas found through EndpointSlices
(the fake Kubernetes API announcing real Triton processes), including replicas that join mid-load, no
replica at all, and replicas started with `--load-model=*` on the repository the registry writes.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc
from services.shared.discovery import DiscoveryConfig, TritonReplicaWatcher
from services.shared.model_repository import read_model_config
from tests.fixtures.registry import (
    MINILM_ONNX,
    header,
    registry_config,
    tiny_onnx,
    triton_versions,
    upload_messages,
    wait_state,
)
from tests.fixtures.replicas import NS, SERVICE, WAIT, announce, eventually


@pytest.fixture
def repository(tmp_path):
    path = tmp_path / "repository"
    path.mkdir()
    return path


@pytest.fixture
def tritons(repository, tmp_path):
    """start(name, load_all=False) -> a real Triton on the shared repository; all stopped at the end."""
    started: list[LocalTriton] = []

    def start(name: str, load_all: bool = False) -> LocalTriton:
        # As an extra argument: LocalTriton would wait for a model named "*" to be ready.
        triton = LocalTriton(
            TritonConfig(
                model_repository=repository,
                work_dir=tmp_path / f"triton-{name}",
                extra_args=["--load-model=*"] if load_all else [],
            )
        )
        started.append(triton)
        triton.start()
        return triton

    try:
        yield start
    finally:
        for triton in started:
            triton.stop()


@pytest.fixture
async def registry(fake_kube, repository, tmp_path):
    """A registry whose Triton replicas come from the fake EndpointSlices (no static address at all)."""
    from services.registry.server import create_server

    cfg = registry_config(
        repository,
        tmp_path / "registry.sqlite3",
        "127.0.0.1:1",
        discovery=DiscoveryConfig(mode="endpointslices", service=SERVICE, namespace=NS),
        reconcile_interval_seconds=0,
    )  # no watchdog: it would hide a missed catch-up
    watcher = TritonReplicaWatcher(
        SERVICE, NS, api_client=fake_kube.api_client(), backoff_initial_seconds=0.05, backoff_max_seconds=0.5
    )
    server, port = create_server(cfg, replica_source=watcher)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    server.stub = registry_pb2_grpc.RegistryStub(channel)
    try:
        yield server
    finally:
        await channel.close()
        await server.stop(0)


async def register(stub, model: str, data: bytes) -> int:
    return (await stub.RegisterVersion(upload_messages(header(model, data), data))).version


def disk_versions(repository, model: str) -> list[int]:
    """The version policy of <model>/config.pbtxt as a replica started now would read it."""
    return list(read_model_config(repository / model / "config.pbtxt").version_policy.specific.versions)


async def test_replica_joining_mid_load_gets_the_version_being_loaded(fake_kube, tritons, registry, repository):
    """B joins while v2 loads (minilm takes seconds): v2 must end up on B too, and v2's warm-up must not run
    on B before B has it (which would fail the version for no real reason)."""
    a, b = tritons("a"), tritons("b")
    announce(fake_kube, "triton-a", a)
    await eventually(lambda: registry.registry.fleet.addresses == [a.grpc_address], what="a joins")
    data = MINILM_ONNX.read_bytes()
    v1 = await wait_state(registry.stub, "minilm", await register(registry.stub, "minilm", data))
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason

    v2 = await register(registry.stub, "minilm", data)
    await eventually(lambda: registry.registry.get_version("minilm", v2).state.value == "loading", what="v2 loading")
    await asyncio.sleep(0.2)
    announce(fake_kube, "triton-b", b)
    await eventually(lambda: b.grpc_address in registry.registry.fleet.members, what="b joins")
    assert registry.registry.get_version("minilm", v2).state.value == "loading"  # really joined mid-load
    assert b.grpc_address not in registry.registry.fleet.addresses  # not caught up yet

    done = await wait_state(registry.stub, "minilm", v2)
    assert done.state == pb.VERSION_STATE_READY, done.state_reason
    await registry.registry.wait_idle()
    await eventually(lambda: b.grpc_address in registry.registry.fleet.addresses, what="b caught up")
    assert await triton_versions(a, "minilm") == {1, 2}
    assert await triton_versions(b, "minilm") == {1, 2}
    assert disk_versions(repository, "minilm") == [1, 2]


async def test_new_model_registered_while_a_replica_catches_up_is_loaded_on_it(fake_kube, tritons, registry):
    """B joins and spends seconds loading minilm; meanwhile a new model registers. Before the fix B was not
    in the fleet yet, so tiny loaded on A only, then tiny's warm-up ran on B (which had joined meanwhile)
    and failed the version ("unknown model"), or tiny ended READY without ever reaching B."""
    a, b = tritons("a"), tritons("b")
    announce(fake_kube, "triton-a", a)
    await eventually(lambda: registry.registry.fleet.addresses == [a.grpc_address], what="a joins")
    data = MINILM_ONNX.read_bytes()
    v1 = await wait_state(registry.stub, "minilm", await register(registry.stub, "minilm", data))
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason

    announce(fake_kube, "triton-b", b)
    await eventually(lambda: "minilm" in registry.registry.fleet.behind(b.grpc_address), what="b catching up")
    await asyncio.sleep(0.2)
    tiny = await wait_state(registry.stub, "tiny", await register(registry.stub, "tiny", tiny_onnx(2.0)))
    assert tiny.state == pb.VERSION_STATE_READY, tiny.state_reason
    await eventually(lambda: b.grpc_address in registry.registry.fleet.addresses, what="b caught up")
    await registry.registry.wait_idle()
    for triton in (a, b):
        assert await triton_versions(triton, "tiny") == {tiny.version}
        assert await triton_versions(triton, "minilm") == {1}


async def test_no_replica_keeps_the_version_registered_until_one_joins(fake_kube, tritons, registry, repository):
    """With no Triton replica, READY would be a lie: the version waits, and loads when a replica appears."""
    assert registry.registry.fleet.addresses == []
    number = await register(registry.stub, "tiny", tiny_onnx(2.0))
    await registry.registry.wait_idle()
    version = await registry.stub.GetVersion(pb.GetVersionRequest(model="tiny", version=number))
    assert version.state == pb.VERSION_STATE_REGISTERED and "waiting for a Triton replica" in version.state_reason

    a = tritons("a")
    announce(fake_kube, "triton-a", a)
    version = await wait_state(registry.stub, "tiny", number, timeout=WAIT)
    assert version.state == pb.VERSION_STATE_READY, version.state_reason
    assert await triton_versions(a, "tiny") == {number}
    assert disk_versions(repository, "tiny") == [number]


async def test_replica_started_with_load_all_comes_up_with_exactly_the_live_versions(
    fake_kube, tritons, registry, repository
):
    """What a new pod of the chart does (`--load-model=*` on the shared volume): it must start at all (no
    staging folder or half-made model at the repository root) and serve exactly the live versions."""
    a = tritons("a")
    announce(fake_kube, "triton-a", a)
    await eventually(lambda: registry.registry.fleet.addresses == [a.grpc_address], what="a joins")
    numbers = [await register(registry.stub, "tiny", tiny_onnx(float(s))) for s in (2, 3, 4)]
    for n in numbers:
        assert (await wait_state(registry.stub, "tiny", n)).state == pb.VERSION_STATE_READY
    await registry.stub.ArchiveVersion(pb.ArchiveVersionRequest(model="tiny", version=numbers[0]))
    # A failed upload of a new model leaves nothing behind at the root either.
    junk = b"\x08\x07" + b"junk" * 50
    with pytest.raises(grpc.aio.AioRpcError):
        await register(registry.stub, "broken", junk)
    assert sorted(p.name for p in repository.iterdir()) == ["tiny"]
    assert disk_versions(repository, "tiny") == numbers[1:]

    c = tritons("c", load_all=True)  # raises if Triton cannot load the whole repository
    assert await triton_versions(c, "tiny") == set(numbers[1:])
    announce(fake_kube, "triton-c", c)
    await eventually(lambda: c.grpc_address in registry.registry.fleet.addresses, what="c joins, caught up")
    assert await triton_versions(c, "tiny") == set(numbers[1:])
