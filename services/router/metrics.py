"""Router metrics (Prometheus). The HPA scales on maas_router_inflight_requests (and, for generation,
maas_router_inflight_streams): keep those names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.shared.telemetry import RPC_DURATION_BUCKETS

ROUTER_REQUESTS = Counter(
    "maas_router_requests",
    "Data-plane requests routed, by model, version and how the version was chosen",
    ["model", "version", "route"],
)
VERSION_DURATION = Histogram(
    "maas_router_version_duration_seconds",
    "Latency of answered data-plane requests by the version that served them (the per-version figures "
    "rollouts analyse; requests the compiled OIP path answers on its own are not in it)",
    ["model", "version"],
    buckets=RPC_DURATION_BUCKETS,
)
ROUTER_INFLIGHT = Gauge("maas_router_inflight_requests", "Data-plane requests being handled by this router")
SHADOW_REQUESTS = Counter(
    "maas_router_shadow_requests",
    "Shadow copies of requests, by outcome (sent, dropped, failed)",
    ["model", "outcome"],
)
STREAMS_INFLIGHT = Gauge(
    "maas_router_inflight_streams",
    "Generation streams open on this router (Generate, GenerateUnary, OIP ModelStreamInfer): "
    "the generation HPA's signal",
)
GENERATED_TOKENS = Counter(
    "maas_router_generated_tokens", "Tokens generated and returned to callers", ["model", "version"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "maas_router_time_to_first_token_seconds",
    "From a Generate request's arrival to its first generated token",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
