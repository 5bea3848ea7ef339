"""OpenAI gateway settings: flags, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from maas import ports
from services.shared.config import (
    ServerSettings,
    add_peer_argument,
    add_server_arguments,
    env,
    env_float,
    env_int,
    require_peer,
    require_positive,
    server_settings,
)

# Not a port of the mesh's gRPC services (50051-50055) nor of Triton (8000-8002).
DEFAULT_LISTEN = ports.loopback(ports.OPENAI)


@dataclass(frozen=True)
class GatewayLimits:
    """Checked before any call to the router (HTTP 413 / 429 with an OpenAI error body)."""

    max_request_bytes: int = 1024 * 1024  # request body
    max_inflight: int = 256  # requests being served at once (streams included); more → 429


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSettings
    router: str
    registry: str
    default_chat_model: str = "smollm2"
    default_embedding_model: str = "minilm"
    # Deadline of a router call when the client sends no X-Request-Timeout header.
    default_timeout: float = 120.0
    limits: GatewayLimits = GatewayLimits()

    @property
    def host(self) -> str:
        return self.server.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.server.listen.rsplit(":", 1)[1])


def load_config(argv: list[str] | None = None) -> GatewayConfig:
    parser = argparse.ArgumentParser(prog="maas-openai", description="MaaS Mesh OpenAI-compatible HTTP gateway")
    add_server_arguments(parser, DEFAULT_LISTEN)
    peers = parser.add_argument_group("peers")
    add_peer_argument(peers, "--router", "MAAS_ROUTER_ADDRESS", "127.0.0.1:50051", "router")
    add_peer_argument(peers, "--registry", "MAAS_REGISTRY_ADDRESS", "127.0.0.1:50052", "registry (for /v1/models)")
    g = parser.add_argument_group("gateway")
    g.add_argument(
        "--default-chat-model",
        default=env("MAAS_OPENAI_DEFAULT_CHAT_MODEL", "smollm2"),
        help="model of chat/completions requests that name none (MAAS_OPENAI_DEFAULT_CHAT_MODEL)",
    )
    g.add_argument(
        "--default-embedding-model",
        default=env("MAAS_OPENAI_DEFAULT_EMBEDDING_MODEL", "minilm"),
        help="model of embeddings requests that name none (MAAS_OPENAI_DEFAULT_EMBEDDING_MODEL)",
    )
    g.add_argument(
        "--default-timeout",
        type=float,
        default=env_float("MAAS_OPENAI_DEFAULT_TIMEOUT_SECONDS", 120.0),
        help="deadline of a router call (MAAS_OPENAI_DEFAULT_TIMEOUT_SECONDS)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=env_int("MAAS_OPENAI_MAX_REQUEST_BYTES", GatewayLimits.max_request_bytes),
        help="largest request body; larger → 413 (MAAS_OPENAI_MAX_REQUEST_BYTES)",
    )
    g.add_argument(
        "--max-inflight",
        type=int,
        default=env_int("MAAS_OPENAI_MAX_INFLIGHT", GatewayLimits.max_inflight),
        help="requests served at once, streams included; more → 429 (MAAS_OPENAI_MAX_INFLIGHT)",
    )
    args = parser.parse_args(argv)
    require_positive(args, "default_timeout", "max_request_bytes", "max_inflight")
    settings = server_settings("openai", args)
    require_peer(settings.listen, "--listen", "MAAS_LISTEN")
    return GatewayConfig(
        server=settings,
        router=require_peer(args.router, "--router", "MAAS_ROUTER_ADDRESS"),
        registry=require_peer(args.registry, "--registry", "MAAS_REGISTRY_ADDRESS"),
        default_chat_model=args.default_chat_model,
        default_embedding_model=args.default_embedding_model,
        default_timeout=args.default_timeout,
        limits=GatewayLimits(max_request_bytes=args.max_request_bytes, max_inflight=args.max_inflight),
    )
