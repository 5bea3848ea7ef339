"""Router settings: flags, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from maas import ports
from services.router.admission import AdmissionSettings
from services.router.fastpath import BINARY_NAME, find_binary
from services.shared.config import (
    ConfigError,
    OutlierSettings,
    RetryBudgetSettings,
    ServerSettings,
    add_peer_argument,
    add_pool_arguments,
    add_server_arguments,
    add_triton_argument,
    env,
    env_float,
    env_int,
    pool_settings,
    require_non_negative,
    require_peer,
    require_positive,
    server_settings,
    triton_addresses,
)
from services.shared.discovery import DiscoveryConfig, add_discovery_arguments, discovery_config

DEFAULT_LISTEN = ports.loopback(ports.ROUTER)
DEFAULT_OIP_FAST_LISTEN = ports.loopback(ports.ROUTER_OIP_FAST)


@dataclass(frozen=True)
class GenerationLimits:
    """Caps of Router.Generate; a version's own limits (its Triton config) apply on top."""

    max_tokens: int = 1024  # largest sampling.max_tokens
    max_messages: int = 256
    max_prompt_chars: int = 1_000_000  # prompt text, or all message contents together
    max_stop: int = 16  # stop sequences per request
    max_stop_chars: int = 256  # characters of one stop sequence
    # Deadline of a generation when the caller sets none (longer than other calls: it streams).
    default_timeout: float = 300.0


@dataclass(frozen=True)
class RouterConfig:
    server: ServerSettings
    registry: str
    tokenizer: str
    vision: str
    triton: str  # the --triton flag: one address, or a comma-separated list of static replicas
    # Deadline given to peers when the caller set none: a request can never hang.
    default_timeout: float = 30.0
    max_batch_items: int = 256
    shadow_max_inflight: int = 64
    shadow_timeout: float = 10.0
    shadow_report_interval: float = 1.0
    # Seconds between per-version stats reports to the registry (its rollout analysis reads them).
    stats_report_interval: float = 0.5
    # Sent with ReportShadowResults when the registry requires its admin token (MAAS_ADMIN_TOKEN).
    admin_token: str | None = None
    # Where the Triton replicas come from; None = static: the --triton address(es).
    discovery: DiscoveryConfig | None = None
    # Text generation (services/router/generation.py): limits checked before any work.
    generation: GenerationLimits = field(default_factory=GenerationLimits)
    # The OIP fast path (services/router/fastpath.py): its address, "" = not started.
    oip_fast_listen: str = ""
    oip_fast_binary: str = ""
    # The Triton replica pool: outlier ejection and the retry budget (services/shared/outlier.py).
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    retry_budget: RetryBudgetSettings = field(default_factory=RetryBudgetSettings)
    # API keys, quotas and priority shedding (services/router/admission.py, docs/security.md).
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)

    def triton_discovery(self) -> DiscoveryConfig:
        return self.discovery or DiscoveryConfig(mode="static", static_addresses=triton_addresses(self.triton))


def load_config(argv: list[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser(
        prog="maas-router", description="MaaS Mesh router (maas.v1.Router + Open Inference Protocol)"
    )
    add_server_arguments(parser, DEFAULT_LISTEN)
    peers = parser.add_argument_group("peers")
    add_peer_argument(peers, "--registry", "MAAS_REGISTRY_ADDRESS", ports.loopback(ports.REGISTRY), "registry")
    add_peer_argument(peers, "--tokenizer", "MAAS_TOKENIZER_ADDRESS", ports.loopback(ports.TOKENIZER), "tokenizer")
    add_peer_argument(peers, "--vision", "MAAS_VISION_ADDRESS", ports.loopback(ports.VISION), "vision")
    add_triton_argument(peers)
    add_discovery_arguments(parser)
    add_pool_arguments(parser)
    g = parser.add_argument_group("router")
    g.add_argument(
        "--default-timeout",
        type=float,
        default=env_float("MAAS_ROUTER_DEFAULT_TIMEOUT_SECONDS", 30.0),
        help="deadline for peer calls when the caller sets none (MAAS_ROUTER_DEFAULT_TIMEOUT_SECONDS)",
    )
    g.add_argument(
        "--max-batch-items",
        type=int,
        default=env_int("MAAS_MAX_BATCH_ITEMS", 256),
        help="most texts or images in one request (MAAS_MAX_BATCH_ITEMS)",
    )
    g.add_argument(
        "--shadow-max-inflight",
        type=int,
        default=env_int("MAAS_SHADOW_MAX_INFLIGHT", 64),
        help="shadow copies in flight before new ones are dropped (MAAS_SHADOW_MAX_INFLIGHT)",
    )
    g.add_argument(
        "--shadow-timeout",
        type=float,
        default=env_float("MAAS_SHADOW_TIMEOUT_SECONDS", 10.0),
        help="deadline of one shadow copy (MAAS_SHADOW_TIMEOUT_SECONDS)",
    )
    g.add_argument(
        "--shadow-report-interval",
        type=float,
        default=env_float("MAAS_SHADOW_REPORT_INTERVAL_SECONDS", 1.0),
        help="seconds between shadow result reports to the registry (MAAS_SHADOW_REPORT_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--stats-report-interval",
        type=float,
        default=env_float("MAAS_ROUTER_STATS_REPORT_INTERVAL_SECONDS", 0.5),
        help="seconds between per-version request/error/latency reports to the registry, which "
        "rollouts analyse (MAAS_ROUTER_STATS_REPORT_INTERVAL_SECONDS)",
    )
    g.add_argument(
        "--oip-fast-listen",
        default=env("MAAS_ROUTER_OIP_FAST_LISTEN", DEFAULT_OIP_FAST_LISTEN),
        help='address of the OIP fast path; "off" = none (MAAS_ROUTER_OIP_FAST_LISTEN)',
    )
    g.add_argument(
        "--oip-fast-binary",
        default=env("MAAS_ROUTER_OIP_FAST_BINARY", ""),
        help=f"the {BINARY_NAME} executable (default: on PATH, else build/bin of a source checkout; "
        "`make fastpath` builds it) (MAAS_ROUTER_OIP_FAST_BINARY)",
    )
    adm = parser.add_argument_group("tenants (docs/security.md)")
    adm.add_argument(
        "--auth",
        choices=("on", "off"),
        default=(env("MAAS_ROUTER_AUTH", "off") or "off").lower(),
        help="on: every inference call needs 'authorization: Bearer <tenant key>', checked against the "
        "registry's tenant list, on the main port and the OIP fast path alike (MAAS_ROUTER_AUTH)",
    )
    adm.add_argument(
        "--shed-sheddable-inflight",
        type=int,
        default=env_int("MAAS_ROUTER_SHED_SHEDDABLE_INFLIGHT", 0),
        help="calls in flight on this router from which sheddable calls are refused, 0 = never "
        "(MAAS_ROUTER_SHED_SHEDDABLE_INFLIGHT)",
    )
    adm.add_argument(
        "--shed-standard-inflight",
        type=int,
        default=env_int("MAAS_ROUTER_SHED_STANDARD_INFLIGHT", 0),
        help="calls in flight from which standard calls are refused too, 0 = never; critical calls "
        "never are (MAAS_ROUTER_SHED_STANDARD_INFLIGHT)",
    )
    adm.add_argument(
        "--shed-retry-after",
        type=float,
        default=env_float("MAAS_ROUTER_SHED_RETRY_AFTER_SECONDS", 0.25),
        help="retry hint (retry-after-ms) sent with a shed call, seconds (MAAS_ROUTER_SHED_RETRY_AFTER_SECONDS)",
    )
    adm.add_argument(
        "--shed-sheddable-queue-ms",
        type=float,
        default=env_float("MAAS_ROUTER_SHED_SHEDDABLE_QUEUE_MS", 0.0),
        help="Triton queue time (ms, the longest model's mean over the last sample) from which sheddable "
        "calls are refused, 0 = never (MAAS_ROUTER_SHED_SHEDDABLE_QUEUE_MS)",
    )
    adm.add_argument(
        "--shed-standard-queue-ms",
        type=float,
        default=env_float("MAAS_ROUTER_SHED_STANDARD_QUEUE_MS", 0.0),
        help="Triton queue time (ms) from which standard calls are refused too, 0 = never; critical calls "
        "never are (MAAS_ROUTER_SHED_STANDARD_QUEUE_MS)",
    )
    adm.add_argument(
        "--queue-sample-interval",
        type=float,
        default=env_float("MAAS_ROUTER_QUEUE_SAMPLE_INTERVAL_SECONDS", 0.25),
        help="seconds between samples of Triton's queue time (ModelStatistics of every replica), when a "
        "--shed-*-queue-ms is set (MAAS_ROUTER_QUEUE_SAMPLE_INTERVAL_SECONDS)",
    )
    gen = parser.add_argument_group("generation")
    for flag, env_name, default, what in (
        ("--generate-max-tokens", "MAAS_GENERATE_MAX_TOKENS", 1024, "largest sampling.max_tokens"),
        ("--generate-max-messages", "MAAS_GENERATE_MAX_MESSAGES", 256, "most chat messages in one request"),
        (
            "--generate-max-prompt-chars",
            "MAAS_GENERATE_MAX_PROMPT_CHARS",
            1_000_000,
            "most characters of a prompt (or of all message contents)",
        ),
        ("--generate-max-stop", "MAAS_GENERATE_MAX_STOP", 16, "most stop sequences in one request"),
        ("--generate-max-stop-chars", "MAAS_GENERATE_MAX_STOP_CHARS", 256, "longest stop sequence"),
    ):
        gen.add_argument(flag, type=int, default=env_int(env_name, default), help=f"{what} ({env_name})")
    gen.add_argument(
        "--generate-timeout",
        type=float,
        default=env_float("MAAS_GENERATE_TIMEOUT_SECONDS", 300.0),
        help="deadline of a generation when the caller sets none (MAAS_GENERATE_TIMEOUT_SECONDS)",
    )
    args = parser.parse_args(argv)
    require_positive(
        args,
        "generate_max_tokens",
        "generate_max_messages",
        "generate_max_prompt_chars",
        "generate_max_stop",
        "generate_max_stop_chars",
        "generate_timeout",
    )
    discovery = discovery_config(args)
    if discovery.mode == "static":
        discovery = discovery_config(args, triton_addresses(args.triton))
    require_positive(
        args, "default_timeout", "shadow_timeout", "shadow_report_interval", "stats_report_interval", "max_batch_items"
    )
    require_non_negative(args, "shadow_max_inflight")
    require_positive(args, "shed_retry_after", "queue_sample_interval")
    require_non_negative(args, "shed_sheddable_queue_ms", "shed_standard_queue_ms")  # 0 = never
    for signal in ("inflight", "queue_ms"):  # sheddable calls are refused first
        sheddable, standard = getattr(args, f"shed_sheddable_{signal}"), getattr(args, f"shed_standard_{signal}")
        if standard and not 0 < sheddable <= standard:
            flag = signal.replace("_", "-")
            raise ConfigError(
                f"--shed-standard-{flag} {standard:g} needs --shed-sheddable-{flag} set at or below it "
                f"(got {sheddable:g}): sheddable calls are refused first"
            )
    require_non_negative(args, "shed_sheddable_inflight", "shed_standard_inflight")  # 0 = never
    if args.auth not in ("on", "off"):
        raise ConfigError(f"--auth / MAAS_ROUTER_AUTH must be on or off, got {args.auth!r}")
    fast_listen, fast_binary = oip_fast_path(args.oip_fast_listen, args.oip_fast_binary)
    outlier, retry_budget = pool_settings(args)
    return RouterConfig(
        server=server_settings("router", args),
        registry=require_peer(args.registry, "--registry", "MAAS_REGISTRY_ADDRESS"),
        tokenizer=require_peer(args.tokenizer, "--tokenizer", "MAAS_TOKENIZER_ADDRESS"),
        vision=require_peer(args.vision, "--vision", "MAAS_VISION_ADDRESS"),
        triton=args.triton or "",
        default_timeout=args.default_timeout,
        max_batch_items=args.max_batch_items,
        shadow_max_inflight=args.shadow_max_inflight,
        shadow_timeout=args.shadow_timeout,
        shadow_report_interval=args.shadow_report_interval,
        stats_report_interval=args.stats_report_interval,
        admin_token=env("MAAS_ADMIN_TOKEN"),
        discovery=discovery,
        oip_fast_listen=fast_listen,
        oip_fast_binary=fast_binary,
        outlier=outlier,
        retry_budget=retry_budget,
        admission=AdmissionSettings(
            auth=args.auth == "on",
            shed_sheddable_inflight=args.shed_sheddable_inflight,
            shed_standard_inflight=args.shed_standard_inflight,
            shed_retry_after=args.shed_retry_after,
            shed_sheddable_queue_ms=args.shed_sheddable_queue_ms,
            shed_standard_queue_ms=args.shed_standard_queue_ms,
            queue_sample_interval=args.queue_sample_interval,
        ),
        generation=GenerationLimits(
            max_tokens=args.generate_max_tokens,
            max_messages=args.generate_max_messages,
            max_prompt_chars=args.generate_max_prompt_chars,
            max_stop=args.generate_max_stop,
            max_stop_chars=args.generate_max_stop_chars,
            default_timeout=args.generate_timeout,
        ),
    )


def oip_fast_path(listen: str, binary: str) -> tuple[str, str]:
    """(listen, binary) of the OIP fast path, ("", "") when it is off. A binary named but
    missing is an error; one not found by itself only turns the fast path off (the main port still
    serves the protocol), with a warning when the server starts."""
    listen = (listen or "").strip()
    if not listen or listen.lower() == "off":
        return "", ""
    require_peer(listen, "--oip-fast-listen", "MAAS_ROUTER_OIP_FAST_LISTEN")
    if binary:
        if not Path(binary).is_file():
            raise ConfigError(f"--oip-fast-binary {binary!r} not found (build it with `make fastpath`)")
        return listen, binary
    return listen, find_binary() or ""
