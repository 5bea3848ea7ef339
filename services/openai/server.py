"""Serve the gateway with uvicorn: structured logs, tracing and metrics set up as in every service.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections and lets requests in flight (streams
included) finish within the drain grace, then closes the router channels (the app's lifespan).
"""

from __future__ import annotations

import uvicorn

from services.openai.app import create_app
from services.openai.config import GatewayConfig
from services.shared.structured_logging import configure_logging
from services.shared.telemetry import setup_tracing, shutdown_tracing, start_metrics_server


def uvicorn_config(config: GatewayConfig) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(config.server.grace_seconds)),
        server_header=False,
    )


def run(config: GatewayConfig) -> None:
    configure_logging(config.server.service_name, config.server.log_level, config.server.log_format)
    setup_tracing("maas-openai")
    start_metrics_server(config.server.metrics_port)
    try:
        uvicorn.Server(uvicorn_config(config)).run()
    finally:
        shutdown_tracing()
