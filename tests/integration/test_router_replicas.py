"""The router spreads requests over every ready Triton replica the EndpointSlices announce, on its
main port and on its OIP fast path alike.

Two real Tritons on one model repository (like pods on a shared volume), the registry loading the
tiny model on both, the fake Kubernetes API announcing them, and a real router in between. Which
replica served is read from Triton's own statistics, never from the router.

Triton's backends send the responses of a batch before they count it in the statistics, so a reading
taken right after the last answer can miss a batch still being counted (it then lands in the next
reading: "44 inferences for 40 requests" under CPU load). Readings are therefore taken once every
request sent so far is counted (Ledger.settled), and a count over the requests sent fails at once:
a request executed twice would show as exactly that.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from maas.local.processes import free_ports
from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from services.router.config import RouterConfig
from services.router.fastpath import find_binary
from services.router.server import create_server
from services.shared.config import ServerSettings
from services.shared.discovery import TritonReplicaWatcher
from tests.fixtures.registry import header, tiny_onnx, triton_versions, upload_messages, wait_state
from tests.fixtures.replicas import NS, SERVICE, announce, eventually, inference_count

BATCH = 40
X = np.arange(4, dtype=np.float32).reshape(1, 4)


async def counts(*tritons: LocalTriton) -> list[int]:
    return [await inference_count(t, "tiny") for t in tritons]


class Ledger:
    """Every request the test sent through the router, to read Triton's counts once they include them."""

    def __init__(self, tritons: list[LocalTriton], origin: int):
        self.tritons, self.origin, self.sent = tritons, origin, 0

    async def settled(self) -> list[int]:
        """Each replica's count, once their sum accounts for every request sent (never more)."""
        now: list[int] = []

        async def accounted() -> bool:
            now[:] = await counts(*self.tritons)
            executed = sum(now) - self.origin
            assert executed <= self.sent, f"{executed} inferences executed for {self.sent} requests sent"
            return executed == self.sent

        await eventually(accounted, what="Triton's statistics to count every request sent")
        return now

    async def send(self, client: triton_aio.InferenceServerClient, n: int = BATCH) -> None:
        await send(client, n)
        self.sent += n


async def send(client: triton_aio.InferenceServerClient, n: int = BATCH) -> None:
    """n requests through the router, 8 at a time; every one must succeed with y = 2x."""
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    semaphore = asyncio.Semaphore(8)

    async def one():
        async with semaphore:
            result = await client.infer("tiny", [inp], client_timeout=30)
        np.testing.assert_array_equal(result.as_numpy("y"), X * 2)

    await asyncio.gather(*(one() for _ in range(n)))


@pytest.fixture(params=["main port", "fast path"])
async def router(fake_kube, start_registry, request):
    """start(registry_env) -> OIP address of a router whose Triton replicas come from the fake API's
    slices: its main port, or its fast path (maas-oip-fastpath)."""
    started = []
    fast_address = f"127.0.0.1:{free_ports(1)[0]}" if request.param == "fast path" else ""

    async def start(env) -> str:
        source = TritonReplicaWatcher(
            SERVICE, NS, api_client=fake_kube.api_client(), backoff_initial_seconds=0.05, backoff_max_seconds=0.5
        )
        cfg = RouterConfig(
            server=ServerSettings(service_name="router", listen="127.0.0.1:0", grace_seconds=0.5, workers=1),
            registry=env.address,
            tokenizer="127.0.0.1:1",
            vision="127.0.0.1:1",
            triton="127.0.0.1:1",
            default_timeout=10.0,
            oip_fast_listen=fast_address,
            oip_fast_binary=find_binary() if fast_address else "",
        )
        server, port = create_server(cfg, triton_source=source)
        started.append(server)
        await server.start()
        return fast_address or f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        for server in started:
            await server.stop(0)


async def test_router_spreads_over_the_announced_replicas_and_follows_them(fake_kube, start_registry, router, tmp_path):
    env = await start_registry()
    a = env.triton
    data = tiny_onnx(2.0)
    v1 = await wait_state(
        env.stub, "tiny", (await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))).version
    )
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason

    with LocalTriton(TritonConfig(model_repository=env.repository, work_dir=tmp_path / "triton-b")) as b:
        await env.registry.set_triton_replicas([a.grpc_address, b.grpc_address])  # loads tiny on b too
        assert await triton_versions(b, "tiny") == {v1.version}
        announce(fake_kube, "triton-a", a)
        announce(fake_kube, "triton-b", b)
        client = triton_aio.InferenceServerClient(await router(env))
        try:
            # Ready once the routing state arrived and a replica serving its READY versions was admitted.
            await eventually(client.is_server_ready, what="router ready")
            # Both replicas admitted: both get calls (no request may fail from here on).
            start = await counts(a, b)  # the registry's warm-ups were answered long before
            ledger = Ledger([a, b], sum(start))

            async def both_used() -> bool:
                await ledger.send(client, 10)
                now = await ledger.settled()
                return all(n > s for n, s in zip(now, start))

            await eventually(both_used, what="both replicas serving")

            before = await ledger.settled()
            await ledger.send(client)
            after = await ledger.settled()
            grown = [n - s for n, s in zip(after, before)]
            assert sum(grown) == BATCH and all(g > 0 for g in grown), grown

            # b leaves the slices (still running: draining pod): all traffic goes to a, none fails.
            fake_kube.delete_slice(NS, "triton-b")

            async def only_a() -> bool:
                b_before = (await ledger.settled())[1]
                await ledger.send(client, 20)
                return (await ledger.settled())[1] == b_before

            await eventually(only_a, what="b retired")
            before = await ledger.settled()
            await ledger.send(client)
            after = await ledger.settled()
            assert [n - s for n, s in zip(after, before)] == [BATCH, 0]

            # b comes back: it is used again.
            announce(fake_kube, "triton-b", b)
            b_back = (await ledger.settled())[1]

            async def b_used() -> bool:
                await ledger.send(client, 20)
                return (await ledger.settled())[1] > b_back

            await eventually(b_used, what="b used again")

            # b dies while still announced (the slice update has not arrived yet): calls that cannot
            # connect to b are retried on a, so no request fails, and none runs twice.
            a_before = (await ledger.settled())[0]
            b.stop()
            only_a_counted = Ledger([a], a_before)
            await only_a_counted.send(client)
            await only_a_counted.send(client)
            assert (await only_a_counted.settled())[0] - a_before == 2 * BATCH
        finally:
            await client.close()
