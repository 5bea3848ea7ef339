"""Per-version request figures for the registry's rollout analysis (docs/rollouts.md).

Every data-plane request the router routes is counted against the version that served it: answered or
failed (by gRPC status code name) and, when answered, its latency in a fixed histogram. The deltas go
to the registry's ReportVersionStats every report interval, off the request path, like the shadow
results (shadow.py); a failed report is merged back and sent with the next one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import functools
import logging
import time
from dataclasses import dataclass, field

import grpc

from maas.auth import bearer
from maas.v1 import registry_pb2, registry_pb2_grpc
from services.router.metrics import VERSION_DURATION
from services.router.reporting import PeriodicReport
from services.router.routing import VersionInfo
from services.shared.errors import ServiceError

log = logging.getLogger(__name__)

# Upper bounds of the latency buckets, milliseconds: x1.25 steps from 0.25 ms to ~60 s (the resolution
# of the registry's p99: within 25 %).
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(0.25 * 1.25**i, 4) for i in range(56))


@dataclass
class _Figures:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def merge(self, other: "_Figures") -> None:
        self.requests += other.requests
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]


def code_name(exc: BaseException) -> str:
    """The status code name a caller gets for `exc`."""
    if isinstance(exc, ServiceError):
        return exc.code.name
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.INTERNAL.name


class VersionStatsReporter(PeriodicReport):
    def __init__(
        self, registry_channel: grpc.aio.Channel | None, report_interval: float = 0.5, admin_token: str | None = None
    ):
        self._registry = registry_pb2_grpc.RegistryStub(registry_channel) if registry_channel else None
        self._metadata = bearer(admin_token)
        self.report_interval = report_interval
        self._pending: dict[tuple[str, int], _Figures] = {}
        self.reported = 0  # reports the registry accepted (tests)

    def record(self, model: str, version: int, error: str | None, seconds: float) -> None:
        figures = self._figures(model, version)
        figures.requests += 1
        if error:
            figures.errors[error] = figures.errors.get(error, 0) + 1
        else:
            figures.counts[bisect.bisect_left(LATENCY_BOUNDS_MS, seconds * 1000.0)] += 1
            VERSION_DURATION.labels(model, str(version)).observe(seconds)  # the console's per-version p50/p99

    def record_counts(self, model: str, version: int, code: str, count: int) -> None:
        """Requests another data path settled (the compiled OIP fast path's "requests" report lines): they
        count as requests and, when not OK, as errors by code; their latency comes apart (record_latencies)."""
        if count <= 0:
            return
        figures = self._figures(model, version)
        figures.requests += count
        if code != grpc.StatusCode.OK.name:
            figures.errors[code] = figures.errors.get(code, 0) + count

    def record_latencies(self, model: str, version: int, counts: list[int]) -> None:
        """The latency histogram of answered requests another data path timed (the fast path's "latencies"
        report lines), per LATENCY_BOUNDS_MS bucket then above the last bound; their requests come with
        record_counts."""
        if len(counts) != len(LATENCY_BOUNDS_MS) + 1:
            raise ValueError(f"{len(counts)} latency counts for {len(LATENCY_BOUNDS_MS) + 1} buckets")
        if not any(counts):
            return
        figures = self._figures(model, version)
        figures.counts = [a + b for a, b in zip(figures.counts, counts)]

    def _figures(self, model: str, version: int) -> _Figures:
        """The pending figures of a version (created empty), reported with the next flush."""
        figures = self._pending.get((model, version))
        if figures is None:
            figures = self._pending[(model, version)] = _Figures()
        if self._registry is not None:
            self._start_reporting()
        return figures

    async def flush(self) -> None:
        if not self._pending or self._registry is None:
            return
        batch, self._pending = self._pending, {}
        request = registry_pb2.ReportVersionStatsRequest(
            stats=[
                registry_pb2.VersionStats(
                    model=model,
                    version=version,
                    requests=f.requests,
                    errors=f.errors,
                    latency_bounds_ms=LATENCY_BOUNDS_MS,
                    latency_counts=f.counts,
                )
                for (model, version), f in batch.items()
            ]
        )
        try:
            await self._registry.ReportVersionStats(request, timeout=5.0, wait_for_ready=False, metadata=self._metadata)
            self.reported += 1
        except grpc.aio.AioRpcError as exc:
            # Kept for the next report (the registry may be restarting): the analysis sees them late, not never.
            for key, figures in batch.items():
                self._pending.setdefault(key, _Figures()).merge(figures)
            log.warning(
                "version stats not reported; kept for the next report",
                extra={"versions": len(batch), "code": exc.code().name},
            )

    async def stop(self) -> None:
        await self._stop_reporting()


# The version a data-plane request was routed to, set by Dataplane.route() for the request's `counted` wrapper.
_routed: contextvars.ContextVar[list | None] = contextvars.ContextVar("maas_routed_version", default=None)


def note_routed(info: VersionInfo) -> None:
    holder = _routed.get()
    if holder is not None:
        holder.append(info)


def counted(method):
    """Wraps a Dataplane method: the request counts against the version route() picked (none: not counted)."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        holder: list[VersionInfo] = []
        token = _routed.set(holder)
        start = time.perf_counter()
        error = None
        try:
            return await method(self, *args, **kwargs)
        except BaseException as exc:
            error = code_name(exc)
            raise
        finally:
            _routed.reset(token)
            if holder and self.version_stats is not None:
                info = holder[-1]
                self.version_stats.record(info.model, info.version, error, time.perf_counter() - start)

    return wrapper
