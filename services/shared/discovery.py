"""Which Triton replicas exist right now: a fixed list locally, EndpointSlices in Kubernetes.

Both sources call an async `on_change(addresses)` with the full set of ready `host:port` gRPC addresses
whenever it changes (and once after the first successful read, even when it is empty):

    source = create_replica_source(cfg.discovery)
    await source.start(fleet.set_replicas)      # returns at once; wait_synced() waits for the first set
    ...
    await source.stop()

TritonReplicaWatcher lists then watches `discovery.k8s.io/v1` EndpointSlices of the headless Triton
Service with the official `kubernetes` client. The client is blocking, so list+watch runs in one daemon
thread; it hands each new set to the event loop, where a single task calls `on_change` - serially, and
with only the newest set when changes arrive faster than the callback finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from prometheus_client import Counter, Gauge

from services.shared.config import ConfigError, env

log = logging.getLogger(__name__)

OnChange = Callable[[frozenset[str]], Awaitable[None] | None]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_GONE = 410

REPLICAS = Gauge("maas_discovery_replicas", "Ready replicas the discovery source currently reports", ["service"])
DISCOVERY_ERRORS = Counter(
    "maas_discovery_errors", "Failed or expired list/watch calls to the Kubernetes API", ["service", "reason"]
)


# -- EndpointSlice -> addresses (pure) -------------------------------------------------------------
def endpoint_is_ready(conditions: k8s.V1EndpointConditions | None) -> bool:
    """Kubernetes: a missing `ready` means unknown and consumers should treat it as ready."""
    if conditions is None:
        return True
    if conditions.terminating:
        return False
    return conditions.ready is None or bool(conditions.ready)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def slice_addresses(endpoint_slice: k8s.V1EndpointSlice, port_name: str = "grpc") -> frozenset[str]:
    """`host:port` of the ready endpoints of one slice, on the port named `port_name` (none if absent)."""
    port = next((p.port for p in endpoint_slice.ports or () if (p.name or "") == port_name and p.port), None)
    if port is None:
        return frozenset()
    # Kubernetes defines no meaning for addresses after the first (kube-proxy ignores them too).
    return frozenset(
        format_address(ep.addresses[0], port)
        for ep in endpoint_slice.endpoints or ()
        if ep.addresses and endpoint_is_ready(ep.conditions)
    )


def ready_addresses(slices: Iterable[k8s.V1EndpointSlice], port_name: str = "grpc") -> frozenset[str]:
    """Union over all slices of a Service (a Service has several slices past 100 endpoints or dual-stack)."""
    return frozenset().union(*(slice_addresses(s, port_name) for s in slices))


# -- sources ---------------------------------------------------------------------------------------
class ReplicaSource(Protocol):
    @property
    def addresses(self) -> frozenset[str]: ...

    async def start(self, on_change: OnChange) -> None: ...

    async def wait_synced(self, timeout: float | None = None) -> frozenset[str]: ...

    async def stop(self) -> None: ...


async def _call(on_change: OnChange, addresses: frozenset[str]) -> None:
    result = on_change(addresses)
    if inspect.isawaitable(result):
        await result


class StaticReplicas:
    """A fixed list of replicas (local runs, `--triton a:8001,b:8001`)."""

    def __init__(self, addresses: Iterable[str]):
        self._addresses = frozenset(addresses)

    @property
    def addresses(self) -> frozenset[str]:
        return self._addresses

    async def start(self, on_change: OnChange) -> None:
        await _call(on_change, self._addresses)

    async def wait_synced(self, timeout: float | None = None) -> frozenset[str]:
        return self._addresses

    async def stop(self) -> None:
        pass


class TritonReplicaWatcher:
    """Ready replicas of a headless Service, from a list+watch of its EndpointSlices.

    Resumes watches from the last resourceVersion, re-lists when it has expired (410 Gone), and backs
    off exponentially (with jitter) on API errors, keeping the last known set meanwhile.
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        *,
        api_client: k8s.ApiClient | None = None,
        port_name: str = "grpc",
        watch_timeout_seconds: int = 300,
        request_timeout_seconds: float = 30.0,
        backoff_initial_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
    ):
        self.service = service
        self.namespace = namespace
        self.port_name = port_name
        self._own_client = api_client is None
        self._api_client = api_client
        self._watch_timeout = int(watch_timeout_seconds)
        self._request_timeout = request_timeout_seconds
        self._backoff = (backoff_initial_seconds, backoff_max_seconds)
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        # Shared between the watch thread and the loop; guarded by _lock.
        self._lock = threading.Lock()
        self._latest: frozenset[str] | None = None
        self._stopping = threading.Event()
        self._watch = k8s_watch.Watch()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._synced: asyncio.Event | None = None
        self._delivery: asyncio.Task | None = None
        self.relists = 0  # how many full lists were made (1 + one per expiry); tests and logs read it

    @property
    def addresses(self) -> frozenset[str]:
        """The newest set seen (empty before the first list)."""
        with self._lock:
            return self._latest or frozenset()

    async def start(self, on_change: OnChange) -> None:
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        if self._api_client is None:
            self._api_client = kube_api_client()
        self._loop = asyncio.get_running_loop()
        self._changed, self._synced = asyncio.Event(), asyncio.Event()
        self._delivery = asyncio.create_task(self._deliver(on_change), name=f"discovery-{self.service}")
        self._thread = threading.Thread(target=self._run, name=f"discovery-{self.service}", daemon=True)
        self._thread.start()

    async def wait_synced(self, timeout: float | None = None) -> frozenset[str]:
        """Wait until the first list succeeded and on_change has been called with its result."""
        if self._synced is None:
            raise RuntimeError("watcher not started")
        await asyncio.wait_for(self._synced.wait(), timeout)
        return self.addresses

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._join_thread)
        if self._delivery is not None:
            self._delivery.cancel()
            try:
                await self._delivery
            except asyncio.CancelledError:
                pass
        if self._own_client and self._api_client is not None:
            self._api_client.close()
            self._api_client = None

    def _join_thread(self, timeout: float = 10.0) -> None:
        # Watch.stop() shuts the socket of a blocked read; repeat it in case a new watch request was
        # being sent when stop began.
        for _ in range(int(timeout / 0.1)):
            self._watch.stop()
            self._thread.join(0.1)
            if not self._thread.is_alive():
                break
        if self._thread.is_alive():
            log.warning("discovery thread still running after stop", extra={"service": self.service})

    # -- loop side ---------------------------------------------------------------------------------
    async def _deliver(self, on_change: OnChange) -> None:
        delivered: frozenset[str] | None = None
        failures = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            latest = self.addresses
            if latest == delivered:
                continue
            previous = delivered or frozenset()
            log.info(
                "replicas changed",
                extra={
                    "service": self.service,
                    "replicas": sorted(latest),
                    "added": sorted(latest - previous),
                    "removed": sorted(previous - latest),
                },
            )
            REPLICAS.labels(self.service).set(len(latest))
            try:
                await _call(on_change, latest)
            except Exception:
                # Hand the same set again later: a replica that could not be set up now may be fine
                # in a moment, and the watch itself may report no further change for a long time.
                failures += 1
                delay = min(self._backoff[0] * 2**failures, self._backoff[1])
                log.exception(
                    "replica change callback failed; retrying in %.1fs", delay, extra={"service": self.service}
                )
                self._loop.call_later(delay, self._changed.set)
            else:
                failures, delivered = 0, latest
            self._synced.set()  # the first set has been handed over (wait_synced returns either way)

    # -- thread side -------------------------------------------------------------------------------
    def _publish(self, slices: dict[str, frozenset[str]]) -> None:
        addresses = frozenset().union(*slices.values())
        with self._lock:
            first, changed = self._latest is None, addresses != self._latest
            self._latest = addresses
        if first or changed:
            try:
                self._loop.call_soon_threadsafe(self._changed.set)
            except RuntimeError:  # the loop closed under us: nobody is listening any more
                self._stopping.set()

    def _list(self, api: k8s.DiscoveryV1Api) -> tuple[dict[str, frozenset[str]], str]:
        listing = api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self._selector, _request_timeout=self._request_timeout
        )
        self.relists += 1
        slices = {s.metadata.name: slice_addresses(s, self.port_name) for s in listing.items or ()}
        return slices, listing.metadata.resource_version

    def _watch_from(self, api: k8s.DiscoveryV1Api, slices: dict[str, frozenset[str]], version: str) -> str:
        """Apply watch events to `slices` until the server ends the watch; returns the last version."""
        stream = self._watch.stream(
            api.list_namespaced_endpoint_slice,
            self.namespace,
            label_selector=self._selector,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            # The read timeout catches a silently dead connection; the server ends the watch first.
            _request_timeout=(self._request_timeout, self._watch_timeout + self._request_timeout),
        )
        for event in stream:
            if self._stopping.is_set():
                break
            kind, obj = event["type"], event["object"]
            if kind in ("ADDED", "MODIFIED"):
                slices[obj.metadata.name] = slice_addresses(obj, self.port_name)
            elif kind == "DELETED":
                slices.pop(obj.metadata.name, None)
            version = self._watch.resource_version or version  # BOOKMARKs advance it too
            if kind != "BOOKMARK":
                self._publish(slices)
        return version

    def _run(self) -> None:
        api = k8s.DiscoveryV1Api(self._api_client)
        initial, maximum = self._backoff
        delay = initial
        slices: dict[str, frozenset[str]] = {}
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    slices, version = self._list(api)
                    self._publish(slices)
                version = self._watch_from(api, slices, version)
                delay = initial
                continue
            except k8s.ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == HTTP_GONE:
                    # Our resourceVersion is older than the server's history: start again from a list.
                    DISCOVERY_ERRORS.labels(self.service, "expired").inc()
                    log.info("watch expired, re-listing", extra={"service": self.service})
                    version = None
                    continue
                reason = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(exc.status, "api_error")
                DISCOVERY_ERRORS.labels(self.service, reason).inc()
                log.warning(
                    "EndpointSlice %s failed: %s %s%s",
                    "list" if version is None else "watch",
                    exc.status,
                    exc.reason,
                    " (may the service account list/watch endpointslices?)" if exc.status == 403 else "",
                    extra={"service": self.service, "namespace": self.namespace},
                )
            except Exception as exc:  # noqa: BLE001 - connection refused/reset, timeouts, malformed responses
                if self._stopping.is_set():
                    break
                DISCOVERY_ERRORS.labels(self.service, "connection").inc()
                log.warning(
                    "EndpointSlice watch interrupted: %s",
                    exc,
                    extra={"service": self.service, "namespace": self.namespace},
                )
            # Resume from `version` after the pause (still valid unless the server says 410).
            self._stopping.wait(random.uniform(delay / 2, delay))
            delay = min(delay * 2, maximum)


# -- configuration ---------------------------------------------------------------------------------
DISCOVERY_MODES = ("static", "endpointslices")


@dataclass(frozen=True)
class DiscoveryConfig:
    mode: str  # "static" | "endpointslices"
    static_addresses: tuple[str, ...] = ()
    service: str | None = None
    namespace: str | None = None


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    """--triton-discovery, --triton-service, --namespace (the static list is the service's --triton)."""
    g = parser.add_argument_group("triton discovery")
    g.add_argument(
        "--triton-discovery",
        choices=DISCOVERY_MODES,
        default=env("MAAS_TRITON_DISCOVERY", "static"),
        help="static: the --triton addresses; endpointslices: every ready replica of the headless "
        "Service --triton-service (MAAS_TRITON_DISCOVERY)",
    )
    g.add_argument(
        "--triton-service",
        default=env("MAAS_TRITON_SERVICE"),
        help="headless Triton Service whose EndpointSlices are watched (MAAS_TRITON_SERVICE)",
    )
    g.add_argument(
        "--namespace",
        default=env("MAAS_NAMESPACE"),
        help="namespace of that Service; default: this pod's namespace (MAAS_NAMESPACE)",
    )


def pod_namespace(path: Path | None = None) -> str | None:
    try:
        return (path or NAMESPACE_FILE).read_text().strip() or None
    except OSError:
        return None


def discovery_config(args: argparse.Namespace, static_addresses: Iterable[str] = ()) -> DiscoveryConfig:
    """Validate the discovery flags; fails fast on a missing Service name or namespace."""
    mode = args.triton_discovery
    if mode not in DISCOVERY_MODES:
        raise ConfigError(f"--triton-discovery / MAAS_TRITON_DISCOVERY must be one of {DISCOVERY_MODES}, got {mode!r}")
    if mode == "static":
        return DiscoveryConfig(mode=mode, static_addresses=tuple(static_addresses))
    if not args.triton_service:
        raise ConfigError("--triton-discovery=endpointslices needs --triton-service / MAAS_TRITON_SERVICE")
    namespace = args.namespace or pod_namespace()
    if not namespace:
        raise ConfigError(f"--namespace / MAAS_NAMESPACE is unset and {NAMESPACE_FILE} is not readable")
    return DiscoveryConfig(mode=mode, service=args.triton_service, namespace=namespace)


def kube_api_client() -> k8s.ApiClient:
    """In a pod: the service account; elsewhere: the current kubeconfig context."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)
    return k8s.ApiClient(configuration)


def create_replica_source(cfg: DiscoveryConfig, api_client: k8s.ApiClient | None = None) -> ReplicaSource:
    if cfg.mode == "endpointslices":
        return TritonReplicaWatcher(cfg.service, cfg.namespace, api_client=api_client)
    return StaticReplicas(cfg.static_addresses)
