"""The router's copy of the tenant list, fed by the registry's WatchTenants stream (no registry call per request).

Each event is the whole list with every current key's sha256 and the number of routers subscribed; a key is
checked with one sha256 and a dict lookup. Per-replica quota shares: each router enforces quota / routers
(the registry counts the routers by their WatchTenants streams), so N routers behind a balancer that spreads
a tenant's calls evenly hold the mesh-wide quota. Token bucket levels survive list updates.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from maas.auth import bearer
from maas.v1 import registry_pb2, registry_pb2_grpc
from services.router.watcher import RegistryWatcher

log = logging.getLogger(__name__)

PRIORITIES = {
    registry_pb2.PRIORITY_CRITICAL: "critical",
    registry_pb2.PRIORITY_STANDARD: "standard",
    registry_pb2.PRIORITY_SHEDDABLE: "sheddable",
    registry_pb2.PRIORITY_UNSPECIFIED: "standard",
}


class TokenBucket:
    """`rate` per second up to `burst`. take() for requests (all or nothing); debit() for cost units, known
    only after the work, which may leave the bucket in debt: the next call waits until it is paid back."""

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float, burst: float, now: float | None = None):
        self.rate, self.burst = rate, burst
        self.level = burst
        self.stamp = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float = 1.0, now: float | None = None) -> float:
        """0.0 when taken, else the seconds until `amount` is there (nothing taken)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def wait(self, now: float | None = None) -> float:
        """0.0 when the bucket holds anything, else the seconds until its debt is paid back."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate

    def debit(self, amount: float) -> None:
        self.level -= amount

    def resize(self, rate: float, burst: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._refill(now)
        self.rate, self.burst = rate, burst
        self.level = min(self.level, burst)


def share(rate: float, burst: float, routers: int, minimum: float) -> tuple[float, float]:
    """This router's part of a mesh-wide bucket; a burst of 0 = one second's worth; never below `minimum`
    (a request bucket below 1 would refuse everything)."""
    n = max(routers, 1)
    burst = burst or rate
    return rate / n, max(burst / n, minimum)


@dataclass
class TenantEntry:
    """One tenant as this router enforces it."""

    name: str
    revoked: bool
    allowed: frozenset[str]
    priority: str
    requests: TokenBucket | None = None
    cost: TokenBucket | None = None
    metrics: dict = field(default_factory=dict)  # metric children, looked up once (admission.py)

    def allows(self, model: str, version: int, alias: str) -> bool:
        if not self.allowed or model in self.allowed:
            return True
        return bool(alias and f"{model}:{alias}" in self.allowed or version and f"{model}:{version}" in self.allowed)


def _bucket(old: TokenBucket | None, rate: float, burst: float, routers: int, minimum: float) -> TokenBucket | None:
    if rate <= 0:
        return None
    rate, burst = share(rate, burst, routers, minimum)
    if old is None:
        return TokenBucket(rate, burst)
    old.resize(rate, burst)
    return old


# Keys already matched to a tenant, at most this many (only valid keys are remembered: random keys sent by
# a caller cannot grow it). Constructing an OpenSSL sha256 costs ~20-30 us in a busy router process, more than
# the rest of the admission step; a dict hit costs nanoseconds.
MAX_REMEMBERED_KEYS = 10_000


class TenantCache:
    def __init__(self):
        self._known: dict[str, TenantEntry] = {}  # key → tenant, for the current list only
        self.by_hash: dict[str, TenantEntry] = {}
        self.by_name: dict[str, TenantEntry] = {}
        self.routers = 1
        self.revision = 0
        self.synced = asyncio.Event()
        # Called after each new list (the OIP fast path is sent it: a revocation reaches it at once).
        self.listeners: list = []

    def lookup(self, key: str) -> TenantEntry | None:
        known = self._known
        entry = known.get(key)
        if entry is None:
            entry = self.by_hash.get(hashlib.sha256(key.encode()).hexdigest())
            if entry is not None and len(known) < MAX_REMEMBERED_KEYS:
                known[key] = entry
        return entry

    def apply(self, event: registry_pb2.TenantsEvent) -> None:
        routers = max(event.routers, 1)
        by_hash, by_name = {}, {}
        for auth in event.tenants:
            t = auth.tenant
            old = self.by_name.get(t.name)
            q = t.quota
            entry = TenantEntry(
                name=t.name,
                revoked=t.revoked,
                allowed=frozenset(t.allowed_models),
                priority=PRIORITIES.get(t.priority, "standard"),
                requests=_bucket(old.requests if old else None, q.requests_per_second, q.request_burst, routers, 1.0),
                cost=_bucket(old.cost if old else None, q.cost_per_second, q.cost_burst, routers, 1e-9),
                metrics=old.metrics if old else {},
            )
            by_hash[auth.key_sha256] = entry
            by_name[t.name] = entry
        # One assignment each: a request in between sees the old or the new list, never half of one.
        self.by_hash, self.by_name, self.routers, self.revision = by_hash, by_name, routers, event.revision
        self._known = {}  # a rotated or revoked key is looked up again, in the new list
        self.synced.set()
        for listener in self.listeners:
            listener()


class TenantWatcher(RegistryWatcher):
    """WatchTenants → TenantCache, reconnecting like the routing watch (keeps the last list while away)."""

    def __init__(self, channel: grpc.aio.Channel, cache: TenantCache, admin_token: str | None = None, **backoff):
        super().__init__(channel, table=None, **backoff)
        self.cache = cache
        self._tenants_stub = registry_pb2_grpc.RegistryStub(channel)
        self._metadata = bearer(admin_token)
        self.synced = cache.synced

    def open_stream(self):
        return self._tenants_stub.WatchTenants(registry_pb2.WatchTenantsRequest(), metadata=self._metadata)

    def apply(self, event: registry_pb2.TenantsEvent) -> None:  # type: ignore[override]  # its own stream
        self.cache.apply(event)
        log.info(
            "tenant list", extra={"revision": event.revision, "tenants": len(event.tenants), "routers": event.routers}
        )
