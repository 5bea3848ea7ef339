"""Serve the console: services/shared/http_server.py (uvicorn, logs, tracing, metrics as in every service)."""

from __future__ import annotations

import uvicorn

from services.console.app import create_app
from services.console.config import ConsoleConfig
from services.shared import http_server


def uvicorn_config(config: ConsoleConfig) -> uvicorn.Config:
    return http_server.uvicorn_config(create_app(config), config.host, config.port, config.server)


def run(config: ConsoleConfig) -> None:
    http_server.run_http(uvicorn_config(config), config.server)
