"""Typed settings every server shares, read from flags, then environment, then loopback defaults.

Each service's own config.py adds its flags to the same parser and builds a frozen dataclass in
main(), never at import time.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas import ports
from services.shared.tls import CLIENT_AUTH_MODES, TlsSettings

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# glibc malloc arenas per process (services.shared.memory); glibc's own default is 8 per core.
DEFAULT_MALLOC_ARENA_MAX = 2
# Seconds between malloc_trim(0) calls (services.shared.memory): free heap pages a burst left behind
# go back to the OS. 0 = never.
DEFAULT_MALLOC_TRIM_INTERVAL_SECONDS = 30.0
# Models the registry reloads at once on a Triton replica that lost them (restart): MAAS_RELOAD_CONCURRENCY.
# 1 here: loads are CPU-bound on a CPU Triton, and on 2 cores 2 or 4 at once made the first Classify
# after a kill 54-85 s instead of 11-15 s (bench/bench_recovery.py); raise it for Tritons with spare
# cores or GPUs, where loads wait on I/O.
DEFAULT_RELOAD_CONCURRENCY = 1


class ConfigError(SystemExit):
    """A missing or malformed setting: the process exits with a message naming it."""

    def __init__(self, message: str):
        super().__init__(f"configuration error: {message}")


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_int(name: str, default: int) -> int:
    raw = env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class ServerSettings:
    """How a gRPC server listens, drains, logs and limits message sizes."""

    service_name: str
    listen: str
    grace_seconds: float = 10.0
    # Of the grace: how long a draining server goes on taking calls after health says NOT_SERVING,
    # so clients watching health (and endpoint lists) stop sending before it stops listening.
    drain_delay_seconds: float = 1.0
    # How often readiness checks (e.g. "Triton reachable") run; each call in them is bounded by it too.
    readiness_interval_seconds: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "json"
    workers: int = os.cpu_count() or 1
    # TLS of the served port and of the outgoing channels (services/shared/tls.py); None = plaintext.
    tls: TlsSettings | None = None
    # A plaintext port serving grpc.health.v1 alone (probes that speak no TLS); "" = none.
    health_listen: str = ""
    # glibc mmap threshold (services.shared.memory): 0 = glibc's default (dynamic, up to 32 MiB).
    malloc_mmap_threshold_bytes: int = 0
    # glibc malloc arenas (services.shared.memory): 0 = glibc's default (8 per core).
    malloc_arena_max: int = DEFAULT_MALLOC_ARENA_MAX
    # Seconds between malloc_trim(0) calls (services.shared.memory): 0 = never.
    malloc_trim_interval_seconds: float = DEFAULT_MALLOC_TRIM_INTERVAL_SECONDS


def add_server_arguments(parser: argparse.ArgumentParser, default_listen: str) -> None:
    """Flags every server has; defaults come from MAAS_* environment variables."""
    g = parser.add_argument_group("server")
    g.add_argument("--listen", default=env("MAAS_LISTEN", default_listen), help="host:port to listen on (MAAS_LISTEN)")
    g.add_argument(
        "--grace",
        type=float,
        default=env_float("MAAS_DRAIN_GRACE_SECONDS", 10.0),
        help="seconds in-flight RPCs get to finish on SIGTERM (MAAS_DRAIN_GRACE_SECONDS)",
    )
    g.add_argument(
        "--drain-delay",
        type=float,
        default=env_float("MAAS_DRAIN_DELAY_SECONDS", 1.0),
        help="seconds of the grace a draining server still takes calls after health turns NOT_SERVING "
        "(MAAS_DRAIN_DELAY_SECONDS)",
    )
    g.add_argument(
        "--readiness-interval",
        type=float,
        default=env_float("MAAS_READINESS_INTERVAL_SECONDS", 2.0),
        help="seconds between readiness checks of required upstreams, also each check's timeout "
        "(MAAS_READINESS_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=env_int("MAAS_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES),
        help="largest gRPC message sent or received (MAAS_MAX_MESSAGE_BYTES)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=env_int("MAAS_METRICS_PORT", 0),
        help="Prometheus metrics port, 0 = off (MAAS_METRICS_PORT)",
    )
    g.add_argument("--log-level", default=env("MAAS_LOG_LEVEL", "INFO"), help="MAAS_LOG_LEVEL")
    g.add_argument(
        "--log-format", choices=["json", "text"], default=env("MAAS_LOG_FORMAT", "json"), help="MAAS_LOG_FORMAT"
    )
    g.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=env_int("MAAS_MALLOC_MMAP_THRESHOLD_BYTES", 0),
        help="allocations from this size get their own mapping, returned to the OS when freed, so a "
        "burst of large requests does not leave RSS at its peak; 0 = glibc's default "
        "(MAAS_MALLOC_MMAP_THRESHOLD_BYTES)",
    )
    g.add_argument(
        "--malloc-arena-max",
        type=int,
        default=env_int("MAAS_MALLOC_ARENA_MAX", DEFAULT_MALLOC_ARENA_MAX),
        help="most glibc malloc arenas, so memory a burst fragmented in one thread's arena is reused "
        "instead of kept; 0 = glibc's default (MAAS_MALLOC_ARENA_MAX)",
    )
    g.add_argument(
        "--malloc-trim-interval",
        type=float,
        default=env_float("MAAS_MALLOC_TRIM_INTERVAL_SECONDS", DEFAULT_MALLOC_TRIM_INTERVAL_SECONDS),
        help="seconds between malloc_trim(0) calls, which give the OS back the free heap pages a burst "
        "left behind; 0 = never (MAAS_MALLOC_TRIM_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=env_int("MAAS_WORKERS", os.cpu_count() or 1),
        help="threads for CPU-heavy work (MAAS_WORKERS)",
    )
    g.add_argument(
        "--health-listen",
        default=env("MAAS_HEALTH_LISTEN", ""),
        help="host:port of a plaintext port serving grpc.health.v1 alone, for probes that speak no TLS; "
        "empty = none (MAAS_HEALTH_LISTEN)",
    )
    add_tls_arguments(parser)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS of the served port and of every outgoing channel: all of cert, key and CA, or none."""
    g = parser.add_argument_group("TLS (all of --tls-cert, --tls-key, --tls-ca, or none = plaintext)")
    g.add_argument(
        "--tls-cert",
        default=env("MAAS_TLS_CERT"),
        help="PEM certificate (chain) served and presented to peers; re-read when it changes (MAAS_TLS_CERT)",
    )
    g.add_argument("--tls-key", default=env("MAAS_TLS_KEY"), help="its PEM private key (MAAS_TLS_KEY)")
    g.add_argument(
        "--tls-ca",
        default=env("MAAS_TLS_CA"),
        help="PEM CA that peers' and clients' certificates must chain to (MAAS_TLS_CA)",
    )
    g.add_argument(
        "--tls-client-auth",
        choices=CLIENT_AUTH_MODES,
        default=env("MAAS_TLS_CLIENT_AUTH", "required"),
        help="required: callers must present a certificate signed by the CA; optional: TLS without "
        "client certificates (MAAS_TLS_CLIENT_AUTH)",
    )
    g.add_argument(
        "--tls-server-name",
        default=env("MAAS_TLS_SERVER_NAME"),
        help="name checked in peers' certificates instead of the address's host, for peers reached by "
        "IP (MAAS_TLS_SERVER_NAME)",
    )


def tls_settings(args: argparse.Namespace) -> TlsSettings | None:
    given = {
        "--tls-cert / MAAS_TLS_CERT": args.tls_cert,
        "--tls-key / MAAS_TLS_KEY": args.tls_key,
        "--tls-ca / MAAS_TLS_CA": args.tls_ca,
    }
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ConfigError(f"TLS needs a certificate, its key and a CA: {', '.join(missing)} not set")
    for name, value in given.items():
        if not Path(value).is_file():
            raise ConfigError(f"{name}: {value} is not a readable file")
    if args.tls_client_auth not in CLIENT_AUTH_MODES:
        raise ConfigError(
            f"--tls-client-auth / MAAS_TLS_CLIENT_AUTH must be one of {', '.join(CLIENT_AUTH_MODES)}, "
            f"got {args.tls_client_auth!r}"
        )
    return TlsSettings(
        cert=Path(args.tls_cert),
        key=Path(args.tls_key),
        ca=Path(args.tls_ca),
        client_auth=args.tls_client_auth,
        server_name=args.tls_server_name or None,
    )


def server_settings(service_name: str, args: argparse.Namespace) -> ServerSettings:
    require_positive(args, "max_message_bytes", "workers", "readiness_interval")
    require_non_negative(args, "drain_delay", "malloc_mmap_threshold", "malloc_arena_max", "malloc_trim_interval")
    return ServerSettings(
        service_name=service_name,
        listen=args.listen,
        grace_seconds=args.grace,
        drain_delay_seconds=args.drain_delay,
        readiness_interval_seconds=args.readiness_interval,
        max_message_bytes=args.max_message_bytes,
        metrics_port=args.metrics_port,
        log_level=args.log_level.upper(),
        log_format=args.log_format,
        workers=args.workers,
        tls=tls_settings(args),
        health_listen=args.health_listen or "",
        malloc_mmap_threshold_bytes=args.malloc_mmap_threshold,
        malloc_arena_max=args.malloc_arena_max,
        malloc_trim_interval_seconds=args.malloc_trim_interval,
    )


def add_peer_argument(parser: Any, flag: str, env_name: str, default: str | None, what: str) -> None:
    parser.add_argument(flag, default=env(env_name, default), help=f"{what} address host:port ({env_name})")


def require_peer(value: str | None, flag: str, env_name: str) -> str:
    """Fail fast at start-up on a missing peer address rather than at the first request."""
    if not value or ":" not in value:
        raise ConfigError(f"peer address {flag} / {env_name} must be host:port, got {value!r}")
    return value


def add_limit_arguments(parser: argparse.ArgumentParser, env_prefix: str, defaults, helps: dict[str, str]) -> None:
    """One `--max-…` flag per field of a limits dataclass named in `helps`, default from
    `<env_prefix>_<FIELD>` then the dataclass default (e.g. --max-batch / MAAS_VISION_MAX_BATCH)."""
    group = parser.add_argument_group("limits")
    for name, text in helps.items():
        env_name = f"{env_prefix}_{name.upper()}"
        group.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=env_int(env_name, getattr(defaults, name)),
            help=f"{text} ({env_name})",
        )


def require_positive(args: argparse.Namespace, *dests: str) -> None:
    """Each flag (by its argparse dest, e.g. "load_timeout" for --load-timeout) must be > 0."""
    for dest in dests:
        value = getattr(args, dest)
        if value <= 0:
            raise ConfigError(f"--{dest.replace('_', '-')} must be positive, got {value}")


def require_non_negative(args: argparse.Namespace, *dests: str) -> None:
    """Each flag must be >= 0 (0 meaning off or none, as its help says)."""
    for dest in dests:
        value = getattr(args, dest)
        if value < 0:
            raise ConfigError(f"--{dest.replace('_', '-')} must be >= 0, got {value}")


def add_triton_argument(parser: Any) -> None:
    """--triton / MAAS_TRITON_ADDRESS: the static list of Triton replicas (registry and router)."""
    add_peer_argument(
        parser,
        "--triton",
        "MAAS_TRITON_ADDRESS",
        ports.loopback(ports.TRITON_GRPC),
        "Triton gRPC (comma-separated for several static replicas)",
    )


def triton_addresses(value: str | None) -> tuple[str, ...]:
    """`a:8001` or `a:8001,b:8001` → the addresses, each checked to be host:port; at least one."""
    addresses = tuple(a.strip() for a in (value or "").split(",") if a.strip())
    if not addresses:
        raise ConfigError("--triton / MAAS_TRITON_ADDRESS must name at least one Triton gRPC address")
    for address in addresses:
        require_peer(address, "--triton", "MAAS_TRITON_ADDRESS")
    return addresses


def limits_from_args(limits_type, args: argparse.Namespace, helps: dict[str, str], **fixed):
    """The limits dataclass from the parsed flags (plus `fixed` values); every limit must be positive."""
    require_positive(args, *helps)
    return limits_type(**{name: getattr(args, name) for name in helps}, **fixed)


# -- replica pools: outlier ejection and retry budget (services/shared/outlier.py) -------------------


@dataclass(frozen=True)
class OutlierSettings:
    """When a replica is taken out of a pool (Envoy's outlier detection defaults, but at most half)."""

    consecutive_failures: int = 5  # retryable failures in a row that eject; 0 = never eject
    base_ejection_seconds: float = 30.0  # × the replica's number of ejections
    max_ejection_seconds: float = 300.0
    max_ejection_percent: float = 50.0  # of the pool's replicas at once (never the last one)
    probe_timeout_seconds: float = 2.0  # the health probe before an ejected replica returns


@dataclass(frozen=True)
class RetryBudgetSettings:
    """Retries ≤ ratio × requests + min_retries over the last window_seconds."""

    ratio: float = 0.2
    min_retries: int = 10
    window_seconds: float = 10.0


_OUTLIER_FLAGS = (  # (field, flag, env, type, help)
    (
        "consecutive_failures",
        "--outlier-consecutive-failures",
        "MAAS_OUTLIER_CONSECUTIVE_FAILURES",
        int,
        "retryable failures in a row that eject a replica, 0 = off",
    ),
    (
        "base_ejection_seconds",
        "--outlier-base-ejection",
        "MAAS_OUTLIER_BASE_EJECTION_SECONDS",
        float,
        "seconds an ejection lasts, times the replica's number of ejections",
    ),
    (
        "max_ejection_seconds",
        "--outlier-max-ejection",
        "MAAS_OUTLIER_MAX_EJECTION_SECONDS",
        float,
        "longest ejection (s)",
    ),
    (
        "max_ejection_percent",
        "--outlier-max-ejection-percent",
        "MAAS_OUTLIER_MAX_EJECTION_PERCENT",
        float,
        "most replicas ejected at once, in % (never the last one)",
    ),
    (
        "probe_timeout_seconds",
        "--outlier-probe-timeout",
        "MAAS_OUTLIER_PROBE_TIMEOUT_SECONDS",
        float,
        "deadline of the probe before an ejected replica returns (s)",
    ),
)
_BUDGET_FLAGS = (
    ("ratio", "--retry-budget-ratio", "MAAS_RETRY_BUDGET_RATIO", float, "retries allowed per request"),
    (
        "min_retries",
        "--retry-budget-min-retries",
        "MAAS_RETRY_BUDGET_MIN_RETRIES",
        int,
        "retries allowed per window on top of the ratio",
    ),
    (
        "window_seconds",
        "--retry-budget-window",
        "MAAS_RETRY_BUDGET_WINDOW_SECONDS",
        float,
        "seconds the budget counts requests and retries over",
    ),
)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of outlier ejection and the retry budget of a service's replica pools."""
    g = parser.add_argument_group("replica pools (outlier ejection, retry budget)")
    for defaults, flags in ((OutlierSettings(), _OUTLIER_FLAGS), (RetryBudgetSettings(), _BUDGET_FLAGS)):
        for name, flag, env_name, kind, text in flags:
            default = getattr(defaults, name)
            value = env_int(env_name, default) if kind is int else env_float(env_name, default)
            g.add_argument(flag, dest=f"pool_{name}", type=kind, default=value, help=f"{text} ({env_name})")


def pool_settings(args: argparse.Namespace) -> tuple[OutlierSettings, RetryBudgetSettings]:
    built: list[Any] = []
    for kind, flags in ((OutlierSettings, _OUTLIER_FLAGS), (RetryBudgetSettings, _BUDGET_FLAGS)):
        values = {name: getattr(args, f"pool_{name}") for name, *_ in flags}
        for name, flag, *_ in flags:
            if values[name] < 0 or (name in ("window_seconds", "probe_timeout_seconds") and values[name] <= 0):
                raise ConfigError(f"{flag} must be {'positive' if 'seconds' in name else '>= 0'}, got {values[name]}")
        if values.get("max_ejection_percent", 0) > 100:
            raise ConfigError(
                f"--outlier-max-ejection-percent must be at most 100, got {values['max_ejection_percent']}"
            )
        built.append(kind(**values))
    return built[0], built[1]
