"""Console settings: flags, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from maas import ports
from services.shared.config import (
    ConfigError,
    ServerSettings,
    add_limit_arguments,
    add_peer_argument,
    add_server_arguments,
    env,
    env_float,
    limits_from_args,
    require_peer,
    require_positive,
    server_settings,
)

# The console's HTTP port: next to the OpenAI gateway's 8090; `maas up` and its --console-port take it from here.
DEFAULT_LISTEN = ports.loopback(ports.CONSOLE)


@dataclass(frozen=True)
class ConsoleLimits:
    """Checked before any call to the mesh (the page shows the refusal, HTTP 413 / 400)."""

    max_upload_bytes: int = 8 * 1024 * 1024  # one image to classify (the request body)
    max_texts: int = 16  # sentences to embed: the similarity matrix is texts x texts
    max_text_chars: int = 4000  # one sentence, one chat message
    max_chat_tokens: int = 512  # the largest max_tokens the playground asks for
    max_chat_turns: int = 16  # earlier messages a chat sends again with the new one (the conversation)


LIMIT_HELP = {
    "max_upload_bytes": "largest request body (an image to classify); larger -> 413",
    "max_texts": "sentences one embedding request may hold",
    "max_text_chars": "characters of one sentence or chat message",
    "max_chat_tokens": "largest max_tokens of a playground chat",
    "max_chat_turns": "earlier messages (user and assistant) one chat request carries",
}


@dataclass(frozen=True)
class ConsoleConfig:
    server: ServerSettings
    router: str
    registry: str
    # The router's Prometheus endpoint (http://host:port/metrics); empty = no charts.
    router_metrics: str = ""
    scrape_interval: float = 2.0
    history_seconds: float = 600.0
    default_timeout: float = 120.0  # deadline of a router / registry call
    limits: ConsoleLimits = ConsoleLimits()

    @property
    def host(self) -> str:
        return self.server.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.server.listen.rsplit(":", 1)[1])


def load_config(argv: list[str] | None = None) -> ConsoleConfig:
    parser = argparse.ArgumentParser(prog="maas-console", description="MaaS Mesh web console")
    add_server_arguments(parser, DEFAULT_LISTEN)
    peers = parser.add_argument_group("peers")
    add_peer_argument(peers, "--router", "MAAS_ROUTER_ADDRESS", "127.0.0.1:50051", "router")
    add_peer_argument(peers, "--registry", "MAAS_REGISTRY_ADDRESS", "127.0.0.1:50052", "registry")
    g = parser.add_argument_group("console")
    g.add_argument(
        "--router-metrics",
        default=env("MAAS_CONSOLE_ROUTER_METRICS", ""),
        help="the router's Prometheus URL, e.g. http://127.0.0.1:9090/metrics; empty = no charts "
        "(MAAS_CONSOLE_ROUTER_METRICS)",
    )
    g.add_argument(
        "--scrape-interval",
        type=float,
        default=env_float("MAAS_CONSOLE_SCRAPE_INTERVAL_SECONDS", 2.0),
        help="seconds between two reads of the router's metrics (MAAS_CONSOLE_SCRAPE_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--history",
        type=float,
        default=env_float("MAAS_CONSOLE_HISTORY_SECONDS", 600.0),
        help="seconds of metrics the charts keep (MAAS_CONSOLE_HISTORY_SECONDS)",
    )
    g.add_argument(
        "--default-timeout",
        type=float,
        default=env_float("MAAS_CONSOLE_DEFAULT_TIMEOUT_SECONDS", 120.0),
        help="deadline of a router or registry call (MAAS_CONSOLE_DEFAULT_TIMEOUT_SECONDS)",
    )
    add_limit_arguments(parser, "MAAS_CONSOLE", ConsoleLimits(), LIMIT_HELP)
    args = parser.parse_args(argv)
    require_positive(args, "scrape_interval", "history", "default_timeout")
    if args.router_metrics and not args.router_metrics.startswith(("http://", "https://")):
        raise ConfigError(f"--router-metrics must be an http(s) URL, got {args.router_metrics!r}")
    settings = server_settings("console", args)
    require_peer(settings.listen, "--listen", "MAAS_LISTEN")
    return ConsoleConfig(
        server=settings,
        router=require_peer(args.router, "--router", "MAAS_ROUTER_ADDRESS"),
        registry=require_peer(args.registry, "--registry", "MAAS_REGISTRY_ADDRESS"),
        router_metrics=args.router_metrics,
        scrape_interval=args.scrape_interval,
        history_seconds=args.history,
        default_timeout=args.default_timeout,
        limits=limits_from_args(ConsoleLimits, args, LIMIT_HELP),
    )
