"""The shared bootstrap: health and reflection on their own, error mapping, graceful drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.shared import errors
from services.shared.config import ServerSettings
from services.shared.server import READINESS, build_server
from services.shared.telemetry import RPC_INFLIGHT, RPC_REQUESTS

SLOW = "/test.Probe/Slow"
FAIL = "/test.Probe/Fail"
BUG = "/test.Probe/Bug"
PEER = "/test.Probe/Peer"


def _register_probe(server: grpc.aio.Server) -> list[str]:
    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(float(request.decode() or 0))
        return b"done"

    async def fail(request: bytes, context) -> bytes:
        raise errors.ResourceExhausted("item 3: image pixels is 9000000, over the limit of 4000000")

    async def bug(request: bytes, context) -> bytes:
        raise ZeroDivisionError("oops")

    async def peer(request: bytes, context) -> bytes:  # a peer's refusal passed on (the router's vision call)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("x-peer", "1")),
            details="image too large",
        )

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {"Slow": slow, "Fail": fail, "Bug": bug, "Peer": peer}.items()
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
    return RPC_INFLIGHT.labels("probe")._value.get()  # the gauge's current value


async def _until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


def _requests(code: str) -> float:
    return RPC_REQUESTS.labels("probe", "Slow", "", "", code)._value.get()


async def test_cancelled_and_timed_out_calls_leave_the_inflight_gauge(probe_server):
    """The HPA scales on in-flight requests: a unary call abandoned by its client must not stay counted."""
    _, channel = probe_server
    before = _inflight()
    timed_out_before, cancelled_before = _requests("DEADLINE_EXCEEDED"), _requests("CANCELLED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(SLOW)(b"30", timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _until(lambda: _inflight() == before, "the timed-out call no longer in flight")
    call = channel.unary_unary(SLOW)(b"30")
    await _until(lambda: _inflight() >= before + 1, "the call is being handled")
    call.cancel()
    await _until(lambda: _inflight() == before, "in-flight gauge back to its value before the calls")
    # Both counted once, as CANCELLED or DEADLINE_EXCEEDED (which one grpc's timing decides).
    await _until(
        lambda: _requests("CANCELLED") + _requests("DEADLINE_EXCEEDED") == cancelled_before + timed_out_before + 2,
        "the abandoned calls counted",
    )


async def test_request_bytes_that_do_not_parse_are_invalid_argument():
    """A deserializer that raises makes grpc answer UNKNOWN (unary) or INTERNAL (streams): the shared
    interceptor turns bytes that do not parse - invalid UTF-8 in a string field too - into INVALID_ARGUMENT,
    on every kind of RPC, health and reflection included; a per_message_errors stream answers each one."""
    from grpc_health.v1 import health_pb2

    from services.shared.decoding import decoded, per_message_errors

    def register(server):
        Check = health_pb2.HealthCheckRequest

        async def unary(request, context):
            return request.service.encode()

        async def client_stream(requests, context):
            return b",".join([r.service.encode() async for r in requests])

        async def server_stream(request, context):
            yield request.service.encode()

        @per_message_errors
        async def per_message(requests, context):
            async for request in requests:
                try:
                    yield decoded(request).service.encode()
                except errors.InvalidArgument as exc:
                    yield b"error: " + exc.message.encode()

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, Check.FromString),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, Check.FromString),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, Check.FromString),
            "PerMessage": grpc.stream_stream_rpc_method_handler(per_message, Check.FromString),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Decode", handlers)])
        return ["test.Decode"]

    good = health_pb2.HealthCheckRequest(service="ok").SerializeToString()
    bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding invalid UTF-8
    truncated = b"\x0a\x09ab"
    server, port = build_server(ServerSettings(service_name="decode", listen="127.0.0.1:0"), register)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/test.Decode/Unary")(good) == b"ok"
            for bad in (bad_utf8, truncated):
                calls = {
                    "Unary": lambda: channel.unary_unary("/test.Decode/Unary")(bad),
                    "ClientStream": lambda: channel.stream_unary("/test.Decode/ClientStream")(iter([good, bad])),
                    "ServerStream": lambda: _drain(channel.unary_stream("/test.Decode/ServerStream")(bad)),
                    "Health": lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(bad),
                    "Reflection": lambda: _drain(
                        channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
                            iter([bad])
                        )
                    ),
                }
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call()
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value)
                    assert "grpc.health.v1.HealthCheckRequest" in caught.value.details() or name == "Reflection"
                answers = await _drain(channel.stream_stream("/test.Decode/PerMessage")(iter([good, bad, good])))
                assert answers[0] == answers[2] == b"ok" and answers[1].startswith(b"error: the request is not")
    finally:
        await server.stop(0)


async def _drain(call) -> list:
    return [message async for message in call]


def test_a_peer_address_list_is_a_balanced_health_checked_target():
    from services.shared.channels import channel_target
    from services.shared.config import ConfigError

    assert channel_target("tokenizer:50053") == ("tokenizer:50053", False)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", True)
    assert channel_target("dns:///tokenizer-headless:50053") == ("dns:///tokenizer-headless:50053", True)
    with pytest.raises(ConfigError, match="not an IP host:port"):
        channel_target("a:1,b:2")


# -- readiness: "" is liveness (serving), READINESS follows the readiness checks ----------------------


async def _status(channel, name: str) -> int:
    return (
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
    ).status


async def test_without_readiness_checks_readiness_is_serving_once_started(probe_server):
    _, channel = probe_server
    assert await _status(channel, READINESS) == health_pb2.HealthCheckResponse.SERVING


async def test_readiness_follows_its_checks_logs_why_and_liveness_stays_serving(caplog):
    upstream = {"reason": "Triton at 127.0.0.1:1 unreachable: UNAVAILABLE: connection refused"}

    async def check():
        return upstream["reason"]

    settings = ServerSettings(service_name="probe", listen="127.0.0.1:0", readiness_interval_seconds=0.05)
    server, port = build_server(settings, _register_probe)
    server.readiness_checks.append(check)
    caplog.set_level("INFO", logger="services.shared.server")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            await _until(
                lambda: any("not ready: Triton at 127.0.0.1:1 unreachable" in r.getMessage() for r in caplog.records),
                "the not-ready line logged",
            )
            assert await _status(channel, READINESS) == not_serving
            assert await _status(channel, "") == serving  # liveness: the pod is not restarted for it
            assert await _status(channel, "test.Probe") == serving
            line = next(r for r in caplog.records if r.getMessage().startswith("not ready"))
            assert line.levelname == "WARNING" and line.reasons == [upstream["reason"]]
            # The same reason is not logged on every check (the interval is 50 ms, the repeat 10 s).
            await asyncio.sleep(0.3)
            assert sum(r.getMessage().startswith("not ready") for r in caplog.records) == 1

            upstream["reason"] = None
            await _until(lambda: server.ready, "ready once the check passes")
            assert await _status(channel, READINESS) == serving
            assert any(r.getMessage() == "ready" for r in caplog.records)

            upstream["reason"] = "Triton at 127.0.0.1:1 unreachable: DEADLINE_EXCEEDED"
            await _until(lambda: not server.ready, "not ready again when the check fails again")
            assert await _status(channel, READINESS) == not_serving
    finally:
        await server.stop(0)
    assert server.health._server_status[READINESS] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server._readiness_task.done()


async def test_a_readiness_check_that_raises_is_not_ready_with_its_error():
    async def broken():
        raise RuntimeError("boom")

    server, _ = build_server(ServerSettings(service_name="probe", listen="127.0.0.1:0"), _register_probe)
    server.readiness_checks.append(broken)
    assert await server.check_readiness() == ["readiness check failed: RuntimeError: boom"]


async def test_drain_turns_readiness_not_serving_too():
    server, _ = build_server(ServerSettings(service_name="probe", listen="127.0.0.1:0"), _register_probe)
    await server.start()
    assert server.health._server_status[READINESS] == health_pb2.HealthCheckResponse.SERVING
    await server.stop(0)
    assert server.health._server_status[READINESS] == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_peers_refusal_passes_through_with_its_code(probe_server):
    """A grpc.aio.AioRpcError (whose trailing_metadata is a method) keeps its code; it was UNKNOWN when the
    interceptor handed that method to abort() as trailing metadata."""
    _, channel = probe_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(PEER)(b"")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "image too large" in caught.value.details()


async def test_our_error_sends_its_trailing_metadata():
    class Hinted(errors.ResourceExhausted):
        trailing_metadata = (("retry-after-ms", "250"),)

    async def hinted(request: bytes, context) -> bytes:
        raise Hinted("over quota")

    settings = ServerSettings(service_name="hinted", listen="127.0.0.1:0", grace_seconds=5.0)

    def register(s):
        s.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Hinted", {"Call": grpc.unary_unary_rpc_method_handler(hinted)})]
        )
        return ["test.Hinted"]

    other, port = build_server(settings, register)
    await other.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Hinted/Call")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "250") in tuple(caught.value.trailing_metadata())
    finally:
        await other.stop(0)
