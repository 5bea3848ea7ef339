"""Serving an HTTP service (the OpenAI gateway, the console) with uvicorn, set up as every service is.

On SIGTERM uvicorn stops accepting connections and gives open ones (event streams, a chat) the drain
grace, then the app's lifespan closes its channels (which cancels their calls). With MAAS_TLS_* it
serves HTTPS, and a renewed certificate is served to new connections.
"""

from __future__ import annotations

import uvicorn

from services.shared.config import ServerSettings
from services.shared.server import start_observability
from services.shared.telemetry import shutdown_tracing
from services.shared.tls import HttpsReloader, uvicorn_ssl


def uvicorn_config(app, host: str, port: int, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.grace_seconds)),
        server_header=False,
        **uvicorn_ssl(settings.tls),  # HTTPS with MAAS_TLS_*
    )


def run_http(config: uvicorn.Config, settings: ServerSettings) -> None:
    start_observability(settings)
    config.load()
    reloader = None
    if settings.tls is not None:  # a renewed certificate is served to new connections
        reloader = HttpsReloader(config.ssl, settings.tls, settings.service_name).start()
    try:
        uvicorn.Server(config).run()
    finally:
        if reloader is not None:
            reloader.stop()
        shutdown_tracing()
