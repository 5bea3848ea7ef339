"""The router's OIP fast path: maas-oip-fastpath, started, fed and watched from here.

A Python grpc.aio hop costs ~0.7 ms per call here, more than the router may add to a Triton call;
the compiled forwarder (services/router/native/oip_fastpath.cc) costs ~0.25 ms. It serves
inference.GRPCInferenceService on its own port (--oip-fast-listen) and routes by the spec in
protos/maas/v1/fastpath.proto: this module sends it a FastPathSnapshot (for each model, the versions a
version-less, alias or numbered ModelInfer may go to, computed here with routing.py's functions, and
the split draw's parameters) and the shared vectors (tests/fixtures/routing_vectors.json) hold both to
the same answers. Every call the snapshot does not settle (unknown model, version not READY, a shadow
copy to take, metadata and readiness calls) it forwards to this router's main port, which answers as
it always does. With auth on, the snapshot carries the tenant cache and admission.py's words (auth_spec):
the forwarder checks keys and allowed models itself and refuses as the main port does; calls of tenants
with a quota go to the main port, where the token buckets are (fastpath.proto rule 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from google.protobuf.message import Message

from maas.v1 import fastpath_pb2
from services.router.admission import (
    MALFORMED_KEY_MESSAGE,
    MISSING_KEY_MESSAGE,
    PRIORITY_METADATA,
    TENANT_COST,
    TENANT_REFUSALS,
    TENANT_REQUESTS,
    UNKNOWN_KEY_MESSAGE,
    Admission,
    denied_message,
    revoked_message,
)
from services.router.metrics import ROUTER_INFLIGHT, ROUTER_REQUESTS
from services.router.routing import (
    KEY_SEPARATOR,
    SPLIT_SALT,
    SPLIT_STEP,
    ModelRoutes,
    RoutingTable,
    default_version,
    ready_aliases,
    usable_split,
)
from services.router.signature import beyond_triton
from services.router.triton_errors import MODEL_INPUT_ERROR_MARKERS, NOT_SERVING_MARKER, NOT_SERVING_MESSAGE
from services.router.version_stats import LATENCY_BOUNDS_MS, VersionStatsReporter
from services.shared.errors import MAX_STATUS_MESSAGE_BYTES, FailedPrecondition
from services.shared.replica_pool import POOL_BUDGET_REFUSALS, ReplicaPool
from services.shared.telemetry import RPC_DURATION, RPC_DURATION_BUCKETS, RPC_REQUESTS
from services.shared.tls import TlsSettings

log = logging.getLogger(__name__)

BINARY_NAME = "maas-oip-fastpath"
# Built by `make fastpath` in a source checkout; installed on PATH in the container image.
_SOURCE_BUILD = Path(__file__).resolve().parents[2] / "build" / "bin" / BINARY_NAME
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def find_binary() -> str | None:
    """The forwarder on PATH, else the source checkout's build; None when neither exists."""
    found = shutil.which(BINARY_NAME)
    if found:
        return found
    return str(_SOURCE_BUILD) if _SOURCE_BUILD.is_file() else None


def model_spec(routes: ModelRoutes) -> fastpath_pb2.FastPathModel | None:
    """One model's entry of a snapshot, or None when the forwarder must hand all its calls to the
    Python router: a shadow policy (every call may take a shadow copy, explicit versions included), or a
    version with input limits only the router checks (token ids, sequence length: signature.beyond_triton)."""
    if not routes.name or (routes.shadow is not None and routes.shadow.fraction > 0):
        return None
    if any(beyond_triton(info) for info in routes.versions.values()):
        return None
    try:
        default = default_version(routes)[0].version
    except FailedPrecondition:
        default = 0
    return fastpath_pb2.FastPathModel(
        name=routes.name,
        default_version=default,
        ready_versions=routes.ready_versions(),
        aliases=ready_aliases(routes),
        has_policy=bool(routes.split),
        split=[
            fastpath_pb2.SplitTarget(version=info.version, weight=target.weight)
            for info, target in (usable_split(routes) if routes.split else [])
        ],
    )


def snapshot(
    table: RoutingTable, replicas: Iterable[str], admission: Admission | None = None
) -> fastpath_pb2.FastPathSnapshot:
    """The whole routing state as the forwarder reads it (protos/maas/v1/fastpath.proto), with the
    draw's parameters (the forwarder holds none of its own) and, with auth on, the tenants."""
    models = [spec for routes in table.models() if (spec := model_spec(routes)) is not None] if table.has_state else []
    auth = auth_spec(admission) if admission is not None and admission.settings.auth else None
    return fastpath_pb2.FastPathSnapshot(replicas=sorted(replicas), models=models, draw=split_draw(), auth=auth)


# Where a tenant's denied_message has the model the call asked (no model or tenant name has braces).
ASKED_PLACEHOLDER = "{asked}"


def auth_spec(admission: Admission) -> fastpath_pb2.FastPathAuth:
    """The tenant cache as the forwarder checks keys against it (fastpath.proto rule 4), with admission.py's
    words. A tenant with a quota is served by the main port (its token buckets are there, shared by both
    ports); where the main port sheds, only critical tenants (never shed) are served by the fast path, and
    a call asking for a class (x-maas-priority) goes to the main port."""
    cache, sheds = admission.cache, admission.settings.sheds
    return fastpath_pb2.FastPathAuth(
        synced=cache.synced.is_set(),
        tenants=[
            fastpath_pb2.FastPathTenant(
                name=tenant.name,
                key_sha256=key_sha256,
                revoked=tenant.revoked,
                revoked_message=revoked_message(tenant),
                allowed=sorted(tenant.allowed),
                denied_message=denied_message(tenant, ASKED_PLACEHOLDER),
                served_here=tenant.requests is None
                and tenant.cost is None
                and (not sheds or tenant.priority == "critical"),
            )
            for key_sha256, tenant in cache.by_hash.items()
        ],
        missing_key_message=MISSING_KEY_MESSAGE,
        malformed_key_message=MALFORMED_KEY_MESSAGE,
        unknown_key_message=UNKNOWN_KEY_MESSAGE,
        priority_metadata=PRIORITY_METADATA if sheds else "",
        asked_placeholder=ASKED_PLACEHOLDER,
    )


def split_draw() -> fastpath_pb2.SplitDraw:
    return fastpath_pb2.SplitDraw(
        sequence_step=SPLIT_STEP,
        key_hash=fastpath_pb2.KEY_HASH_BLAKE2B_64,
        salt=SPLIT_SALT,
        key_separator=KEY_SEPARATOR,
    )


def framed(message: Message) -> bytes:
    """A message as the forwarder reads it from stdin: its size (4 bytes, big-endian), then its bytes."""
    data = message.SerializeToString()
    return len(data).to_bytes(4, "big") + data


def add_to_histogram(child, bucket_counts: list[int], seconds: float) -> None:
    """Adds observations counted elsewhere (per bucket, not cumulative) to a prometheus_client
    histogram child. The library has no bulk observe: this touches its per-bucket values, which
    tests/unit/test_router_fastpath.py checks against what observe() would have exported."""
    buckets = child._buckets  # noqa: SLF001 - see above
    if len(bucket_counts) != len(buckets):
        raise ValueError(f"{len(bucket_counts)} bucket counts for a histogram of {len(buckets)} buckets")
    for bucket, count in zip(buckets, bucket_counts):
        if count:
            bucket.inc(count)
    child._sum.inc(seconds)  # noqa: SLF001


@dataclass(frozen=True)
class FastPathSettings:
    binary: str
    listen: str
    fallback: str  # the router's own main address
    max_message_bytes: int
    default_timeout: float
    grace: float
    stats_interval: float = 1.0
    # The router's TLS settings: the forwarder serves them and uses them towards Triton and the fallback.
    tls: TlsSettings | None = None


def tls_flags(tls: TlsSettings | None) -> list[str]:
    if tls is None:
        return []
    return [
        "--tls-cert",
        str(tls.cert),
        "--tls-key",
        str(tls.key),
        "--tls-ca",
        str(tls.ca),
        "--tls-client-auth",
        tls.client_auth,
        *(["--tls-server-name", tls.server_name] if tls.server_name else []),
    ]


class FastPath:
    """Runs the forwarder as a child process for as long as the router runs, restarting it if it dies.

    Its stdin carries routing snapshots (sent again on every table, replica or tenant list change); its
    stdout reports its port, then request counts (per tenant too), refusals, durations and in-flight calls,
    which land in this process's metrics, and per-version counts and latency histograms, which join the
    registry's rollout figures (version_stats).
    Closing its stdin (also when this process dies) makes it drain and exit."""

    def __init__(
        self,
        settings: FastPathSettings,
        table: RoutingTable,
        pool: ReplicaPool,
        version_stats: VersionStatsReporter | None = None,
        admission: Admission | None = None,
    ):
        self.settings = settings
        self.table, self.pool = table, pool
        # With auth on: its tenant list goes in every snapshot, and the forwarder's admitted calls count in
        # its in-flight calls (what priority shedding weighs) and in the tenants' metrics.
        self.admission = admission if admission is not None and admission.settings.auth else None
        self.version_stats = version_stats  # its per-version counts join the registry's rollout figures
        self.port: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._reported_inflight = 0
        self._listening: asyncio.Future | None = None
        self._listeners: list[list] = []

    async def start(self, timeout: float = 10.0) -> None:
        """Start the forwarder; returns once it listens (raises RuntimeError if it cannot)."""
        self._listeners = [self.table.listeners, self.pool.listeners]
        if self.admission is not None:
            self._listeners.append(self.admission.cache.listeners)  # a revocation is pushed at once
        for listeners in self._listeners:
            listeners.append(self.push)
        self._listening = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="oip-fastpath")
        try:
            self.port = await asyncio.wait_for(asyncio.shield(self._listening), timeout)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            await self.stop()
            raise RuntimeError(f"{BINARY_NAME} did not start on {self.settings.listen}: {exc}") from None
        log.info(
            "oip fast path serving",
            extra={"listen": self.settings.listen, "port": self.port, "tls": self.settings.tls is not None},
        )

    def push(self) -> None:
        """Send the current routing state (called on every change; writes do not block)."""
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        process.stdin.write(framed(snapshot(self.table, self.pool.addresses, self.admission)))

    async def stop(self) -> None:
        self._stopping = True
        for listeners in self._listeners:
            with contextlib.suppress(ValueError):  # stop() may run twice (after a failed start)
                listeners.remove(self.push)
        process = self._process
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()  # the forwarder drains its calls and exits
            try:
                await asyncio.wait_for(process.wait(), self.settings.grace + 2)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._report_inflight(0)

    # -- internals ---------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        s = self.settings
        budget = self.pool.budget.settings  # the forwarder keeps its own count, with the same budget
        return [
            s.binary,
            "--listen",
            s.listen,
            "--fallback",
            s.fallback,
            "--max-message-bytes",
            str(s.max_message_bytes),
            "--default-timeout",
            str(s.default_timeout),
            "--grace",
            str(s.grace),
            "--stats-interval",
            str(s.stats_interval),
            "--duration-buckets",
            ",".join(map(str, RPC_DURATION_BUCKETS)),  # +Inf is implied
            "--version-latency-bounds-ms",
            ",".join(map(str, LATENCY_BOUNDS_MS)),  # the per-version figures' histogram, for rollouts
            "--max-status-message-bytes",
            str(MAX_STATUS_MESSAGE_BYTES),
            "--not-serving-marker",
            NOT_SERVING_MARKER,
            "--not-serving-message",
            NOT_SERVING_MESSAGE,
            "--retry-budget",
            ",".join(map(str, (budget.ratio, budget.min_retries, budget.window_seconds))),
            *(arg for marker in MODEL_INPUT_ERROR_MARKERS for arg in ("--input-error-marker", marker)),
            *tls_flags(s.tls),
            *(["--require-auth"] if self.admission is not None else []),
        ]

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            self._process = await asyncio.create_subprocess_exec(
                *self._command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self.push()
            await self._read_reports(self._process)
            code = await self._process.wait()
            self._report_inflight(0)
            if self._stopping:
                return
            if self._listening is not None and not self._listening.done():
                self._listening.set_exception(RuntimeError(f"exited with code {code}"))
                return
            log.error("oip fast path exited; restarting", extra={"code": code, "backoff_seconds": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _read_reports(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            fields = raw.decode(errors="replace").rstrip("\n").split("\t")
            if fields[0] == "listening" and self._listening is not None and not self._listening.done():
                self._listening.set_result(int(fields[1]))
            elif fields[0] == "stats" and len(fields) == 2:
                self._report_inflight(int(fields[1]))
            elif fields[0] == "budget_refusals" and len(fields) == 2:
                POOL_BUDGET_REFUSALS.labels(self.pool.name).inc(int(fields[1]))
            elif fields[0] == "requests" and len(fields) == 6:
                model, version, route, code, count = fields[1:]
                name = _CODE_NAMES.get(int(code), code)
                RPC_REQUESTS.labels("router", "ModelInfer", model, version, name).inc(int(count))
                ROUTER_REQUESTS.labels(model, version, route).inc(int(count))
                if self.version_stats is not None and version.isdigit():
                    self.version_stats.record_counts(model, int(version), name, int(count))
            elif fields[0] == "tenant" and len(fields) == 4:
                tenant, requests, cost = fields[1:]
                TENANT_REQUESTS.labels(tenant, "ModelInfer").inc(int(requests))
                TENANT_COST.labels(tenant, "ModelInfer").inc(float(cost))
            elif fields[0] == "refusals" and len(fields) == 5:
                tenant, reason, code, count = fields[1:]
                TENANT_REFUSALS.labels(tenant, reason).inc(int(count))
                # As the main port counts its refusals: admission comes before routing, so no model or version.
                RPC_REQUESTS.labels("router", "ModelInfer", "", "", _CODE_NAMES.get(int(code), code)).inc(int(count))
            elif fields[0] == "latencies" and len(fields) == 4:
                model, version, counts = fields[1:]
                if self.version_stats is not None and version.isdigit():
                    self.version_stats.record_latencies(model, int(version), [int(n) for n in counts.split(",")])
            elif fields[0] == "durations" and len(fields) == 3:
                add_to_histogram(
                    RPC_DURATION.labels("router", "ModelInfer"),
                    [int(n) for n in fields[1].split(",")],
                    float(fields[2]),
                )

    def _report_inflight(self, inflight: int) -> None:
        """The forwarder's calls join the router's in-flight gauge (what the HPA scales on)."""
        ROUTER_INFLIGHT.inc(inflight - self._reported_inflight)
        if self.admission is not None:
            self.admission.inflight += inflight - self._reported_inflight
        self._reported_inflight = inflight
