"""`maas tenants create|list|rotate-key|revoke|set-quota` and `maas audit` — tenants and the audit log.

All need the admin token (--token / MAAS_ADMIN_TOKEN) when the registry has one. An API key is printed
once, by create and rotate-key; the registry keeps only its sha256.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from maas.cli.models import (
    JsonOpt,
    ReasonOpt,
    RegistryOpt,
    TokenOpt,
    registry_client,
    emit_json,
    when,
    err,
    handle_errors,
    out,
)
from maas.registry_client import PRIORITY_NAMES
from maas.v1 import registry_pb2 as pb

app = typer.Typer(no_args_is_help=True, add_completion=False)

AllowOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--allow",
        help="a model the tenant may call: 'name' (any version/alias) or 'name:alias' / 'name:3'; repeat it "
        "(none = every model)",
        show_default=False,
    ),
]
RpsOpt = Annotated[float, typer.Option("--rps", help="requests per second, mesh-wide (0 = unlimited)")]
BurstOpt = Annotated[float, typer.Option("--burst", help="request burst (0 = one second's worth)")]
CostOpt = Annotated[
    float,
    typer.Option("--cost-per-second", help="cost units per second: tokens, images, generated tokens (0 = unlimited)"),
]
CostBurstOpt = Annotated[float, typer.Option("--cost-burst", help="cost burst (0 = one second's worth)")]
PriorityOpt = Annotated[
    Optional[str], typer.Option("--priority", help="critical, standard or sheddable", show_default=False)
]


def _quota(rps: float, burst: float, cost: float, cost_burst: float) -> pb.Quota:
    return pb.Quota(requests_per_second=rps, request_burst=burst, cost_per_second=cost, cost_burst=cost_burst)


def _quota_text(q: pb.Quota) -> str:
    parts = []
    if q.requests_per_second:
        parts.append(f"{q.requests_per_second:g} req/s (burst {q.request_burst or q.requests_per_second:g})")
    if q.cost_per_second:
        parts.append(f"{q.cost_per_second:g} units/s (burst {q.cost_burst or q.cost_per_second:g})")
    return ", ".join(parts) or "unlimited"


def _show_key(answer: pb.TenantKey, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(answer)
        return
    out.print(f"tenant [bold]{answer.tenant.name}[/bold] {what}. API key (shown once, store it now):")
    print(answer.api_key)


@app.command()
@handle_errors
def create(
    name: Annotated[str, typer.Argument(help="tenant name (lower-case letters, digits, '_', '-')")],
    allow: AllowOpt = None,
    rps: RpsOpt = 0.0,
    burst: BurstOpt = 0.0,
    cost_per_second: CostOpt = 0.0,
    cost_burst: CostBurstOpt = 0.0,
    priority: PriorityOpt = None,
    description: Annotated[str, typer.Option("--description", help="free text")] = "",
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant and print its API key (once)."""
    with registry_client(registry, token) as client:
        answer = client.create_tenant(
            name,
            allow or (),
            _quota(rps, burst, cost_per_second, cost_burst),
            priority or "standard",
            description,
            reason,
        )
    _show_key(answer, as_json, "created")


@app.command("list")
@handle_errors
def list_tenants(
    active: Annotated[bool, typer.Option("--active", help="leave out revoked tenants")] = False,
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tenants with their key prefix, allowed models, quota and priority (never keys)."""
    with registry_client(registry, token) as client:
        tenants = client.list_tenants(include_revoked=not active)
    if as_json:
        emit_json(tenants)
        return
    table = Table()
    for col in ("tenant", "key", "state", "priority", "allowed models", "quota", "updated"):
        table.add_column(col)
    for t in tenants:
        table.add_row(
            t.name,
            t.key_prefix + "…",
            "revoked" if t.revoked else "active",
            PRIORITY_NAMES[t.priority],
            ", ".join(t.allowed_models) or "all",
            _quota_text(t.quota),
            f"{when(t.updated_at)} by {t.updated_by}",
        )
    out.print(table if tenants else "no tenants")


@app.command("rotate-key")
@handle_errors
def rotate_key(
    name: Annotated[str, typer.Argument(help="tenant name")],
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new API key (printed once); the old one stops working on every router at once."""
    with registry_client(registry, token) as client:
        answer = client.rotate_tenant_key(name, reason)
    _show_key(answer, as_json, "has a new key (the old one no longer works)")


@app.command()
@handle_errors
def revoke(
    name: Annotated[str, typer.Argument(help="tenant name")],
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the tenant: its key is refused (UNAUTHENTICATED) by every router within a second."""
    with registry_client(registry, token) as client:
        tenant = client.revoke_tenant(name, reason)
    if as_json:
        emit_json(tenant)
    else:
        out.print(f"tenant {tenant.name} revoked (key {tenant.key_prefix}…)")


@app.command("set-quota")
@handle_errors
def set_quota(
    name: Annotated[str, typer.Argument(help="tenant name")],
    rps: RpsOpt = 0.0,
    burst: BurstOpt = 0.0,
    cost_per_second: CostOpt = 0.0,
    cost_burst: CostBurstOpt = 0.0,
    priority: PriorityOpt = None,
    allow: AllowOpt = None,
    allow_all: Annotated[bool, typer.Option("--allow-all", help="let the tenant call every model")] = False,
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the tenant's quota (and, if given, its priority class and allowed models)."""
    if allow and allow_all:
        err.print("[red]error:[/red] give --allow or --allow-all, not both")
        raise typer.Exit(2)
    allowed = [] if allow_all else allow
    with registry_client(registry, token) as client:
        tenant = client.set_tenant_quota(
            name, _quota(rps, burst, cost_per_second, cost_burst), priority, allowed, reason
        )
    if as_json:
        emit_json(tenant)
    else:
        out.print(
            f"tenant {tenant.name}: {_quota_text(tenant.quota)}, {PRIORITY_NAMES[tenant.priority]}, "
            f"models: {', '.join(tenant.allowed_models) or 'all'}"
        )


def audit(
    limit: Annotated[int, typer.Option("--limit", "-n", help="newest entries shown")] = 50,
    target: Annotated[
        str, typer.Option("--target", help="only targets starting with this, e.g. tenant/ or model/minilm")
    ] = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: every registry change (models and tenants), who, when, what and why, newest first."""
    with registry_client(registry, token) as client:
        entries = client.audit(limit, target)
    if as_json:
        emit_json(entries)
        return
    table = Table()
    for col in ("when (UTC)", "who", "action", "target", "reason", "detail"):
        table.add_column(col)
    for e in entries:
        detail = json.loads(e.detail) if e.detail else {}
        table.add_row(
            when(e.at), e.actor, e.action, e.target, e.reason, ", ".join(f"{k}={v}" for k, v in detail.items())
        )
    out.print(table if entries else "no changes recorded")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="tenants", help="Tenants: API keys, allowed models, quotas, priority (the registry).")
    root.command("audit")(handle_errors(audit))
