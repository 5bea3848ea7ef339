"""What the console holds of the mesh: one channel to the router and one to the registry (their public
gRPC APIs only, never the database), the registry's Watch feed and the router's metrics history."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from maas.auth import bearer
from maas.registry_client import parse_target
from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc, router_pb2_grpc, tensor_pb2
from services.console.config import ConsoleConfig
from services.console.metrics import Scraper
from services.console.models import ModelFeed
from services.openai.errors import from_grpc
from services.shared.channels import open_channel
from services.shared.telemetry import tracing_configured

log = logging.getLogger(__name__)
_HEALTH_TIMEOUT = 2.0


class Refused(Exception):
    """Something the page shows instead of an answer: `status` is the HTTP status, `code` the gRPC
    status name (or the console's own reason), `message` the service's text as it sent it."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> "Refused":
        return cls(from_grpc(exc.code(), exc.details()).status, exc.code().name, exc.details() or exc.code().name)


def invalid(field: str, message: str) -> Refused:
    return Refused(400, "INVALID_ARGUMENT", message, field)


def model_ref(model: str, target: str, routing_key: str = "") -> tensor_pb2.ModelRef:
    """`target` as the forms send it: empty = the traffic policy, '2' / 'v2' = that version, else an alias."""
    if not model:
        raise invalid("model", "choose a model")
    ref = tensor_pb2.ModelRef(name=model, routing_key=routing_key)
    if target:
        parsed = parse_target(target)
        if parsed.WhichOneof("target") == "version":
            ref.version = parsed.version
        else:
            ref.alias = parsed.alias
    return ref


@dataclass
class Answered:
    """Which version answered, why, how long it took and the trace it belongs to."""

    model: str
    version: int
    kind: str
    target: str
    shadowed: bool
    latency_ms: float
    trace_id: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def routed_fields(decision: tensor_pb2.RoutingDecision) -> dict:
    kind = tensor_pb2.RouteKind.Name(decision.kind).removeprefix("ROUTE_KIND_").lower() if decision.kind else ""
    return {
        "model": decision.model,
        "version": decision.version,
        "kind": kind,
        "target": decision.target,
        "shadowed": decision.shadowed,
    }


class Mesh:
    def __init__(self, config: ConsoleConfig):
        self.config = config
        self.router_channel = open_channel(config.router, config.server.max_message_bytes, config.server.tls)
        self.registry_channel = open_channel(config.registry, config.server.max_message_bytes, config.server.tls)
        self.router = router_pb2_grpc.RouterStub(self.router_channel)
        self.registry = registry_pb2_grpc.RegistryStub(self.registry_channel)
        self.health = health_pb2_grpc.HealthStub(self.router_channel)
        self.feed = ModelFeed(self.registry_channel)
        self.scraper = Scraper(config.router_metrics, config.scrape_interval, config.history_seconds)
        self.tracer = trace.get_tracer("maas.console") if tracing_configured() else None

    def start(self) -> None:
        self.feed.start()
        self.scraper.start()

    async def close(self) -> None:
        await self.feed.stop()
        await self.scraper.stop()
        await self.router_channel.close()
        await self.registry_channel.close()

    @contextmanager
    def traced(self, name: str):
        """A span around one playground call (its trace id is shown); '' when tracing is off."""
        if self.tracer is None:
            yield ""
            return
        with self.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
            yield format(span.get_span_context().trace_id, "032x")

    def answered(self, decision: tensor_pb2.RoutingDecision, started: float, trace_id: str) -> Answered:
        return Answered(
            **routed_fields(decision), latency_ms=round((time.perf_counter() - started) * 1000, 1), trace_id=trace_id
        )

    # -- registry reads ------------------------------------------------------------------------------
    async def models(self) -> list[pb.Model]:
        try:
            found = await self.registry.ListModels(pb.ListModelsRequest(), timeout=self.config.default_timeout)
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None
        return sorted(found.models, key=lambda m: m.name)

    async def model(self, name: str) -> pb.Model:
        try:
            return await self.registry.GetModel(pb.GetModelRequest(model=name), timeout=self.config.default_timeout)
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None

    async def rollouts(self) -> list[pb.Rollout]:
        """Every model's running or last rollout (an open read)."""
        try:
            found = await self.registry.ListRollouts(pb.ListRolloutsRequest(), timeout=self.config.default_timeout)
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None
        return sorted(found.rollouts, key=lambda r: (r.state != pb.ROLLOUT_STATE_RUNNING, r.model))

    async def audit(self, token: str, limit: int = 20) -> list[pb.AuditEntry]:
        """The registry's audit log, newest first; it needs the admin token when one is configured."""
        try:
            found = await self.registry.ListAudit(
                pb.ListAuditRequest(limit=limit), metadata=bearer(token), timeout=self.config.default_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None
        return list(found.entries)

    async def shadow_report(self, name: str, primary: int, shadow: int) -> pb.ShadowReport | None:
        """The registry's agreement report of one shadowed pair (None when it has none to give: the card
        then shows the aggregate row alone)."""
        try:
            return await self.registry.CompareVersions(
                pb.CompareVersionsRequest(model=name, a=primary, b=shadow), timeout=self.config.default_timeout
            )
        except grpc.aio.AioRpcError as exc:
            log.info(
                "no shadow report", extra={"model": name, "primary": primary, "shadow": shadow, "code": exc.code().name}
            )
            return None

    async def ready(self) -> bool:
        try:
            answer = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=_HEALTH_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING and self.feed.synced.is_set()
