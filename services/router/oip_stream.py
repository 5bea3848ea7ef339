"""OIP ModelStreamInfer through the router: each request routed like ModelInfer, forwarded to one
Triton stream, and every response (a decoupled model's many per request) relayed back as it comes.

One Triton stream per caller stream, on one replica, so responses keep Triton's order. A request that
cannot be routed (unknown model, version not READY...) gets an error response on the stream, as Triton
answers a bad request, and the stream goes on. The caller's deadline, if any, is the Triton stream's;
a stream without one lives as long as the caller keeps it (tritonclient's start_stream sets none).
Cancelling the caller's stream cancels the Triton stream, and Triton the requests still running.
Generations of a version with a shadow policy get their shadow copy (stream_shadow.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tritonclient.grpc import service_pb2

from services.router.dataplane import Dataplane
from services.router.metrics import STREAMS_INFLIGHT
from services.router.stream_shadow import StreamShadows
from services.shared.errors import ServiceError

_END = object()


def error_response(request: bytes, message: str) -> bytes:
    """The stream answer to a request the router refused, carrying the request's id like Triton's."""
    response = service_pb2.ModelStreamInferResponse(error_message=message)
    try:
        parsed = service_pb2.ModelInferRequest.FromString(request)
        response.infer_response.id = parsed.id
        response.infer_response.model_name = parsed.model_name
        response.infer_response.model_version = parsed.model_version
    except Exception:  # noqa: BLE001 - a malformed request is answered by its error alone
        pass
    return response.SerializeToString()


async def relay(
    plane: Dataplane,
    requests: AsyncIterator[bytes],
    routing_key: str,
    timeout: float | None,
    metadata: tuple = (),
    check=None,
) -> AsyncIterator[bytes]:
    """`check(request)` raises a ServiceError for a request admission refuses (services/router/admission.py)."""
    STREAMS_INFLIGHT.inc()
    try:
        async with plane.triton.stream(timeout, raw=True, metadata=metadata) as call:
            out: asyncio.Queue = asyncio.Queue()
            shadows = StreamShadows(plane)  # generations of a version with a shadow policy

            async def send() -> None:
                try:
                    async for request in requests:
                        try:
                            if check is not None:
                                check(request)
                            forwarded, route = plane.retarget_stream_request(request, routing_key)
                            forwarded = shadows.forward(forwarded, route)
                        except ServiceError as exc:
                            out.put_nowait(error_response(request, exc.message))
                            continue
                        await call.write(forwarded)
                    await call.done_writing()  # Triton ends the stream once every request has finished
                except BaseException as exc:  # noqa: BLE001 - handed to the relaying loop
                    out.put_nowait(exc)

            async def receive() -> None:
                try:
                    async for response in call:
                        out.put_nowait(shadows.relayed(response))
                    out.put_nowait(_END)
                except BaseException as exc:  # noqa: BLE001
                    out.put_nowait(exc)

            tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
            try:
                while (item := await out.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                for task in tasks:
                    task.cancel()
    finally:
        STREAMS_INFLIGHT.dec()
