"""Long-lived client channels to peers (one per peer, never per request).

A peer address may list several replicas (`10.0.0.5:50053,10.0.0.6:50053`): the channel then spreads
calls round robin over them and watches each one's grpc.health.v1 status, so a replica that starts
draining (health NOT_SERVING, services/shared/server.py) gets no new calls while its in-flight ones
finish, and none is lost. One address (a ClusterIP Service) keeps gRPC's default: one connection,
re-made when the server closes it. A `dns:///name:port` target (a headless Service) is balanced and
health-checked the same way over every address the name resolves to.

With TLS settings (services/shared/tls.py) a channel is mTLS: it trusts the CA and presents the
service's own certificate; otherwise plaintext.
"""

from __future__ import annotations

import ipaddress
import json

import grpc

from services.shared.config import DEFAULT_MAX_MESSAGE_BYTES, ConfigError
from services.shared.server import channel_options
from services.shared.telemetry import tracing_client_interceptors
from services.shared.tls import TlsSettings, channel_credentials
from services.shared.tls import channel_options as tls_channel_options

# Round robin over the ready replicas, each health-checked (the whole server's status, service "").
BALANCED_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def channel_target(address: str) -> tuple[str, bool]:
    """(gRPC target, balanced?) for a peer address: one host:port, a comma-separated list of IP
    host:port (-> an ipv4:/ipv6: target), or a dns:/// target."""
    if address.startswith("dns:///"):
        return address, True
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if len(parts) <= 1:
        return address, False
    families = set()
    for part in parts:
        host = part.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ConfigError(
                f"peer address list {address!r}: {part!r} is not an IP host:port (a list takes IP "
                f"addresses; for a name use dns:///name:port)"
            ) from None
    if len(families) != 1:
        raise ConfigError(f"peer address list {address!r} mixes IPv4 and IPv6")
    return f"ipv{families.pop()}:{','.join(parts)}", True


def open_channel(
    address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TlsSettings | None = None
) -> grpc.aio.Channel:
    """An aio channel with explicit size limits, keepalive, tracing when OTEL_* is set, mTLS with `tls`."""
    target, balanced = channel_target(address)
    options = [
        *channel_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect quickly after a peer restarts instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        *([("grpc.service_config", BALANCED_SERVICE_CONFIG)] if balanced else []),
        *tls_channel_options(tls),
    ]
    interceptors = tracing_client_interceptors() or None
    if tls is not None:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
