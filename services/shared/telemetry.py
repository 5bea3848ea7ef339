"""Tracing and metrics shared by every service.

Tracing is configured only by the standard OTEL_* variables: with none set nothing is installed and
no interceptor is added, so tracing off costs nothing. Metrics are Prometheus, served on
MAAS_METRICS_PORT when set.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_REQUESTS = Counter(
    "maas_rpc_server_requests",
    "gRPC requests handled, by outcome",
    ["service", "method", "model", "version", "code"],
)
# Request latency buckets (seconds): the RPC histogram's, the router's per-version one and the fast path's.
RPC_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RPC_DURATION = Histogram(
    "maas_rpc_server_duration_seconds",
    "gRPC request latency as the server sees it",
    ["service", "method"],
    buckets=RPC_DURATION_BUCKETS,
)
RPC_INFLIGHT = Gauge("maas_rpc_server_inflight_requests", "gRPC requests being handled", ["service"])
BATCH_ITEMS = Histogram(
    "maas_batch_items",
    "Items per request batch",
    ["service", "method"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ITEM_ERRORS = Counter("maas_item_errors", "Batch items refused, by reason", ["service", "reason"])
PREPROCESS_SECONDS = Histogram(
    "maas_preprocess_seconds",
    "Time spent turning user input into tensors",
    ["service", "kind"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

# Labels a handler learns while it runs (model, version...), read by the metrics interceptor at the end.
REQUEST_LABELS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("maas_request_labels", default=None)


def annotate(**attributes) -> None:
    """Attach attributes to the current span and to this request's metrics labels."""
    span = trace.get_current_span()
    if span.is_recording():
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(f"maas.{key}", value)
    labels = REQUEST_LABELS.get()
    if labels is not None:
        labels.update({k: str(v) for k, v in attributes.items() if k in ("model", "version")})


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when the OTEL_* settings (of `env`, default this process's) ask for spans to be exported."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return False
    return any(
        env.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
    )


def setup_tracing(service_name: str) -> bool:
    """Install a tracer provider exporting OTLP (gRPC or HTTP per OTEL_EXPORTER_OTLP_PROTOCOL)."""
    if not tracing_configured():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter()
    # OTEL_SERVICE_NAME wins over our default, as the spec says.
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", extra={"exporter": exporter_name, "protocol": protocol})
    return True


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracing_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    if not tracing_configured():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def tracing_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for outgoing channels: client spans plus W3C trace context propagation."""
    if not tracing_configured():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def start_metrics_server(port: int) -> None:
    if port > 0:
        start_http_server(port)
        log.info("metrics on", extra={"port": port})
