"""Shadow traffic: mirror a request to a candidate version after the caller has its answer.

The copy runs in its own task with a fresh context (a new root span linked to the caller's span, so
it never lengthens the caller's trace), a bounded number in flight (dropped when saturated) and its
own timeout. Comparisons are batched to the registry's ReportShadowResults off the request path.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from opentelemetry import trace

from maas.auth import bearer
from maas.v1 import registry_pb2, registry_pb2_grpc
from services.router.metrics import SHADOW_REQUESTS
from services.router.postprocess import cosine_sum, cosines, top1_agreed, top5_overlap_sum
from services.router.reporting import PeriodicReport
from services.router.routing import VersionInfo

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("maas.router.shadow")

# Produces the [batch, n] output to compare (None when there is nothing comparable).
OutputFn = Callable[[], Awaitable[np.ndarray | None]]


def compare(
    model: str,
    primary: VersionInfo,
    shadow: VersionInfo,
    a: np.ndarray,
    b: np.ndarray,
    primary_ms: float,
    shadow_ms: float,
    request_id: str = "",
) -> registry_pb2.ShadowResult:
    """Top-1 / top-5 agreement (classifiers) and per-item cosine (embeddings), all cheap; the registry
    keeps the figures that fit the model (its shadow report, `maas models compare`)."""
    items = int(a.shape[0]) if a.ndim == 2 and a.shape == b.shape else 0
    return registry_pb2.ShadowResult(
        model=model,
        primary_version=primary.version,
        shadow_version=shadow.version,
        items=items,
        top1_agreed=top1_agreed(a, b) if items else 0,
        cosine_sum=cosine_sum(a, b) if items else 0.0,
        primary_latency_ms=primary_ms,
        shadow_latency_ms=shadow_ms,
        top5_overlap_sum=top5_overlap_sum(a, b) if items else 0.0,
        cosines=cosines(a, b).tolist() if items else [],
        request_id=request_id or uuid.uuid4().hex,
    )


def compare_tokens(
    model: str,
    primary: VersionInfo,
    shadow: VersionInfo,
    a: np.ndarray,
    b: np.ndarray,
    primary_ms: float,
    shadow_ms: float,
    request_id: str = "",
) -> registry_pb2.ShadowResult:
    """Generation: the two generated token id sequences of one request. Exact-token agreement (identical
    sequences) and prefix agreement (common prefix / the longer length, 1 when both are empty), in the
    fields the registry keeps for every pair (registry.proto ShadowResult)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    tokens, common = max(a.size, b.size), min(a.size, b.size)
    differ = np.flatnonzero(a[:common] != b[:common])
    prefix = int(differ[0]) if differ.size else common
    share = prefix / tokens if tokens else 1.0
    return registry_pb2.ShadowResult(
        model=model,
        primary_version=primary.version,
        shadow_version=shadow.version,
        items=1,
        top1_agreed=int(prefix == tokens),
        cosine_sum=share,
        cosines=[share],
        primary_latency_ms=primary_ms,
        shadow_latency_ms=shadow_ms,
        request_id=request_id or uuid.uuid4().hex,
        generated_tokens=tokens,
        prefix_tokens=prefix,
    )


Comparator = Callable[..., registry_pb2.ShadowResult]


class ShadowRunner(PeriodicReport):
    def __init__(
        self,
        registry_channel: grpc.aio.Channel | None,
        max_inflight: int = 64,
        timeout: float = 10.0,
        report_interval: float = 1.0,
        max_pending: int = 10_000,
        admin_token: str | None = None,
        tracer: trace.Tracer | None = None,
    ):
        self._tracer = tracer or _tracer
        self._metadata = bearer(admin_token)
        self._registry = registry_pb2_grpc.RegistryStub(registry_channel) if registry_channel else None
        self.max_inflight, self.timeout = max_inflight, timeout
        self.report_interval, self.max_pending = report_interval, max_pending
        self._tasks: set[asyncio.Task] = set()
        self._pending: list[registry_pb2.ShadowResult] = []
        self.reported = 0  # results accepted by the registry (for tests and logs)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    def submit(
        self,
        primary: VersionInfo,
        shadow: VersionInfo,
        primary_output: OutputFn,
        shadow_output: OutputFn,
        primary_ms: float,
        comparator: Comparator = compare,
    ) -> bool:
        """Schedule one shadow comparison (`comparator`: compare for tensors, compare_tokens for generated
        ids); False when dropped because too many are in flight."""
        if len(self._tasks) >= self.max_inflight:
            SHADOW_REQUESTS.labels(primary.model, "dropped").inc()
            return False
        caller = trace.get_current_span().get_span_context()
        link = trace.Link(caller)
        request_id = format(caller.trace_id, "032x") if caller.is_valid else ""  # names it in the report
        # An empty contextvars.Context: no caller span, no caller metric labels leak into the copy.
        task = asyncio.get_running_loop().create_task(
            self._run(primary, shadow, primary_output, shadow_output, primary_ms, link, request_id, comparator),
            context=contextvars.Context(),
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._registry is not None:
            self._start_reporting()
        return True

    async def _run(
        self, primary, shadow, primary_output, shadow_output, primary_ms, link, request_id="", comparator=compare
    ) -> None:
        with self._tracer.start_as_current_span(
            "router.shadow",
            links=[link],
            attributes={
                "maas.model": primary.model,
                "maas.version": shadow.version,
                "maas.primary_version": primary.version,
            },
        ) as span:
            start = time.perf_counter()
            try:
                b = await asyncio.wait_for(shadow_output(), self.timeout)
                shadow_ms = (time.perf_counter() - start) * 1000
                a = await primary_output()
            except Exception as exc:  # noqa: BLE001 - a failing candidate must never surface to callers
                SHADOW_REQUESTS.labels(primary.model, "failed").inc()
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:300]))  # the trace says why
                log.warning(
                    "shadow call failed",
                    extra={"model": primary.model, "version": shadow.version, "error": str(exc)[:300]},
                )
                return
            SHADOW_REQUESTS.labels(primary.model, "sent").inc()
            if a is None or b is None:
                return
            if len(self._pending) < self.max_pending:
                self._pending.append(
                    comparator(primary.model, primary, shadow, a, b, primary_ms, shadow_ms, request_id)
                )

    async def flush(self) -> None:
        if not self._pending or self._registry is None:
            return
        batch, self._pending = self._pending, []
        try:
            await self._registry.ReportShadowResults(
                registry_pb2.ReportShadowResultsRequest(results=batch),
                timeout=5.0,
                wait_for_ready=False,
                metadata=self._metadata,
            )
            self.reported += len(batch)
        except grpc.aio.AioRpcError as exc:
            log.warning("shadow results not reported; dropped", extra={"results": len(batch), "code": exc.code().name})

    async def stop(self) -> None:
        """Let in-flight copies finish (briefly), report what is left, stop the reporter."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout)
        await self._stop_reporting()
