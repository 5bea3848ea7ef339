"""Priority load shedding under overload, real processes: Triton serving a slow model, the registry
in-process, a router subprocess with auth on and --shed-sheddable-inflight, a flood of sheddable calls from
another process, and a critical tenant measured here in alternating rounds with the flood paused (SIGSTOP)
and running, so the machine's other load drifts over both alike (the ratio in one run).

The critical tenant's calls all succeed, its p99 stays within 2x of the unloaded p99, and the sheddable
tenant is the one refused (UNAVAILABLE with a retry hint, honoured by the flood).
"""

from __future__ import annotations

import grpc

from maas.v1 import registry_pb2 as pb
from maas.v1 import router_pb2_grpc
from tests.fixtures.flood import FloodProcess, RouterProcess, alternating, p50, p99, slow_onnx, timed_calls
from tests.fixtures.registry import header, upload_messages, wait_state
from tests.fixtures.tenants import ADMIN, create_tenant, until

SAMPLES = 1000  # critical calls unloaded, and as many under the flood
ROUNDS = 10  # short rounds: a burst of the machine's other load falls on both phases alike
FLOOD_CLIENTS = 16
FLOOD_SECONDS = 120.0


async def test_under_overload_sheddable_calls_are_refused_and_critical_ones_keep_their_latency(
    start_registry, tmp_path
):
    env = await start_registry(token=ADMIN)
    data = slow_onnx()
    version = await env.stub.RegisterVersion(upload_messages(header("slow", data), data), metadata=env.auth())
    assert (await wait_state(env.stub, "slow", version.version)).state == pb.VERSION_STATE_READY
    critical = await create_tenant(env, "crit", priority=pb.PRIORITY_CRITICAL)
    sheddable = await create_tenant(env, "bulk", priority=pb.PRIORITY_SHEDDABLE)
    router = RouterProcess(
        env.address,
        env.triton.grpc_address,
        ADMIN,
        tmp_path / "router.log",
        "--auth",
        "on",
        "--shed-sheddable-inflight",
        "1",
    )
    flood = None
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def serving() -> bool:
                return (await timed_calls(stub, critical, 1))[1].get("OK") == 1

            await until(serving, timeout=60, what="the router serving the slow model", poll=0.2)
            await timed_calls(stub, critical, 20)  # warm
            flood = FloodProcess(router.address, sheddable, concurrency=FLOOD_CLIENTS, seconds=FLOOD_SECONDS)
            await until(lambda: flood.started(), timeout=30, what="the flood running")
            unloaded, loaded, outcomes = await alternating(stub, critical, flood, ROUNDS, SAMPLES // ROUNDS)
            assert outcomes == {"OK": 2 * SAMPLES}, outcomes  # the critical tenant's errors stay at 0
            flooded = flood.result()
        ratio = p99(loaded) / p99(unloaded)
        print(
            f"critical p50/p99 unloaded {p50(unloaded):.2f}/{p99(unloaded):.2f} ms, under overload "
            f"{p50(loaded):.2f}/{p99(loaded):.2f} ms: p99 ratio {ratio:.2f}; sheddable outcomes {flooded}"
        )
        # Overloaded indeed: the sheddable tenant was refused (while every critical call was served), and
        # served in between.
        assert flooded.get("UNAVAILABLE", 0) >= 50 and flooded.get("OK", 0) > 0, flooded
        assert set(flooded) <= {"OK", "UNAVAILABLE"}, flooded
        assert ratio <= 2.0, (p99(unloaded), p99(loaded))
    finally:
        if flood is not None:
            flood.stop()
        router.stop()
