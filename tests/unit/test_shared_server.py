"""The shared bootstrap: health and reflection on their own, error mapping, graceful drain."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.shared import errors
from services.shared.config import ServerSettings
from services.shared.server import build_server
from services.shared.telemetry import RPC_INFLIGHT, RPC_REQUESTS

SLOW = "/test.Probe/Slow"
FAIL = "/test.Probe/Fail"
BUG = "/test.Probe/Bug"


def _register_probe(server: grpc.aio.Server) -> list[str]:
    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(float(request.decode() or 0))
        return b"done"

    async def fail(request: bytes, context) -> bytes:
        raise errors.ResourceExhausted("item 3: image pixels is 9000000, over the limit of 4000000")

    async def bug(request: bytes, context) -> bytes:
        raise ZeroDivisionError("oops")

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {"Slow": slow, "Fail": fail, "Bug": bug}.items()
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Probe", handlers)])
    return ["test.Probe"]


@pytest.fixture
async def probe_server():
    settings = ServerSettings(service_name="probe", listen="127.0.0.1:0", grace_seconds=5.0)
    server, port = build_server(settings, _register_probe)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0)


async def test_health_serves_overall_and_per_service(probe_server):
    _, channel = probe_server
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "test.Probe"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(probe_server):
    _, channel = probe_server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
        break
    assert {"test.Probe", "grpc.health.v1.Health"} <= names


async def test_domain_error_becomes_its_status(probe_server):
    _, channel = probe_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(FAIL)(b"")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "item 3" in caught.value.details()


async def test_unexpected_error_is_internal_and_server_keeps_serving(probe_server):
    _, channel = probe_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(BUG)(b"")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "incident" in caught.value.details()
    assert await channel.unary_unary(SLOW)(b"0") == b"done"


async def test_drain_flips_health_and_finishes_inflight(probe_server):
    server, channel = probe_server
    health = health_pb2_grpc.HealthStub(channel)
    inflight = asyncio.ensure_future(channel.unary_unary(SLOW)(b"0.5"))
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(server.stop(5.0))
    await asyncio.sleep(0.05)
    # Health already says NOT_SERVING while the in-flight call is still running (read from the servicer:
    # a stopping server accepts no new RPC, not even a health check).
    assert server.health._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await inflight == b"done"
    await stopping
    with pytest.raises(grpc.aio.AioRpcError):
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)


def _inflight() -> float:
    return RPC_INFLIGHT.labels("probe")._value.get()  # noqa: SLF001 - the gauge's current value


async def _until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def _requests(code: str) -> float:
    return RPC_REQUESTS.labels("probe", "Slow", "", "", code)._value.get()  # noqa: SLF001


async def test_cancelled_and_timed_out_calls_leave_the_inflight_gauge(probe_server):
    """The HPA scales on in-flight requests: a unary call abandoned by its client must not stay counted."""
    _, channel = probe_server
    before = _inflight()
    timed_out_before, cancelled_before = _requests("DEADLINE_EXCEEDED"), _requests("CANCELLED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(SLOW)(b"30", timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = channel.unary_unary(SLOW)(b"30")
    await _until(lambda: _inflight() >= before + 1, "the call is being handled")
    call.cancel()
    await _until(lambda: _inflight() == before, "in-flight gauge back to its value before the calls")
    await _until(lambda: _requests("CANCELLED") == cancelled_before + 1, "the cancelled call counted")
    assert _requests("DEADLINE_EXCEEDED") == timed_out_before + 1
