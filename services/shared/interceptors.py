"""Server interceptor every service uses: domain errors → statuses, request metrics, no crash on a bug."""
from __future__ import annotations

import logging
import time
import uuid

import grpc

from services.shared.errors import status_for
from services.shared.telemetry import RPC_DURATION, RPC_INFLIGHT, RPC_REQUESTS, _request_labels

log = logging.getLogger(__name__)


class _Outcome:
    """Records one RPC's metrics and turns its exception (if any) into a status."""

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method
        self.labels: dict = {}
        self.start = time.perf_counter()
        self.token = _request_labels.set(self.labels)
        RPC_INFLIGHT.labels(service).inc()

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        mapped = status_for(exc)
        if mapped is None:
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error", extra={"method": self.method, "incident": incident})
            mapped = (grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
        self.finish(mapped[0])
        await context.abort(*mapped)

    def finish(self, code: grpc.StatusCode) -> None:
        if self.token is None:
            return
        RPC_INFLIGHT.labels(self.service).dec()
        RPC_DURATION.labels(self.service, self.method).observe(time.perf_counter() - self.start)
        RPC_REQUESTS.labels(
            self.service, self.method, self.labels.get("model", ""), self.labels.get("version", ""), code.name
        ).inc()
        _request_labels.reset(self.token)
        self.token = None

    def finish_from_context(self, context: grpc.aio.ServicerContext) -> None:
        code = context.code() if hasattr(context, "code") else None
        self.finish(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler. Health and reflection calls are passed through untouched."""

    def __init__(self, service: str):
        self.service = service

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, name), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, name), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, name), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, name), handler.request_deserializer, handler.response_serializer)

    def _unary(self, behaviour, name):
        async def wrapped(request_or_iterator, context):
            outcome = _Outcome(self.service, name)
            try:
                response = await behaviour(request_or_iterator, context)
            except grpc.aio.AbortError:
                outcome.finish_from_context(context)
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, never a crash
                await outcome.fail(exc, context)
            else:
                outcome.finish_from_context(context)
                return response
        return wrapped

    def _stream(self, behaviour, name):
        async def wrapped(request_or_iterator, context):
            outcome = _Outcome(self.service, name)
            try:
                async for response in behaviour(request_or_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                outcome.finish_from_context(context)
                raise
            except Exception as exc:  # noqa: BLE001
                await outcome.fail(exc, context)
            else:
                outcome.finish_from_context(context)
            finally:
                outcome.finish(grpc.StatusCode.CANCELLED)  # no-op unless the stream was cancelled
        return wrapped
