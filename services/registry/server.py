"""Builds the registry's gRPC server: store, repository, Triton fleet, domain and servicer wired together."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from maas.v1 import registry_pb2, registry_pb2_grpc
from services.registry.auth import AdminAuth
from services.registry.config import RegistryConfig
from services.registry.registry import Registry
from services.registry.repository import ModelRepository
from services.registry.servicer import RegistryServicer
from services.registry.store import Store
from services.registry.triton_fleet import TritonFleet
from services.shared.server import ServiceServer, build_server

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def create_registry(cfg: RegistryConfig) -> Registry:
    executor = ThreadPoolExecutor(cfg.server.workers, thread_name_prefix="registry-validate")
    return Registry(
        Store(cfg.database), ModelRepository(cfg.model_repository),
        TritonFleet(list(cfg.triton_addresses), timeout=cfg.load_timeout_seconds), executor=executor,
        max_artifact_bytes=cfg.max_artifact_bytes, default_max_batch_size=cfg.default_max_batch_size,
        load_timeout=cfg.load_timeout_seconds, watch_queue_size=cfg.watch_queue_size,
        reconcile_interval=cfg.reconcile_interval_seconds,
    )


def create_server(cfg: RegistryConfig) -> tuple[ServiceServer, int]:
    """(server, bound port); `server.registry` is the domain object (tests and the bench use it)."""
    registry = create_registry(cfg)

    def register(server):
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(registry, AdminAuth(cfg.admin_token)), server)
        return [SERVICE_NAME]

    server, port = build_server(cfg.server, register)
    # Crash clean-up and reconciling Triton finish before the first RPC is accepted.
    server.on_start.append(registry.start)
    server.on_stop.extend([registry.stop, registry.store.close])
    server.registry = registry
    return server, port
