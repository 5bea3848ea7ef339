"""ASGI middleware: one server span per HTTP request (W3C traceparent from the caller), Prometheus
metrics by route and status, one structured log line, and the gateway's limits (body size, requests
in flight) checked before any work.

The span stays current while the endpoint runs and while a streamed body is produced, so the router
call's client interceptor (services.shared.telemetry) carries it on to the router and beyond.
"""

from __future__ import annotations

import json
import logging
import time

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge, Histogram

from services.openai.config import GatewayLimits
from services.openai.errors import OpenAIError
from services.shared.telemetry import tracing_configured

log = logging.getLogger(__name__)
SERVICE = "openai"

HTTP_REQUESTS = Counter(
    "maas_http_requests", "HTTP requests handled, by route and status", ["service", "route", "code"]
)
HTTP_DURATION = Histogram(
    "maas_http_request_duration_seconds",
    "HTTP request latency, streamed bodies included",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
HTTP_INFLIGHT = Gauge("maas_http_inflight_requests", "HTTP requests being served", ["service"])
# The gateway HPA's signal: a stream holds a connection and a generation slot for its whole length.
INFLIGHT_STREAMS = Gauge("maas_openai_inflight_streams", "Server-sent-event completions being streamed")
TOKENS = Counter("maas_openai_tokens", "Tokens of answered completions", ["model", "kind"])

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz"}
_LIMITED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def route_of(path: str) -> str:
    """A bounded label: known routes as they are, /v1/models/<id> as one, anything else 'other'."""
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _BodyTooLarge(Exception):
    pass


async def send_error(send, error: OpenAIError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Observability:
    def __init__(self, app, limits: GatewayLimits):
        self.app, self.limits = app, limits
        self.inflight = 0
        self.tracer = trace.get_tracer("maas.openai") if tracing_configured() else None
        self._inflight_gauge = HTTP_INFLIGHT.labels(SERVICE)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, started, status, recorded = route_of(scope["path"]), time.perf_counter(), [0], [False]

        def record() -> None:
            """Once, before the last body byte leaves: a client that has its answer sees it counted."""
            if recorded[0]:
                return
            recorded[0] = True
            elapsed, code = time.perf_counter() - started, status[0] or 500
            HTTP_REQUESTS.labels(SERVICE, route, str(code)).inc()
            HTTP_DURATION.labels(SERVICE, route).observe(elapsed)
            if span is not None:
                span.set_attribute("http.response.status_code", code)
                if code >= 500:
                    span.set_status(trace.StatusCode.ERROR)
            level = logging.WARNING if code >= 500 else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request",
                    extra={"method": scope["method"], "route": route, "status": code, "ms": round(elapsed * 1000, 3)},
                )

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        token, span = None, None
        if self.tracer is not None:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            span = self.tracer.start_span(
                f"{scope['method']} {route}",
                context=propagate.extract(headers),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "http.route": route, "url.path": scope["path"]},
            )
            token = otel_context.attach(trace.set_span_in_context(span))
        self.inflight += 1
        self._inflight_gauge.inc()
        try:
            refused = self._refusal(scope, route)
            if refused is not None:
                await send_error(send_tracked, refused)
            else:
                await self.app(scope, self._limited_receive(receive), send_tracked)
        except _BodyTooLarge:
            if not status[0]:
                await send_error(send_tracked, self._too_large())
        finally:
            self.inflight -= 1
            self._inflight_gauge.dec()
            record()  # a response cut short (client gone, error) is counted here
            if span is not None:
                span.end()
                otel_context.detach(token)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(
            413,
            f"request body is over the limit of {self.limits.max_request_bytes} bytes (max_request_bytes limit)",
            code="request_too_large",
        )

    def _refusal(self, scope, route: str) -> OpenAIError | None:
        if route not in _LIMITED:
            return None
        if self.inflight > self.limits.max_inflight:
            return OpenAIError(
                429,
                f"{self.inflight - 1} requests in flight, at the limit of "
                f"{self.limits.max_inflight} (max_inflight limit); retry later",
                type="rate_limit_error",
                code="too_many_requests",
            )
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limits.max_request_bytes:
                return self._too_large()
        return None

    def _limited_receive(self, receive):
        seen, limit = [0], self.limits.max_request_bytes

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:  # a chunked body without Content-Length
                    raise _BodyTooLarge
            return message

        return limited
