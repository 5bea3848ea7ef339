"""Outlier ejection through a real router: of two Triton replicas, one (a fake) fails every call with
UNAVAILABLE; after N failures in a row it is ejected and every call on both router ports is served
by the real Triton; once it serves again, its probe passes and it gets calls again."""

from __future__ import annotations

import grpc
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2_grpc

from maas.local.processes import free_ports
from maas.v1 import registry_pb2 as pb
from services.router.config import RouterConfig
from services.router.fastpath import find_binary
from services.router.server import create_server
from services.shared.config import OutlierSettings, ServerSettings
from tests.fixtures.registry import header, tiny_onnx, upload_messages, wait_state
from tests.fixtures.replicas import eventually
from tests.integration.test_router_reload import oip_status


class Flaky(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A replica that answers every call UNAVAILABLE until healed, then forwards to a real Triton."""

    def __init__(self, real: str):
        self.failing, self.calls = True, 0
        self.real = service_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(real))

    async def _serve(self, method: str, request, context):
        self.calls += 1
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica is overloaded")
        return await getattr(self.real, method)(request, timeout=10)

    async def ModelInfer(self, request, context):
        return await self._serve("ModelInfer", request, context)

    async def ModelConfig(self, request, context):
        return await self._serve("ModelConfig", request, context)

    async def ServerReady(self, request, context):
        return await self._serve("ServerReady", request, context)

    async def RepositoryIndex(self, request, context):
        return await self._serve("RepositoryIndex", request, context)


def ejections() -> float:
    return REGISTRY.get_sample_value("maas_replica_pool_ejections_total", {"pool": "triton"}) or 0.0


async def test_a_failing_replica_is_ejected_and_probed_back_on_both_ports(start_registry):
    assert find_binary(), "build/bin/maas-oip-fastpath is missing: `make fastpath`"
    env = await start_registry()
    data = tiny_onnx(2.0)
    v1 = await wait_state(
        env.stub, "tiny", (await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))).version
    )
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason
    flaky = Flaky(env.triton.grpc_address)
    fake = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(flaky, fake)
    fake_address = f"127.0.0.1:{fake.add_insecure_port('127.0.0.1:0')}"
    await fake.start()

    fast = f"127.0.0.1:{free_ports(1)[0]}"
    cfg = RouterConfig(
        server=ServerSettings(service_name="router", listen="127.0.0.1:0", grace_seconds=0.5, workers=1),
        registry=env.address,
        tokenizer="127.0.0.1:1",
        vision="127.0.0.1:1",
        triton=f"{env.triton.grpc_address},{fake_address}",
        default_timeout=10.0,
        oip_fast_listen=fast,
        oip_fast_binary=find_binary(),
        outlier=OutlierSettings(consecutive_failures=3, base_ejection_seconds=0.5),
    )
    server, port = create_server(cfg)
    await server.start()
    main = f"127.0.0.1:{port}"
    before = ejections()
    try:

        async def routable() -> bool:
            return "routing state not received" not in (await oip_status(main))[1]

        await eventually(routable, what="routing state")

        codes = []

        async def ejected() -> bool:  # calls on the main port: some reach the failing replica
            codes.append((await oip_status(main))[0])
            return ejections() > before

        await eventually(ejected, what="the failing replica ejected")
        # Exactly its N failures in a row (routing checks included) and no more reached callers.
        assert flaky.calls == 3 and set(codes) <= {"OK", "StatusCode.UNAVAILABLE"}, (flaky.calls, codes)
        assert 1 <= codes.count("StatusCode.UNAVAILABLE") <= 3, codes
        calls = flaky.calls
        # Every call now goes to the real Triton, on both ports (the fast path follows the pool).
        for address in [main, fast] * 10:
            assert await oip_status(address) == ("OK", ""), address
        # Its probes (ServerReady, RepositoryIndex) fail while it is unwell: still out, longer each time.
        await eventually(lambda: flaky.calls > calls, what="a probe")
        assert ejections() == before + 1

        flaky.failing = False  # healed: the next probe passes and it serves again
        served = flaky.calls

        async def back() -> bool:
            await oip_status(main)
            return flaky.calls > served + 2  # probes and then calls

        await eventually(back, what="the healed replica back in")
        assert all([await oip_status(main) == ("OK", "") for _ in range(10)])
    finally:
        await server.stop(0)
        await fake.stop(0)
