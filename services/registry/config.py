"""Registry settings: flags first, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from maas import ports
from services.shared.config import (
    DEFAULT_RELOAD_CONCURRENCY,
    ServerSettings,
    add_server_arguments,
    add_triton_argument,
    env,
    env_float,
    env_int,
    require_non_negative,
    require_positive,
    server_settings,
    triton_addresses,
)
from services.shared.discovery import DiscoveryConfig, add_discovery_arguments, discovery_config

DEFAULT_LISTEN = ports.loopback(ports.REGISTRY)
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024 * 1024 * 1024  # 2 GiB
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class RegistryConfig:
    server: ServerSettings
    database: Path
    model_repository: Path
    # Every Triton replica the registry keeps in step (load/unload go to all of them): the static list...
    triton_addresses: tuple[str, ...]
    admin_token: str | None = None
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    load_timeout_seconds: float = 300.0
    # Events a slow Watch subscriber may fall behind before its stream is closed (it reconnects).
    watch_queue_size: int = 1024
    # How often every Triton replica is checked for the live versions (re-loaded after a Triton restart); 0 = off.
    reconcile_interval_seconds: float = 10.0
    # Models reloaded at once on a replica that lost them (services/registry/deployment.py).
    reload_concurrency: int = DEFAULT_RELOAD_CONCURRENCY
    # ...or, in Kubernetes, the ready replicas of the headless Triton Service (EndpointSlices).
    discovery: DiscoveryConfig | None = None  # None = static triton_addresses

    @property
    def replica_discovery(self) -> DiscoveryConfig:
        return self.discovery or DiscoveryConfig(mode="static", static_addresses=self.triton_addresses)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas-registry", description="MaaS Mesh registry: model versioning.")
    add_server_arguments(parser, DEFAULT_LISTEN)
    g = parser.add_argument_group("registry")
    g.add_argument(
        "--database",
        default=env("MAAS_REGISTRY_DB", ".maas/registry.sqlite3"),
        help="SQLite file holding versions, aliases and policies (MAAS_REGISTRY_DB)",
    )
    g.add_argument(
        "--model-repository",
        default=env("MAAS_MODEL_REPOSITORY", "model_repository"),
        help="Triton model repository the registry writes versions into (MAAS_MODEL_REPOSITORY)",
    )
    add_triton_argument(g)
    g.add_argument(
        "--max-artifact-bytes",
        type=int,
        default=env_int("MAAS_MAX_ARTIFACT_BYTES", DEFAULT_MAX_ARTIFACT_BYTES),
        help="largest artefact accepted for upload (MAAS_MAX_ARTIFACT_BYTES)",
    )
    g.add_argument(
        "--default-max-batch-size",
        type=int,
        default=env_int("MAAS_DEFAULT_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE),
        help="max_batch_size for versions that do not set one (MAAS_DEFAULT_MAX_BATCH_SIZE)",
    )
    g.add_argument(
        "--load-timeout",
        type=float,
        default=env_float("MAAS_LOAD_TIMEOUT_SECONDS", 300.0),
        help="seconds a Triton load + warm-up may take before the version fails (MAAS_LOAD_TIMEOUT_SECONDS)",
    )
    g.add_argument(
        "--watch-queue-size",
        type=int,
        default=env_int("MAAS_WATCH_QUEUE_SIZE", 1024),
        help="events a slow Watch subscriber may lag before being disconnected (MAAS_WATCH_QUEUE_SIZE)",
    )
    g.add_argument(
        "--reconcile-interval",
        type=float,
        default=env_float("MAAS_RECONCILE_INTERVAL_SECONDS", 10.0),
        help="seconds between checks that every Triton replica serves the live versions, 0 = off "
        "(MAAS_RECONCILE_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--reload-concurrency",
        type=int,
        default=env_int("MAAS_RELOAD_CONCURRENCY", DEFAULT_RELOAD_CONCURRENCY),
        help="models loaded at once when a Triton replica lost them, e.g. after a restart (MAAS_RELOAD_CONCURRENCY)",
    )
    add_discovery_arguments(parser)
    return parser


def load_config(argv: Sequence[str] | None = None) -> RegistryConfig:
    args = build_parser().parse_args(argv)
    discovery = discovery_config(args)
    addresses: tuple[str, ...] = ()
    if discovery.mode == "static":
        addresses = triton_addresses(args.triton)
        discovery = discovery_config(args, addresses)
    require_positive(
        args, "max_artifact_bytes", "default_max_batch_size", "load_timeout", "watch_queue_size", "reload_concurrency"
    )
    require_non_negative(args, "reconcile_interval")  # 0 = off
    return RegistryConfig(
        server=server_settings("registry", args),
        database=Path(args.database),
        model_repository=Path(args.model_repository),
        triton_addresses=addresses,
        admin_token=env("MAAS_ADMIN_TOKEN"),
        max_artifact_bytes=args.max_artifact_bytes,
        default_max_batch_size=args.default_max_batch_size,
        load_timeout_seconds=args.load_timeout,
        watch_queue_size=args.watch_queue_size,
        reconcile_interval_seconds=args.reconcile_interval,
        reload_concurrency=args.reload_concurrency,
        discovery=discovery,
    )
