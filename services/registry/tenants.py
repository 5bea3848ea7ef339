"""Tenants: API keys (shown once, kept as sha256), allowed models, quotas, priority, and the routers' feed.

Keys are 32 random bytes (256 bits) from `secrets`, so a fast hash is the right one: bcrypt/argon2 slow down
guessing of low-entropy passwords, which buys nothing against 2^256 candidates, and would cost every router
~100 ms of CPU per call (or a cache of plain keys). sha256 lets a router check a key with one hash and a dict
lookup, and a leaked database gives no key back.

Mutations are SQLite transactions run on the event loop with no await between check and commit (as for
models); each bumps the tenant revision, writes an audit entry in the same transaction, then every
WatchTenants subscriber gets the whole tenant list again. Subscribers are the routers: their number is
sent along, and each router enforces quota / routers (services/router/tenants.py).
"""

from __future__ import annotations

import builtins
from typing import Any

import asyncio
import enum
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace

from services.registry import metrics
from services.registry.domain import check_name
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound

log = logging.getLogger(__name__)

KEY_PREFIX = "maas_"
KEY_RANDOM_BYTES = 32
SHOWN_PREFIX_CHARS = len(KEY_PREFIX) + 6
MAX_ALLOWED_MODELS = 256
MAX_DESCRIPTION_CHARS = 1024


class Priority(enum.Enum):
    CRITICAL = "critical"
    STANDARD = "standard"
    SHEDDABLE = "sheddable"


@dataclass(frozen=True)
class Quota:
    """Mesh-wide token buckets; 0 = unlimited; a burst of 0 with a rate set = one second's worth."""

    requests_per_second: float = 0.0
    request_burst: float = 0.0
    cost_per_second: float = 0.0
    cost_burst: float = 0.0

    def check(self) -> "Quota":
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"quota.{name} is {value}: give 0 (unlimited) or a positive number")
        return self


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    key_prefix: str
    allowed_models: tuple[str, ...] = ()
    quota: Quota = field(default_factory=Quota)
    priority: Priority = Priority.STANDARD
    revoked: bool = False
    created_at: float = 0.0
    created_by: str = ""
    updated_at: float = 0.0
    updated_by: str = ""
    description: str = ""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str
    reason: str
    detail: str


@dataclass(frozen=True)
class TenantsSnapshot:
    revision: int
    tenants: builtins.list[Tenant]
    routers: int


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_allowed(entries: builtins.list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'model', 'model:alias' or 'model:<version>', each checked; duplicates dropped, order kept."""
    if len(entries) > MAX_ALLOWED_MODELS:
        raise InvalidArgument(f"allowed_models has {len(entries)} entries, at most {MAX_ALLOWED_MODELS} allowed")
    out: builtins.list[str] = []
    for i, entry in enumerate(entries):
        model, sep, selector = entry.partition(":")
        check_name(model, f"allowed_models[{i}] model name")
        if sep:
            if not selector:
                raise InvalidArgument(f"allowed_models[{i}] {entry!r}: give 'model', 'model:alias' or 'model:3'")
            if not selector.isdigit():
                check_name(selector, f"allowed_models[{i}] alias")
        if entry not in out:
            out.append(entry)
    return tuple(out)


def _detail(**values) -> str:
    return json.dumps(values, sort_keys=True, default=str)


class TenantHub:
    """Watchers of the tenant list; each gets the latest snapshot (intermediate ones may be skipped)."""

    def __init__(self):
        self._subscribers: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def publish(self, snapshot: TenantsSnapshot) -> None:
        for queue in list(self._subscribers):
            if queue.full():  # a newer whole list replaces the one not read yet
                queue.get_nowait()
            queue.put_nowait(snapshot)


class Tenants:
    """The tenant API of the registry (the servicer converts, this decides)."""

    def __init__(self, store):
        self.store = store
        self.hub = TenantHub()
        self.record(store.tenants())

    # -- reads -------------------------------------------------------------------------------------
    def list(self, include_revoked: bool = True) -> builtins.list[Tenant]:
        return [t for t in self.store.tenants() if include_revoked or not t.revoked]

    def get(self, name: str) -> Tenant:
        check_name(name, "tenant name")
        tenant = self.store.tenant(name)
        if tenant is None:
            raise NotFound(f"tenant {name!r} does not exist (maas tenants list)")
        return tenant

    def snapshot(self) -> TenantsSnapshot:
        return TenantsSnapshot(self.store.tenant_revision(), self.store.tenants(), self.hub.count)

    def audit(self, limit: int = 100, target_prefix: str = "") -> builtins.list[AuditEntry]:
        return self.store.audit_entries(min(limit or 100, 10_000), target_prefix)

    async def watch(self) -> AsyncIterator[TenantsSnapshot]:
        """The whole list now, then again after every change and every change in the number of routers."""
        queue = self.hub.subscribe()
        metrics.TENANT_WATCHERS.set(self.hub.count)
        try:
            self.hub.publish(self.snapshot())  # every router (this one too) learns the new count
            while True:
                yield await queue.get()
        finally:
            self.hub.unsubscribe(queue)
            metrics.TENANT_WATCHERS.set(self.hub.count)
            self.hub.publish(self.snapshot())

    # -- mutations ---------------------------------------------------------------------------------
    def _commit(self, tenant: Tenant, action: str, actor: str, reason: str, insert: bool = False, **detail) -> None:
        with self.store.transaction() as tx:
            if insert:
                self.store.insert_tenant(tx, tenant)
            else:
                self.store.update_tenant(tx, tenant)
            self.store.bump_tenant_revision(tx)
            self.store.add_audit(tx, actor, action, f"tenant/{tenant.name}", reason, _detail(**detail))
        log.info("tenant changed", extra={"tenant": tenant.name, "action": action, "actor": actor, "reason": reason})
        snapshot = self.snapshot()
        self.record(snapshot.tenants)
        self.hub.publish(snapshot)

    @staticmethod
    def record(tenants: builtins.list[Tenant]) -> None:
        revoked = sum(t.revoked for t in tenants)
        metrics.TENANTS.labels("active").set(len(tenants) - revoked)
        metrics.TENANTS.labels("revoked").set(revoked)

    def create(
        self,
        name: str,
        allowed: builtins.list[str],
        quota: Quota,
        priority: Priority,
        description: str,
        actor: str,
        reason: str,
    ) -> tuple[Tenant, str]:
        check_name(name, "tenant name")
        allowed_models = check_allowed(allowed)
        quota.check()
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(f"description is {len(description)} characters, at most {MAX_DESCRIPTION_CHARS}")
        if self.store.tenant(name) is not None:
            raise AlreadyExists(f"tenant {name!r} exists already (rotate-key gives it a new key)")
        key, now = new_key(), time.time()
        tenant = Tenant(
            name=name,
            key_sha256=key_hash(key),
            key_prefix=key[:SHOWN_PREFIX_CHARS],
            allowed_models=allowed_models,
            quota=quota,
            priority=priority,
            created_at=now,
            created_by=actor,
            updated_at=now,
            updated_by=actor,
            description=description,
        )
        self._commit(
            tenant,
            "tenant.create",
            actor,
            reason,
            insert=True,
            allowed_models=list(allowed_models),
            quota=asdict(quota),
            priority=priority.value,
            key_prefix=tenant.key_prefix,
        )
        return tenant, key

    def rotate_key(self, name: str, actor: str, reason: str) -> tuple[Tenant, str]:
        current = self.get(name)
        key = new_key()
        tenant = replace(
            current,
            key_sha256=key_hash(key),
            key_prefix=key[:SHOWN_PREFIX_CHARS],
            revoked=False,
            updated_at=time.time(),
            updated_by=actor,
        )
        self._commit(
            tenant, "tenant.rotate_key", actor, reason, old_key_prefix=current.key_prefix, key_prefix=tenant.key_prefix
        )
        return tenant, key

    def revoke(self, name: str, actor: str, reason: str) -> Tenant:
        current = self.get(name)
        if current.revoked:
            return current
        tenant = replace(current, revoked=True, updated_at=time.time(), updated_by=actor)
        self._commit(tenant, "tenant.revoke", actor, reason, key_prefix=current.key_prefix)
        return tenant

    def set_quota(
        self,
        name: str,
        quota: Quota,
        priority: Priority | None,
        allowed: builtins.list[str] | None,
        actor: str,
        reason: str,
    ) -> Tenant:
        current = self.get(name)
        quota.check()
        changes: dict[str, Any] = {"quota": quota}
        if priority is not None:
            changes["priority"] = priority
        if allowed is not None:
            changes["allowed_models"] = check_allowed(allowed)
        tenant = replace(current, **changes, updated_at=time.time(), updated_by=actor)
        self._commit(
            tenant,
            "tenant.set_quota",
            actor,
            reason,
            quota=asdict(quota),
            priority=tenant.priority.value,
            allowed_models=list(tenant.allowed_models),
        )
        return tenant
