"""Builds the registry's gRPC server: store, repository, Triton fleet, domain and servicer wired together."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from maas.v1 import registry_pb2, registry_pb2_grpc
from services.registry.auth import AdminAuth
from services.registry.config import RegistryConfig
from services.registry.registry import Registry
from services.registry.repository import ModelRepository
from services.registry.servicer import RegistryServicer
from services.registry.store import Store
from services.registry.tenants import Tenants
from services.registry.triton_fleet import TritonFleet
from services.shared.discovery import ReplicaSource, create_replica_source
from services.shared.readiness import triton_reachable, where_from
from services.shared.server import ServiceServer, build_server

log = logging.getLogger(__name__)

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def create_registry(cfg: RegistryConfig) -> Registry:
    executor = ThreadPoolExecutor(cfg.server.workers, thread_name_prefix="registry-validate")
    discovery = cfg.replica_discovery
    # Static replicas are in the fleet from the start; discovered ones join as the watcher reports them.
    return Registry(
        Store(cfg.database),
        ModelRepository(cfg.model_repository),
        TritonFleet(discovery.static_addresses, timeout=cfg.load_timeout_seconds, tls=cfg.server.tls),
        executor=executor,
        max_artifact_bytes=cfg.max_artifact_bytes,
        default_max_batch_size=cfg.default_max_batch_size,
        load_timeout=cfg.load_timeout_seconds,
        watch_queue_size=cfg.watch_queue_size,
        reconcile_interval=cfg.reconcile_interval_seconds,
        reload_concurrency=cfg.reload_concurrency,
    )


def fleet_reachable(registry: Registry, where: str, timeout: float):
    """The registry's readiness check: one of its Triton replicas answers (it loads versions there)."""

    async def check() -> str | None:
        return await triton_reachable(registry.fleet.members, registry.fleet.live, timeout, where)

    return check


# How long start-up waits for the first replica list before serving anyway (the watcher keeps trying).
DISCOVERY_SYNC_SECONDS = 60.0


@dataclass
class RegistryServer(ServiceServer):
    """The registry's server with its domain object (tests and benchmarks drive it directly)."""

    registry: Registry | None = None
    tenants: Tenants | None = None


def create_server(cfg: RegistryConfig, replica_source: ReplicaSource | None = None) -> tuple[RegistryServer, int]:
    """(server, bound port); `server.registry` is the domain object (tests and the bench use it).
    `replica_source` overrides the one built from cfg (tests pass a watcher on a fake Kubernetes API)."""
    registry = create_registry(cfg)
    tenants = Tenants(registry.store)
    replicas = replica_source or create_replica_source(cfg.replica_discovery)

    async def follow_replicas() -> None:
        # The first replica set is handed over (new replicas caught up) before the first RPC.
        await replicas.start(registry.set_triton_replicas)
        try:
            await replicas.wait_synced(DISCOVERY_SYNC_SECONDS)
        except TimeoutError:
            log.warning("no Triton replica list yet; serving anyway (versions wait for a replica)")

    def register(server):
        registry_pb2_grpc.add_RegistryServicer_to_server(
            RegistryServicer(registry, AdminAuth(cfg.admin_token), tenants), server
        )
        return [SERVICE_NAME]

    built, port = build_server(cfg.server, register)
    server = RegistryServer(
        **{f.name: getattr(built, f.name) for f in fields(built)}, registry=registry, tenants=tenants
    )
    # Crash clean-up and reconciling Triton finish before the first RPC is accepted.
    server.on_start.extend([follow_replicas, registry.start])
    server.readiness_checks.append(
        fleet_reachable(registry, where_from(cfg.replica_discovery), cfg.server.readiness_interval_seconds)
    )
    server.on_stop.extend([replicas.stop, registry.stop, registry.store.close])
    return server, port
