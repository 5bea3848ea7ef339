"""create_server(cfg): the router's gRPC server, its long-lived peer channels and background tasks.

Call it inside a running event loop (services.shared.server.run does): it starts the registry watch.
Health "" is SERVING once started; "readiness" only while a Triton replica answers ServerLive
(services.shared.readiness; a wrong --triton keeps the pod unready with the reason logged). Until the
first routing snapshot arrives requests get UNAVAILABLE
("routing state not received from the registry yet") and OIP ServerReady answers false.

Triton calls are spread over every replica the discovery source reports (static --triton list, or the
ready endpoints of the headless Service). With discovery, a new replica gets calls only once it serves
every READY version of the routing table (the registry loads them there); static replicas are trusted
as given, so one static address costs what a single channel did.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import logging

from maas.v1 import router_pb2, router_pb2_grpc
from services.router.admission import Admission
from services.router.config import RouterConfig
from services.router.dataplane import Dataplane
from services.router.fastpath import BINARY_NAME, FastPath, FastPathSettings
from services.router.generation import Generation
from services.router.peers import TokenizerPeer, TritonPeer, VisionPeer
from services.router.queue_time import TritonQueueTime
from services.router.routing import RoutingTable
from services.router.servicer import InferenceServicer, RouterServicer, add_inference_service
from services.router.shadow import ShadowRunner
from services.router.tenants import TenantCache, TenantWatcher
from services.router.version_stats import VersionStatsReporter
from services.router.watcher import RegistryWatcher
from services.shared.channels import open_channel
from services.shared.discovery import ReplicaSource, StaticReplicas, create_replica_source
from services.shared.readiness import triton_reachable, where_from
from services.shared.replica_pool import ReplicaPool, triton_admission, triton_live
from services.shared.server import ServiceServer, build_server

log = logging.getLogger(__name__)


@dataclass
class RouterServer(ServiceServer):
    """The router's server with its admission (tests read its tenant cache)."""

    admission: Admission | None = None


def create_server(cfg: RouterConfig, triton_source: ReplicaSource | None = None) -> tuple[RouterServer, int]:
    """triton_source: where Triton replicas come from (default: from cfg; tests pass their own)."""
    limit, tls = cfg.server.max_message_bytes, cfg.server.tls
    channels = {name: open_channel(getattr(cfg, name), limit, tls) for name in ("registry", "tokenizer", "vision")}
    table = RoutingTable()
    watcher = RegistryWatcher(channels["registry"], table)
    shadow = ShadowRunner(
        channels["registry"],
        max_inflight=cfg.shadow_max_inflight,
        timeout=cfg.shadow_timeout,
        report_interval=cfg.shadow_report_interval,
        admin_token=cfg.admin_token,
    )
    version_stats = VersionStatsReporter(
        channels["registry"], report_interval=cfg.stats_report_interval, admin_token=cfg.admin_token
    )
    source = triton_source or create_replica_source(cfg.triton_discovery())
    serving = admit_when_serving(table)
    admit = None if isinstance(source, StaticReplicas) else serving
    # An ejected replica (outlier detection) comes back once it serves the READY versions again.
    pool = ReplicaPool(
        "triton",
        connect=lambda address: open_channel(address, limit, tls),
        admit=admit,
        outlier=cfg.outlier,
        retry_budget=cfg.retry_budget,
        probe=serving,
    )
    triton = TritonPeer(pool)
    plane = Dataplane(
        table,
        triton,
        TokenizerPeer(channels["tokenizer"], cfg.tokenizer),
        VisionPeer(channels["vision"], cfg.vision),
        shadow,
        default_timeout=cfg.default_timeout,
        max_batch_items=cfg.max_batch_items,
        version_stats=version_stats,
    )

    # Triton's queue time, sampled only when a threshold uses it (priority shedding, admission.py).
    queue = TritonQueueTime(pool, cfg.admission.queue_sample_interval) if cfg.admission.sheds_on_queue_time else None
    admission = Admission(cfg.admission, TenantCache(), queue)
    tenants = TenantWatcher(channels["registry"], admission.cache, cfg.admin_token) if cfg.admission.auth else None

    def register(server):
        router_pb2_grpc.add_RouterServicer_to_server(
            RouterServicer(plane, Generation(plane, cfg.generation), admission), server
        )
        return [
            router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
            add_inference_service(InferenceServicer(plane, table, triton, admission=admission), server),
        ]

    built, port = build_server(cfg.server, register)
    service = RouterServer(**{f.name: getattr(built, f.name) for f in fields(built)}, admission=admission)
    if cfg.oip_fast_listen:
        # With auth on it checks keys against the same tenant cache (sent in its snapshots).
        add_fast_path(service, port, cfg, table, pool, version_stats, admission)
    service.readiness_checks.append(
        pool_reachable(pool, where_from(cfg.triton_discovery()), cfg.server.readiness_interval_seconds)
    )
    watcher.start()
    if tenants is not None:
        tenants.start()
    # Static replicas are known at once; a watcher reports its first set shortly after (until then
    # Triton calls get UNAVAILABLE "no triton replica is ready").
    service.on_start.append(lambda: source.start(pool.set_replicas))
    if queue is not None:
        service.on_start.append(queue.start)
    # After the gRPC server drained: stop following the registry, report the last shadow results, close.
    service.on_stop.extend(
        [
            watcher.stop,
            *([tenants.stop] if tenants else []),
            shadow.stop,
            version_stats.stop,
            source.stop,
            *([queue.stop] if queue else []),
            pool.close,
            *(channel.close for channel in channels.values()),
        ]
    )
    return service, port


def pool_reachable(pool: ReplicaPool, where: str, timeout: float):
    """The router's readiness check: one of the Triton replicas discovery reports answers."""

    async def check() -> str | None:
        known = pool.known()
        return await triton_reachable(known, lambda address, t: triton_live(known[address], t), timeout, where)

    return check


def admit_when_serving(table: RoutingTable):
    """A discovered replica joins once the routing state is known and it serves every READY version
    (before the first snapshot the required set would look empty and let an unloaded replica in)."""
    serves_ready_versions = triton_admission(table.ready_versions)

    async def admit(address, channel) -> bool:
        return table.has_state and await serves_ready_versions(address, channel)

    return admit


def add_fast_path(
    service: ServiceServer,
    port: int,
    cfg: RouterConfig,
    table: RoutingTable,
    pool: ReplicaPool,
    version_stats: VersionStatsReporter | None = None,
    admission: Admission | None = None,
) -> None:
    """Run the OIP fast path beside this server; what it cannot settle comes to `port`."""
    if not cfg.oip_fast_binary:
        log.warning(
            "%s not found: the OIP fast path is off (build it with `make fastpath`); "
            "the main port still serves the Open Inference Protocol",
            BINARY_NAME,
            extra={"oip_fast_listen": cfg.oip_fast_listen},
        )
        return
    host = cfg.server.listen.rsplit(":", 1)[0]
    local = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host
    fast_path = FastPath(
        FastPathSettings(
            binary=cfg.oip_fast_binary,
            listen=cfg.oip_fast_listen,
            fallback=f"{local}:{port}",
            max_message_bytes=cfg.server.max_message_bytes,
            default_timeout=cfg.default_timeout,
            grace=cfg.server.grace_seconds,
            tls=cfg.server.tls,
        ),
        table,
        pool,
        version_stats,
        admission,
    )
    service.on_start.append(fast_path.start)
    service.on_drain.append(fast_path.stop)
