"""Server interceptor every service uses: domain errors → statuses, request metrics, no crash on a bug,
requests that do not parse → INVALID_ARGUMENT (services.shared.decoding)."""

from __future__ import annotations

import inspect
import logging
import time
import uuid

import grpc

from services.shared.decoding import decoded, decoded_stream, tolerant
from services.shared.errors import InvalidArgument, ServiceError, bounded, status_for
from services.shared.telemetry import RPC_DURATION, RPC_INFLIGHT, RPC_REQUESTS, REQUEST_LABELS

log = logging.getLogger(__name__)


class _MethodMetrics:
    """One method's metric children, looked up once instead of by label values on every request."""

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method
        self.inflight = RPC_INFLIGHT.labels(service)
        self.duration = RPC_DURATION.labels(service, method)
        self._requests: dict[tuple[str, str, grpc.StatusCode], object] = {}

    def requests(self, model: str, version: str, code: grpc.StatusCode):
        key = (model, version, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = RPC_REQUESTS.labels(self.service, self.method, model, version, code.name)
        return child


class _Outcome:
    """Records one RPC's metrics and turns its exception (if any) into a status."""

    __slots__ = ("metrics", "labels", "start", "token")

    def __init__(self, metrics: _MethodMetrics):
        self.metrics = metrics
        self.labels: dict = {}
        self.start = time.perf_counter()
        self.token = REQUEST_LABELS.set(self.labels)
        metrics.inflight.inc()

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        mapped = status_for(exc)
        if mapped is None:
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error", extra={"method": self.metrics.method, "incident": incident})
            mapped = (grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
        self.finish(mapped[0])
        # Our errors may carry trailing metadata, e.g. the retry-after hint of a quota refusal. Only ours:
        # a peer's grpc.aio.AioRpcError has a trailing_metadata() *method* (abort refused it: UNKNOWN).
        trailing = exc.trailing_metadata if isinstance(exc, ServiceError) else ()
        if trailing:
            await context.abort(mapped[0], bounded(mapped[1]), trailing_metadata=trailing)
        await context.abort(mapped[0], bounded(mapped[1]))

    def finish(self, code: grpc.StatusCode) -> None:
        if self.token is None:
            return
        metrics = self.metrics
        metrics.inflight.dec()
        metrics.duration.observe(time.perf_counter() - self.start)
        metrics.requests(self.labels.get("model", ""), self.labels.get("version", ""), code).inc()
        REQUEST_LABELS.reset(self.token)
        self.token = None

    def finish_from_context(self, context: grpc.aio.ServicerContext) -> None:
        code = context.code() if hasattr(context, "code") else None
        self.finish(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK)

    def finish_abandoned(self, context: grpc.aio.ServicerContext) -> None:
        """The handler was cancelled (the client went away or its deadline passed): a no-op when the
        call already finished, else it leaves the in-flight gauge like any other call."""
        if self.token is None:
            return
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        expired = remaining is not None and remaining <= 0.05  # grpc may cancel just before its own clock
        self.finish(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler. Health and reflection calls are passed through untouched."""

    def __init__(self, service: str):
        self.service = service
        # method → (the service's handler, its wrapped handler): built once per method, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(handler, method))
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer = tolerant(handler.request_deserializer)
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):  # no metrics, only the decoding check
            return _with_behaviour(handler, _refusing_undecodable(handler), deserializer)
        metrics = _MethodMetrics(self.service, method.rsplit("/", 1)[-1])
        behaviour = self._unary if handler.unary_unary or handler.stream_unary else self._stream
        return _with_behaviour(handler, behaviour(_checked(handler), metrics), deserializer)

    @staticmethod
    def _unary(behaviour, metrics: _MethodMetrics):
        async def wrapped(request_or_iterator, context):
            outcome = _Outcome(metrics)
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
            finally:
                outcome.finish_abandoned(context)  # cancelled or timed out: CancelledError is no Exception

        return wrapped

    @staticmethod
    def _stream(behaviour, metrics: _MethodMetrics):
        async def wrapped(request_or_iterator, context):
            outcome = _Outcome(metrics)
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
                outcome.finish_abandoned(context)  # no-op unless the stream was cancelled

        return wrapped


def _checked(handler: grpc.RpcMethodHandler):
    """The handler's behaviour, refusing messages that did not parse before it sees them (a request-
    streaming handler marked per_message_errors gets them as they are and answers each itself)."""
    behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    streamed_requests = handler.request_streaming
    if streamed_requests and getattr(behaviour, "per_message_errors", False):
        return behaviour
    if handler.response_streaming:

        def checked_stream(request_or_iterator, context):
            arg = decoded_stream(request_or_iterator) if streamed_requests else decoded(request_or_iterator)
            return behaviour(arg, context)

        return checked_stream

    async def checked(request_or_iterator, context):
        arg = decoded_stream(request_or_iterator) if streamed_requests else decoded(request_or_iterator)
        return await behaviour(arg, context)

    return checked


def _with_behaviour(handler: grpc.RpcMethodHandler, behaviour, deserializer) -> grpc.RpcMethodHandler:
    make = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary
        else grpc.stream_unary_rpc_method_handler
        if handler.stream_unary
        else grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return make(behaviour, deserializer, handler.response_serializer)


def _refusing_undecodable(handler: grpc.RpcMethodHandler):
    """Health and reflection: no metrics, only a message that did not parse → INVALID_ARGUMENT."""
    behaviour = _checked(handler)
    if handler.response_streaming:

        async def streamed(request_or_iterator, context):
            try:
                responses = behaviour(request_or_iterator, context)
                if inspect.isawaitable(responses):  # writes with context.write() (Health.Watch does)
                    await responses
                    return
                async for response in responses:
                    yield response
            except InvalidArgument as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

        return streamed

    async def unary(request_or_iterator, context):
        try:
            return await behaviour(request_or_iterator, context)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

    return unary
