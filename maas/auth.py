"""The bearer token every MaaS API takes in `authorization` metadata (a tenant's API key or the
registry's admin token): one spelling for the clients, the CLI and the services."""

from __future__ import annotations


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `token`; none when there is no token."""
    return (("authorization", f"Bearer {token}"),) if token else ()
