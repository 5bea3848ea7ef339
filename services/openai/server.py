"""Serve the gateway: services/shared/http_server.py (uvicorn, logs, tracing, metrics as in every service)."""

from __future__ import annotations

import uvicorn

from services.openai.app import create_app
from services.openai.config import GatewayConfig
from services.shared import http_server


def uvicorn_config(config: GatewayConfig) -> uvicorn.Config:
    return http_server.uvicorn_config(create_app(config), config.host, config.port, config.server)


def run(config: GatewayConfig) -> None:
    http_server.run_http(uvicorn_config(config), config.server)
