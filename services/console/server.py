"""Serve the console with uvicorn: structured logs, tracing and metrics set up as in every service.

On SIGTERM uvicorn stops accepting connections and gives open ones (event streams, a chat) the drain
grace, then the app's lifespan closes the channels (which cancels their calls).
"""

from __future__ import annotations

import uvicorn

from services.console.app import create_app
from services.console.config import ConsoleConfig
from services.shared.structured_logging import configure_logging
from services.shared.telemetry import setup_tracing, shutdown_tracing, start_metrics_server


def uvicorn_config(config: ConsoleConfig) -> uvicorn.Config:
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


def run(config: ConsoleConfig) -> None:
    configure_logging(config.server.service_name, config.server.log_level, config.server.log_format)
    setup_tracing("maas-console")
    start_metrics_server(config.server.metrics_port)
    try:
        uvicorn.Server(uvicorn_config(config)).run()
    finally:
        shutdown_tracing()
