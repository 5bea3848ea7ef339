"""Long-lived client channels to peers (one per peer, never per request)."""
from __future__ import annotations

import grpc

from services.shared.config import DEFAULT_MAX_MESSAGE_BYTES
from services.shared.server import channel_options
from services.shared.telemetry import tracing_client_interceptors


def open_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """An aio channel with explicit size limits, keepalive, and tracing when OTEL_* is set."""
    options = [
        *channel_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Reconnect quickly after a peer restarts instead of backing off for minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    return grpc.aio.insecure_channel(address, options=options, interceptors=tracing_client_interceptors() or None)
