"""Priority load shedding under overload, real processes: Triton serving a slow model, the registry
in-process, a router subprocess with auth on and --shed-sheddable-inflight, a flood of sheddable calls from
another process, and a critical tenant measured here in alternating rounds with the flood paused (SIGSTOP)
and running, so the machine's other load drifts over both alike (the ratio in one run).

The critical tenant's calls all succeed, its p99 stays within 2x of the unloaded p99, and the sheddable
tenant is the one refused (UNAVAILABLE with a retry hint, honoured by the flood).

The second test sheds on Triton's queue time alone (no in-flight threshold): the router samples Triton's
ModelStatistics and refuses sheddable calls while the queue is long, saying so, and serves the critical ones.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from maas.v1 import registry_pb2 as pb
from maas.v1 import router_pb2_grpc
from maas.local.processes import free_ports
from services.shared.errors import RETRY_AFTER_METADATA
from tests.fixtures.flood import (
    FloodProcess,
    RouterProcess,
    alternating,
    bearer,
    p50,
    p99,
    slow_onnx,
    slow_request,
    timed_calls,
)
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


# The sheddable threshold: queue time beyond the dynamic batcher's delay (which the router subtracts), ~0 for
# one caller; 16 callers wait for the executions ahead of theirs.
QUEUE_MS = 0.5


def _samples(address: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_triton_queue_time_alone_sheds_sheddable_calls_and_serves_critical_ones(start_registry, tmp_path):
    env = await start_registry(token=ADMIN)
    data = slow_onnx()
    version = await env.stub.RegisterVersion(upload_messages(header("slow", data), data), metadata=env.auth())
    assert (await wait_state(env.stub, "slow", version.version)).state == pb.VERSION_STATE_READY
    critical = await create_tenant(env, "crit", priority=pb.PRIORITY_CRITICAL)
    sheddable = await create_tenant(env, "bulk", priority=pb.PRIORITY_SHEDDABLE)
    metrics = f"127.0.0.1:{free_ports(1)[0]}"
    router = RouterProcess(
        env.address,
        env.triton.grpc_address,
        ADMIN,
        tmp_path / "router.log",
        "--auth",
        "on",
        "--shed-sheddable-queue-ms",
        str(QUEUE_MS),  # and no in-flight threshold: the queue-time signal alone
        "--metrics-port",
        metrics.rsplit(":", 1)[1],
    )
    flood = None
    try:
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def serving() -> bool:
                return (await timed_calls(stub, critical, 1))[1].get("OK") == 1

            await until(serving, timeout=60, what="the router serving the slow model", poll=0.2)
            await timed_calls(stub, critical, 20)  # warm
            # Unloaded, nothing queues: the sheddable tenant is served.
            assert (await timed_calls(stub, sheddable, 5))[1] == {"OK": 5}
            flood = FloodProcess(router.address, sheddable, concurrency=FLOOD_CLIENTS, seconds=FLOOD_SECONDS)
            await until(lambda: flood.started(), timeout=30, what="the flood running")

            async def refused():
                """A sheddable call of our own, refused: (error, seconds it took) or None when served."""
                start = time.perf_counter()
                try:
                    await stub.Infer(slow_request(), metadata=bearer(sheddable), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    return exc, time.perf_counter() - start
                return None

            print(
                "queue time seen by the router:",
                _samples(metrics).get(("maas_router_triton_queue_seconds", (("model", "slow"),))),
            )
            exc, took = await until(refused, timeout=60, what="a sheddable call refused on Triton's queue time")
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "Triton overloaded: requests of model 'slow' waited" in exc.details(), exc.details()
            assert f"sheddable calls are refused from {QUEUE_MS:g} ms (--shed-sheddable-queue-ms)" in exc.details()
            assert dict(exc.trailing_metadata()).get(RETRY_AFTER_METADATA), exc.trailing_metadata()
            unloaded, loaded, outcomes = await alternating(stub, critical, flood, ROUNDS, SAMPLES // ROUNDS // 2)
            assert outcomes == {"OK": SAMPLES}, outcomes  # every critical call served
            flooded = flood.result()
        figures = _samples(metrics)
        shed = figures.get(("maas_tenant_refusals_total", (("reason", "shed_queue"), ("tenant", "bulk"))), 0)
        print(
            f"refused in {took * 1000:.2f} ms; critical p50/p99 unloaded {p50(unloaded):.2f}/{p99(unloaded):.2f} ms, "
            f"under overload {p50(loaded):.2f}/{p99(loaded):.2f} ms; sheddable outcomes {flooded}; "
            f"shed_queue refusals {shed:g}"
        )
        # The sheddable flood was refused (on the queue time: the only threshold) and served in between. How
        # often depends on the batcher: it turns concurrency into larger batches more than into queue time.
        assert flooded.get("UNAVAILABLE", 0) >= 1 and flooded.get("OK", 0) > 0, flooded
        assert set(flooded) <= {"OK", "UNAVAILABLE"}, flooded
        assert shed >= flooded["UNAVAILABLE"], (shed, flooded)
        assert not any(
            name == "maas_tenant_refusals_total" and ("reason", "shed") in labels for name, labels in figures
        )
        assert not any(
            name == "maas_tenant_refusals_total" and ("tenant", "crit") in labels for name, labels in figures
        )
        assert ("maas_router_triton_queue_seconds", (("model", "slow"),)) in figures
    finally:
        if flood is not None:
            flood.stop()
        router.stop()
