"""Admission of inference calls: API key → tenant, allowed models, quotas, priority load shedding.

Order: key (UNAUTHENTICATED: missing, malformed, unknown, revoked) → model allowed (PERMISSION_DENIED) →
overload shedding by priority class (UNAVAILABLE, a retry later or elsewhere may succeed) → request bucket,
cost bucket (RESOURCE_EXHAUSTED). Refusals carry `retry-after-ms` in trailing metadata when waiting helps.

Cost units are charged after the work (tokens are known once tokenized, generated tokens as they stream):
the dataplane calls `charge()`, which finds the call's ticket in a context variable. A call may take the
cost bucket into debt; the tenant's next call waits until it is paid back.

Shedding counts this router's admitted calls in flight (all classes): at `shed_sheddable_inflight` sheddable
calls are refused, at `shed_standard_inflight` standard ones too; critical calls are never shed. The class is
the tenant's, or lower when the call asks (`x-maas-priority: sheddable`); a call never raises its class.
The second signal is Triton's queue time (queue_time.py, sampled every 0.25 s off the request path): from
`shed_sheddable_queue_ms` sheddable calls are refused, from `shed_standard_queue_ms` standard ones too.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

from prometheus_client import Counter

from services.router.tenants import TenantCache, TenantEntry
from services.shared.errors import (
    RETRY_AFTER_METADATA,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

AUTHORIZATION = "authorization"
PRIORITY_METADATA = "x-maas-priority"
_RANK = {"critical": 0, "standard": 1, "sheddable": 2}

TENANT_REQUESTS = Counter(
    "maas_tenant_requests", "Inference calls admitted, by tenant and method", ["tenant", "method"]
)
TENANT_COST = Counter(
    "maas_tenant_cost_units", "Cost units charged (tokens, images, generated tokens, batch rows)", ["tenant", "method"]
)
TENANT_REFUSALS = Counter(
    "maas_tenant_refusals",
    "Inference calls refused by admission, by tenant and reason "
    "(unauthenticated, revoked, permission_denied, shed = router's in-flight calls, shed_queue = Triton's "
    "queue time, rate_limited, cost_limited)",
    ["tenant", "reason"],
)


# The refusals' words, also sent to the OIP fast path (fastpath.py: the snapshot's FastPathAuth), which
# answers them itself: both router ports say the same.
MISSING_KEY_MESSAGE = (
    "this router needs an API key: send metadata 'authorization: Bearer <key>' "
    "(HTTP header Authorization); an admin creates one with `maas tenants create`"
)
MALFORMED_KEY_MESSAGE = "the authorization metadata must be 'Bearer <key>'"
UNKNOWN_KEY_MESSAGE = "the API key sent is not valid (unknown, or replaced by `maas tenants rotate-key`)"


def revoked_message(tenant: TenantEntry) -> str:
    return f"the API key of tenant {tenant.name!r} is revoked"


def denied_message(tenant: TenantEntry, asked: str) -> str:
    """asked: 'model', 'model:alias' or 'model:3', as the call named it."""
    return (
        f"tenant {tenant.name!r} may not call model {asked!r} (allowed: {', '.join(sorted(tenant.allowed))}); "
        f"ask an admin: maas tenants set-quota {tenant.name} --allow …"
    )


class Refused(ResourceExhausted):
    """Over quota; `trailing_metadata` carries the retry-after hint (the interceptor sends it)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.trailing_metadata = ((RETRY_AFTER_METADATA, str(max(1, math.ceil(retry_after * 1000)))),)


class Shed(Unavailable):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.trailing_metadata = ((RETRY_AFTER_METADATA, str(max(1, math.ceil(retry_after * 1000)))),)


@dataclass(frozen=True)
class AdmissionSettings:
    auth: bool = False
    # Admitted calls in flight at which sheddable (then standard) calls are refused; 0 = never.
    shed_sheddable_inflight: int = 0
    shed_standard_inflight: int = 0
    # Retry hint sent with a shed call (seconds): an overload lasts longer than a quota's next token, and
    # clients retrying sooner would only add refusals for the router to answer.
    shed_retry_after: float = 0.25
    # Triton's queue time (ms, the longest model's mean over the last sample) from which sheddable (then
    # standard) calls are refused; 0 = never. Sampled every queue_sample_interval seconds (queue_time.py).
    shed_sheddable_queue_ms: float = 0.0
    shed_standard_queue_ms: float = 0.0
    queue_sample_interval: float = 0.25

    @property
    def sheds_on_queue_time(self) -> bool:
        return bool(self.shed_sheddable_queue_ms or self.shed_standard_queue_ms)

    @property
    def sheds(self) -> bool:
        return bool(self.shed_sheddable_inflight or self.shed_standard_inflight) or self.sheds_on_queue_time


class Ticket:
    """One admitted call: in flight until closed; cost units charged to its tenant."""

    __slots__ = ("admission", "tenant", "method", "token")

    def __init__(self, admission: "Admission", tenant: TenantEntry | None, method: str):
        self.admission, self.tenant, self.method = admission, tenant, method
        self.token: contextvars.Token | None = None

    def charge(self, units: float) -> None:
        tenant = self.tenant
        if tenant is None or units <= 0:
            return
        if tenant.cost is not None:
            tenant.cost.debit(units)
        _child(tenant, "cost", self.method).inc(units)

    def open(self) -> "Ticket":
        """In flight (streams use open/close and charge the ticket themselves: a generator may be closed
        from another context, where a context variable cannot be reset)."""
        self.admission.inflight += 1
        return self

    def close(self) -> None:
        self.admission.inflight -= 1

    def __enter__(self) -> "Ticket":
        self.admission.inflight += 1
        self.token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self.admission.inflight -= 1
        _current.reset(self.token)


class _Unchecked:
    """The ticket when admission is off: does nothing."""

    def charge(self, units: float) -> None:
        pass

    def open(self) -> "_Unchecked":
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Unchecked":
        return self

    def __exit__(self, *exc) -> None:
        pass


UNCHECKED = _Unchecked()


_current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("maas_admission_ticket", default=None)


def charge(units: float) -> None:
    """Charge cost units to the tenant of the call being handled (no-op outside an admitted call)."""
    ticket = _current.get()
    if ticket is not None:
        ticket.charge(units)


def _child(tenant: TenantEntry, kind: str, label: str):
    key = (kind, label)
    child = tenant.metrics.get(key)
    if child is None:
        metric = {"requests": TENANT_REQUESTS, "cost": TENANT_COST, "refused": TENANT_REFUSALS}[kind]
        child = tenant.metrics[key] = metric.labels(tenant.name, label)
    return child


def _metadata(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class _NoQueueTime:
    """Triton's queue time when nobody samples it."""

    worst = 0.0
    worst_model = ""
    interval = 0.0


class Admission:
    def __init__(self, settings: AdmissionSettings, cache: TenantCache | None = None, queue=None):
        """queue: Triton's queue time (queue_time.TritonQueueTime: `worst` seconds, `worst_model`)."""
        self.settings = settings
        self.cache = cache if cache is not None else TenantCache()
        self.queue = queue if queue is not None else _NoQueueTime()
        self.inflight = 0
        self._shed = {"sheddable": settings.shed_sheddable_inflight, "standard": settings.shed_standard_inflight}
        self._shed_queue = {
            "sheddable": settings.shed_sheddable_queue_ms / 1000,
            "standard": settings.shed_standard_queue_ms / 1000,
        }

    @property
    def active(self) -> bool:
        return self.settings.auth or self.settings.sheds

    def admit(self, metadata, method: str, model: str, version: int = 0, alias: str = "") -> Ticket | _Unchecked:
        """The ticket of an admitted call (use it as a context manager), or the refusal raised."""
        if not self.active:
            return UNCHECKED
        header = asked = None
        for key, value in metadata or ():  # one pass: the key and the asked-for class
            if key == AUTHORIZATION:
                header = value
            elif key == PRIORITY_METADATA:
                asked = value
        tenant = self._authenticate(header) if self.settings.auth else None
        if tenant is not None and not tenant.allows(model, version, alias):
            _child(tenant, "refused", "permission_denied").inc()
            asked = f"{model}:{alias}" if alias else f"{model}:{version}" if version else model
            raise PermissionDenied(denied_message(tenant, asked))
        priority = tenant.priority if tenant is not None else "standard"
        if asked is not None:
            asked = (asked if isinstance(asked, str) else asked.decode("latin-1")).strip().lower()
            if asked in _RANK and _RANK[asked] > _RANK[priority]:
                priority = asked
        threshold = self._shed.get(priority, 0)
        if threshold and self.inflight >= threshold:
            if tenant is not None:
                _child(tenant, "refused", "shed").inc()
            else:
                TENANT_REFUSALS.labels("", "shed").inc()
            raise Shed(
                f"router overloaded: {self.inflight} calls in flight, {priority} calls are refused from "
                f"{threshold} (--shed-{priority}-inflight); retry later or on another router",
                self.settings.shed_retry_after,
            )
        limit = self._shed_queue.get(priority, 0)
        if limit and self.queue.worst >= limit:
            self._shed_on_queue_time(tenant, priority, limit)
        if tenant is not None:
            self._quota(tenant)
            _child(tenant, "requests", method).inc()
        return Ticket(self, tenant, method)

    def _shed_on_queue_time(self, tenant: TenantEntry | None, priority: str, limit: float) -> None:
        if tenant is not None:
            _child(tenant, "refused", "shed_queue").inc()
        else:
            TENANT_REFUSALS.labels("", "shed_queue").inc()
        queue = self.queue
        raise Shed(
            f"Triton overloaded: requests of model {queue.worst_model!r} waited {queue.worst * 1000:.1f} ms in "
            f"its queue (mean over the last {queue.interval:g} s), {priority} calls are refused from "
            f"{limit * 1000:g} ms (--shed-{priority}-queue-ms); retry later or on another router",
            self.settings.shed_retry_after,
        )

    def authenticate(self, metadata) -> TenantEntry:
        """The tenant of the key in `metadata`, or UNAUTHENTICATED saying what is wrong with it."""
        return self._authenticate(_metadata(metadata, AUTHORIZATION))

    def _authenticate(self, header) -> TenantEntry:
        if header is None:
            TENANT_REFUSALS.labels("", "unauthenticated").inc()
            raise Unauthenticated(MISSING_KEY_MESSAGE)
        if not isinstance(header, str):
            header = header.decode("latin-1")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            TENANT_REFUSALS.labels("", "unauthenticated").inc()
            raise Unauthenticated(MALFORMED_KEY_MESSAGE)
        if not self.cache.synced.is_set():
            raise Unavailable("the tenant list has not been received from the registry yet; retry shortly")
        tenant = self.cache.lookup(key)
        if tenant is None:
            TENANT_REFUSALS.labels("", "unauthenticated").inc()
            raise Unauthenticated(UNKNOWN_KEY_MESSAGE)
        if tenant.revoked:
            _child(tenant, "refused", "revoked").inc()
            raise Unauthenticated(revoked_message(tenant))
        return tenant

    @staticmethod
    def _quota(tenant: TenantEntry) -> None:
        if tenant.requests is not None:
            wait = tenant.requests.take()
            if wait:
                _child(tenant, "refused", "rate_limited").inc()
                raise Refused(
                    f"tenant {tenant.name!r} is over its request quota "
                    f"({tenant.requests.rate:g} requests/s on this router); retry in {wait * 1000:.0f} ms",
                    wait,
                )
        if tenant.cost is not None:
            wait = tenant.cost.wait()
            if wait:
                if tenant.requests is not None:
                    tenant.requests.level += 1  # not served: the request is not counted
                _child(tenant, "refused", "cost_limited").inc()
                raise Refused(
                    f"tenant {tenant.name!r} is over its cost quota "
                    f"({tenant.cost.rate:g} cost units/s on this router); retry in {wait * 1000:.0f} ms",
                    wait,
                )
