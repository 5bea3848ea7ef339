"""The gRPC server bootstrap every service uses.

build_server() gives a grpc.aio server with the standard health service and reflection registered on
their own, explicit message size limits, the error/metrics interceptor and (when OTEL_* is set)
tracing, and TLS when configured (services/shared/tls.py: dynamic credentials that follow their files),
plus a plaintext health-only port for probes that cannot speak TLS (--health-listen). run() serves
until SIGTERM/SIGINT, then flips health to NOT_SERVING and lets in-flight RPCs finish within the grace
period.

Health names: "" (and each service's full name) is SERVING while the process serves - the liveness
probe's name, and what `maas up` and health-checked client channels look at. READINESS ("readiness",
the chart's readinessProbe) is SERVING only while every readiness check passes: the router and the
registry check that they reach Triton. A failing check is logged as "not ready: <why>" (at once, then
every READINESS_LOG_SECONDS while it lasts) and the name turns SERVING again when it passes. A wrong
upstream address thus keeps the pod out of its Service with the reason in its log; it is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.shared.config import ServerSettings
from services.shared.interceptors import ServiceInterceptor
from services.shared.memory import set_arena_max, set_mmap_threshold, start_trimming
from services.shared.structured_logging import configure_logging
from services.shared.tls import CertificateFiles, server_credentials
from services.shared.telemetry import (
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
    tracing_server_interceptors,
)

log = logging.getLogger(__name__)

READINESS = "readiness"  # the health name the readiness probe asks (liveness asks "")
READINESS_LOG_SECONDS = 10.0  # how often a readiness failure that lasts is logged again

# A readiness check: None when the service can serve, else why not (one line, naming what and where).
ReadinessCheck = Callable[[], Awaitable[str | None]]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Explicit message limits (gRPC's 4 MiB default is too small for image batches)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


async def _run_callbacks(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        result = callback()
        if asyncio.iscoroutine(result):
            await result


@dataclass
class ServiceServer:
    """A started-or-not gRPC server plus its health servicer, so draining can flip health first."""

    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: list[str]
    settings: ServerSettings
    # Start-up work that must finish before the server accepts RPCs (e.g. the registry's crash clean-up),
    # and shutdown work run after in-flight RPCs are done. Callbacks may be sync or async.
    on_start: list[Callable[[], object]] = field(default_factory=list)
    on_stop: list[Callable[[], object]] = field(default_factory=list)
    # Run while in-flight RPCs finish (e.g. stopping a companion process that serves another port).
    on_drain: list[Callable[[], object]] = field(default_factory=list)
    # With TLS: the served files, re-read when they change; a plaintext server of health alone.
    certificates: CertificateFiles | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    # What READINESS needs besides serving (e.g. Triton reachable); none = ready once started.
    readiness_checks: list[ReadinessCheck] = field(default_factory=list)
    _readiness_task: asyncio.Task | None = None
    ready: bool = False

    async def start(self) -> None:
        await _run_callbacks(self.on_start)
        await self.health.set(READINESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.readiness_checks:
            self._readiness_task = asyncio.get_running_loop().create_task(
                self._follow_readiness(), name=f"{self.settings.service_name}-readiness"
            )
        else:
            await self._set_ready(True)

    async def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        await self.health.set(
            READINESS, health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def check_readiness(self) -> list[str]:
        """Why the service is not ready (empty: it is). A check that raises counts as failing."""

        async def one(check: ReadinessCheck) -> str | None:
            try:
                return await check()
            except Exception as exc:  # noqa: BLE001 - a broken check must not stop the readiness loop
                return f"readiness check failed: {type(exc).__name__}: {exc}"

        return [r for r in await asyncio.gather(*(one(c) for c in self.readiness_checks)) if r]

    async def _follow_readiness(self) -> None:
        """Re-run the checks every readiness interval; log a failure at once and then every
        READINESS_LOG_SECONDS while it lasts (or sooner when its reason changes), and the recovery."""
        logged: tuple[str, float] | None = None  # (reasons, when) of the last "not ready" line
        while True:
            reasons = await self.check_readiness()
            if reasons:
                why = "; ".join(reasons)
                now = time.monotonic()
                if logged is None or logged[0] != why or now - logged[1] >= READINESS_LOG_SECONDS:
                    log.warning("not ready: %s", why, extra={"health": READINESS, "reasons": reasons})
                    logged = (why, now)
            elif not self.ready:
                log.info("ready", extra={"health": READINESS, "was": logged[0] if logged else None})
                logged = None
            await self._set_ready(not reasons)
            await asyncio.sleep(self.settings.readiness_interval_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first; calls still taken for the drain delay (part of the grace, at most
        half) while clients watching health move to other replicas; then no new calls, in-flight ones
        finish. Without the delay, a call racing the stop (sent before the client saw it) is CANCELLED."""
        grace = self.settings.grace_seconds if grace is None else grace
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            await asyncio.gather(self._readiness_task, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        delay = min(self.settings.drain_delay_seconds, grace / 2)
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(
            self.grpc_server.stop(grace - delay),
            _run_callbacks(self.on_drain),
            *([self.health_server.stop(0)] if self.health_server is not None else []),
        )
        await _run_callbacks(self.on_stop)

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()


def build_server(
    settings: ServerSettings,
    register: Callable[[grpc.aio.Server], Iterable[str]],
) -> tuple[ServiceServer, int]:
    """Create the server, let `register` add the service's servicers (returning their full names),
    bind settings.listen (port 0 picks a free one) and return (server, bound port)."""
    server = grpc.aio.server(
        interceptors=[*tracing_server_interceptors(), ServiceInterceptor(settings.service_name)],
        options=channel_options(settings.max_message_bytes),
    )
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    certificates = None
    if settings.tls is not None:
        credentials, certificates = server_credentials(settings.tls, settings.service_name)
        port = server.add_secure_port(settings.listen, credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise RuntimeError(f"could not bind {settings.listen}")
    service = ServiceServer(server, health_servicer, names, settings, certificates=certificates)
    if settings.health_listen:
        service.health_server, service.health_port = build_health_server(settings.health_listen, health_servicer)
    return service, port


def build_health_server(listen: str, servicer: health.aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    """grpc.health.v1 alone, plaintext: kubelet's gRPC probes speak no TLS. It shares the main server's
    health servicer, so draining shows here too."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"could not bind the health port {listen}")
    return server, port


def start_observability(settings: ServerSettings) -> None:
    """Every service process's preamble (gRPC and HTTP alike): structured logs, tracing when the OTEL_*
    settings ask for it, the Prometheus endpoint when --metrics-port is set."""
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    set_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    set_arena_max(settings.malloc_arena_max)
    start_trimming(settings.malloc_trim_interval_seconds)
    setup_tracing(f"maas-{settings.service_name}")
    start_metrics_server(settings.metrics_port)


def run(settings: ServerSettings, create: Callable[[], tuple[ServiceServer, int]]) -> None:
    """Entry point body shared by every service's __main__."""
    start_observability(settings)

    async def serve() -> None:
        server, port = create()
        await server.start()
        log.info(
            "serving",
            extra={
                "listen": settings.listen,
                "port": port,
                "services": server.service_names,
                "tls": settings.tls is not None,
                "health_port": server.health_port or None,
            },
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("draining", extra={"grace_seconds": settings.grace_seconds})
        await server.stop()
        log.info("stopped")

    try:
        asyncio.run(serve())
    finally:
        shutdown_tracing()
