"""Admin bearer token for mutations (reads are open)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from services.shared.errors import PermissionDenied, Unauthenticated


class AdminAuth:
    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raise unless `metadata` carries `authorization: Bearer <admin token>` (when one is configured)."""
        if self._token is None:
            return
        header = next((v for k, v in (metadata or ()) if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated(
                "this registry needs an admin token for changes: send 'authorization: Bearer <token>'"
            )
        value = header.decode() if isinstance(header, bytes) else header
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise PermissionDenied("the admin token is not valid for this registry")
