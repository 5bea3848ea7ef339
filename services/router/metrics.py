"""Router metrics (Prometheus). The HPA scales on maas_router_inflight_requests: keep that name."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

ROUTER_REQUESTS = Counter(
    "maas_router_requests", "Data-plane requests routed, by model, version and how the version was chosen",
    ["model", "version", "route"],
)
ROUTER_INFLIGHT = Gauge("maas_router_inflight_requests", "Data-plane requests being handled by this router")
SHADOW_REQUESTS = Counter(
    "maas_router_shadow_requests", "Shadow copies of requests, by outcome (sent, dropped, failed)",
    ["model", "outcome"],
)
