"""Tenants without a network: the registry's tenant store and audit log, the router's token buckets,
per-router shares and admission codes, and the gateway's retry hint."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from tritonclient.grpc import service_pb2

from maas.v1 import registry_pb2 as pb
from services.openai.errors import from_grpc
from services.registry import convert
from services.registry.store import Store
from services.registry.tenants import Priority, Quota, Tenants, key_hash
from services.router.admission import TENANT_REFUSALS, Admission, AdmissionSettings, Refused, Shed
from services.router.queue_time import TritonQueueTime
from services.router.tenants import TenantCache, TokenBucket, share
from services.shared.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated


@pytest.fixture
def tenants(tmp_path):
    store = Store(tmp_path / "registry.sqlite3")
    yield Tenants(store)
    store.close()


def test_a_key_is_shown_once_and_stored_only_as_its_sha256(tenants, tmp_path):
    tenant, key = tenants.create(
        "acme", ["minilm", "smollm2:production"], Quota(50, 10), Priority.CRITICAL, "", "alice", "onboarding"
    )
    assert key.startswith("maas_") and len(key) > 40
    assert tenant.key_sha256 == hashlib.sha256(key.encode()).hexdigest()
    assert tenant.key_prefix == key[: len(tenant.key_prefix)] and len(tenant.key_prefix) < 16
    raw = (tmp_path / "registry.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("registry.sqlite3-*")
    )
    assert key.encode() not in raw and key_hash(key).encode() in raw  # the database never holds the key
    listed = tenants.list()
    assert [t.name for t in listed] == ["acme"] and listed[0].allowed_models == ("minilm", "smollm2:production")
    with pytest.raises(AlreadyExists, match="exists already"):
        tenants.create("acme", [], Quota(), Priority.STANDARD, "", "alice", "")


def test_rotate_revoke_set_quota_and_the_audit_log(tenants):
    first, old = tenants.create("acme", [], Quota(), Priority.STANDARD, "", "alice", "new customer")
    rotated, new = tenants.rotate_key("acme", "bob", "leaked in a log")
    assert new != old and rotated.key_sha256 == key_hash(new) != first.key_sha256
    changed = tenants.set_quota("acme", Quota(requests_per_second=5), Priority.SHEDDABLE, ["minilm"], "carol", "tier")
    assert changed.quota.requests_per_second == 5 and changed.priority == Priority.SHEDDABLE
    assert changed.allowed_models == ("minilm",)
    revoked = tenants.revoke("acme", "dave", "contract ended")
    assert revoked.revoked
    entries = tenants.audit()
    assert [(e.action, e.actor, e.reason) for e in entries] == [
        ("tenant.revoke", "dave", "contract ended"),
        ("tenant.set_quota", "carol", "tier"),
        ("tenant.rotate_key", "bob", "leaked in a log"),
        ("tenant.create", "alice", "new customer"),
    ]
    assert all(e.target == "tenant/acme" for e in entries)
    assert not any(old in e.detail or new in e.detail for e in entries)  # never a key in the log
    snapshot = tenants.snapshot()
    assert snapshot.revision == 4 and snapshot.tenants[0].revoked


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda t: t.create("Bad Name", [], Quota(), Priority.STANDARD, "", "", ""), InvalidArgument),
        (lambda t: t.create("acme", ["minilm:"], Quota(), Priority.STANDARD, "", "", ""), InvalidArgument),
        (lambda t: t.create("acme", [], Quota(requests_per_second=-1), Priority.STANDARD, "", "", ""), InvalidArgument),
        (
            lambda t: t.create("acme", [], Quota(cost_per_second=float("nan")), Priority.STANDARD, "", "", ""),
            InvalidArgument,
        ),
        (lambda t: t.revoke("nobody", "", ""), NotFound),
        (lambda t: t.rotate_key("nobody", "", ""), NotFound),
    ],
)
def test_bad_tenant_requests_are_refused_with_what_was_wrong(tenants, call, error):
    with pytest.raises(error):
        call(tenants)


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.take(now=0.0) == 0 and bucket.take(now=0.0) == 0
    assert bucket.take(now=0.0) == pytest.approx(0.1)  # empty: one token in 1/10 s
    assert bucket.take(now=0.1) == 0
    assert bucket.take(now=100.0) == 0 and bucket.level == pytest.approx(1.0)  # capped at the burst
    cost = TokenBucket(rate=100, burst=50, now=0.0)
    assert cost.wait(now=0.0) == 0
    cost.debit(250)  # known after the work: the bucket goes into debt
    assert cost.wait(now=0.0) == pytest.approx(2.0)
    assert cost.wait(now=2.01) == 0


def test_each_router_enforces_its_share_and_the_burst_is_at_least_one_request():
    assert share(50, 10, 2, 1.0) == (25, 5)
    assert share(50, 0, 2, 1.0) == (25, 25)  # burst 0 = one second's worth
    assert share(3, 1, 4, 1.0) == (0.75, 1.0)


def _event(*tenants: tuple[str, str, dict], routers: int = 1, revision: int = 1) -> pb.TenantsEvent:
    out = pb.TenantsEvent(revision=revision, routers=routers)
    for name, key, fields in tenants:
        out.tenants.add(tenant=pb.Tenant(name=name, **fields), key_sha256=key_hash(key))
    return out


def _admission(event: pb.TenantsEvent, **settings) -> Admission:
    cache = TenantCache()
    cache.apply(event)
    return Admission(AdmissionSettings(auth=True, **settings), cache)


def bearer(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def test_admission_says_which_key_problem_it_is():
    admission = _admission(_event(("acme", "k-acme", {}), ("gone", "k-gone", {"revoked": True})))
    with pytest.raises(Unauthenticated, match="needs an API key"):
        admission.admit((), "Embed", "minilm")
    with pytest.raises(Unauthenticated, match="Bearer <key>"):
        admission.admit((("authorization", "Basic xyz"),), "Embed", "minilm")
    with pytest.raises(Unauthenticated, match="not valid"):
        admission.admit(bearer("k-wrong"), "Embed", "minilm")
    with pytest.raises(Unauthenticated, match="'gone' is revoked"):
        admission.admit(bearer("k-gone"), "Embed", "minilm")
    with admission.admit(bearer("k-acme"), "Embed", "minilm") as ticket:
        assert ticket.tenant.name == "acme" and admission.inflight == 1
    assert admission.inflight == 0


def test_a_key_remembered_by_the_cache_is_refused_once_the_new_list_revokes_or_rotates_it():
    admission = _admission(_event(("acme", "k1", {})))
    admission.admit(bearer("k1"), "Embed", "m")
    admission.admit(bearer("k1"), "Embed", "m")  # the second lookup is the remembered key
    admission.cache.apply(_event(("acme", "k1", {"revoked": True}), revision=2))
    with pytest.raises(Unauthenticated, match="revoked"):
        admission.admit(bearer("k1"), "Embed", "m")
    admission.cache.apply(_event(("acme", "k2", {}), revision=3))  # rotated
    with pytest.raises(Unauthenticated, match="not valid"):
        admission.admit(bearer("k1"), "Embed", "m")
    admission.admit(bearer("k2"), "Embed", "m")
    with pytest.raises(Unauthenticated):
        admission.admit(bearer("random"), "Embed", "m")
    assert set(admission.cache._known) == {"k2"}  # only valid keys are remembered


def test_allowed_models_by_name_alias_or_version():
    admission = _admission(_event(("acme", "k", {"allowed_models": ["minilm", "smollm2:production", "tiny:3"]})))
    for model, version, alias in (
        ("minilm", 0, ""),
        ("minilm", 2, ""),
        ("minilm", 0, "canary"),
        ("smollm2", 0, "production"),
        ("tiny", 3, ""),
    ):
        admission.admit(bearer("k"), "Infer", model, version, alias)
    for model, version, alias in (("smollm2", 0, ""), ("smollm2", 0, "canary"), ("tiny", 2, ""), ("other", 0, "")):
        with pytest.raises(PermissionDenied, match=f"tenant 'acme' may not call model '{model}"):
            admission.admit(bearer("k"), "Infer", model, version, alias)


def test_over_the_request_quota_is_resource_exhausted_with_a_retry_hint():
    quota = pb.Quota(requests_per_second=10, request_burst=4)
    admission = _admission(_event(("acme", "k", {"quota": quota}), routers=2))  # this router: 5/s, burst 2
    admission.admit(bearer("k"), "Embed", "m")
    admission.admit(bearer("k"), "Embed", "m")
    with pytest.raises(Refused, match="over its request quota \\(5 requests/s on this router\\)") as refused:
        admission.admit(bearer("k"), "Embed", "m")
    ((key, value),) = refused.value.trailing_metadata
    assert key == "retry-after-ms" and 1 <= int(value) <= 200
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cost_units_charged_after_the_work_hold_back_the_next_call():
    admission = _admission(_event(("acme", "k", {"quota": pb.Quota(cost_per_second=100, cost_burst=100)})))
    with admission.admit(bearer("k"), "Embed", "m") as ticket:
        ticket.charge(300)  # e.g. 300 tokens
    with pytest.raises(Refused, match="over its cost quota"):
        admission.admit(bearer("k"), "Embed", "m")


def test_a_list_update_keeps_bucket_levels_and_takes_the_new_router_count():
    quota = pb.Quota(requests_per_second=10, request_burst=10)
    admission = _admission(_event(("acme", "k", {"quota": quota}), routers=1))
    for _ in range(10):
        admission.admit(bearer("k"), "Embed", "m")
    admission.cache.apply(_event(("acme", "k", {"quota": quota}), routers=2, revision=2))
    tenant = admission.cache.by_name["acme"]
    assert tenant.requests.rate == 5 and tenant.requests.burst == 5 and tenant.requests.level < 1
    with pytest.raises(Refused):
        admission.admit(bearer("k"), "Embed", "m")


def test_sheddable_calls_are_refused_first_and_critical_ones_never():
    admission = _admission(
        _event(
            ("crit", "kc", {"priority": pb.PRIORITY_CRITICAL}),
            ("std", "ks", {"priority": pb.PRIORITY_STANDARD}),
            ("shed", "kx", {"priority": pb.PRIORITY_SHEDDABLE}),
        ),
        shed_sheddable_inflight=2,
        shed_standard_inflight=4,
    )
    held = [admission.admit(bearer("kc"), "Infer", "m").open() for _ in range(2)]
    with pytest.raises(Shed, match="sheddable calls are refused from 2") as shed:
        admission.admit(bearer("kx"), "Infer", "m")
    assert shed.value.code == grpc.StatusCode.UNAVAILABLE and shed.value.trailing_metadata
    # A call may lower its class, never raise it.
    with pytest.raises(Shed):
        admission.admit(bearer("ks") + (("x-maas-priority", "sheddable"),), "Infer", "m")
    held += [admission.admit(bearer("ks"), "Infer", "m").open() for _ in range(2)]
    with pytest.raises(Shed, match="standard calls are refused from 4"):
        admission.admit(bearer("ks"), "Infer", "m")
    with pytest.raises(Shed):
        admission.admit(bearer("kx") + (("x-maas-priority", "critical"),), "Infer", "m")
    admission.admit(bearer("kc"), "Infer", "m")  # critical: never shed
    for ticket in held:
        ticket.close()
    admission.admit(bearer("kx"), "Infer", "m")


def _stats(*models: tuple[str, str, int, int]) -> service_pb2.ModelStatisticsResponse:
    """(model, version, queue count, queue ns) → a ModelStatistics answer."""
    out = service_pb2.ModelStatisticsResponse()
    for name, version, count, ns in models:
        stats = out.model_stats.add(name=name, version=version)
        stats.inference_stats.queue.count, stats.inference_stats.queue.ns = count, ns
    return out


def test_triton_queue_time_is_the_mean_of_the_requests_that_left_the_queue_since_the_last_sample():
    queue = TritonQueueTime(pool=None)
    assert queue.deltas("a", _stats(("m", "1", 100, 10**9))) == {"m": (0, 0)}  # first sample: the baseline
    # Versions of a model add up; 10 requests in 50 ms of queue on "m", none on "idle".
    a = queue.deltas("a", _stats(("m", "1", 106, 10**9 + 30_000_000), ("m", "2", 4, 20_000_000), ("idle", "1", 0, 0)))
    assert a == {"m": (10, 50_000_000), "idle": (0, 0)}
    # Counters that went back (model reloaded, Triton restarted): a new baseline, not a negative time.
    assert queue.deltas("a", _stats(("m", "1", 3, 1000), ("m", "2", 4, 20_000_000))) == {"m": (0, 0)}
    # What a version's dynamic batcher makes each request wait by design is not counted.
    queue.delays[("m", "1")] = 2_000_000
    assert queue.deltas("a", _stats(("m", "1", 13, 1000 + 25_000_000), ("m", "2", 4, 20_000_000))) == {
        "m": (10, 5_000_000)
    }
    assert queue.deltas("a", _stats(("m", "1", 23, 1000 + 35_000_000), ("m", "2", 4, 20_000_000))) == {"m": (10, 0)}
    queue.update({"m": 0.005, "idle": 0.0})
    assert (queue.worst_model, queue.worst) == ("m", 0.005)
    queue.update({})
    assert queue.worst == 0.0


def test_triton_queue_time_sheds_sheddable_then_standard_and_never_critical():
    cache = TenantCache()
    cache.apply(
        _event(
            ("crit", "kc", {"priority": pb.PRIORITY_CRITICAL}),
            ("std", "ks", {"priority": pb.PRIORITY_STANDARD}),
            ("shed", "kx", {"priority": pb.PRIORITY_SHEDDABLE}),
        )
    )
    queue = TritonQueueTime(pool=None, interval=0.25)
    settings = AdmissionSettings(auth=True, shed_sheddable_queue_ms=5, shed_standard_queue_ms=20)
    admission = Admission(settings, cache, queue)
    for key in ("kc", "ks", "kx"):
        admission.admit(bearer(key), "Infer", "m")
    queue.update({"slow": 0.0123, "m": 0.001})
    refusals = TENANT_REFUSALS.labels("shed", "shed_queue")
    before = refusals._value.get()
    with pytest.raises(Shed, match=r"model 'slow' waited 12.3 ms in its queue .*sheddable calls are refused from 5 ms"):
        admission.admit(bearer("kx"), "Infer", "m")
    admission.admit(bearer("ks"), "Infer", "m")
    queue.update({"slow": 0.020})
    with pytest.raises(Shed, match="standard calls are refused from 20 ms") as shed:
        admission.admit(bearer("ks"), "Infer", "m")
    assert shed.value.code == grpc.StatusCode.UNAVAILABLE and shed.value.trailing_metadata
    admission.admit(bearer("kc"), "Infer", "m")  # critical: never shed
    assert refusals._value.get() == before + 1  # refusals by reason: shed_queue
    # Without auth every call is standard: queue-time shedding alone makes admission active.
    open_admission = Admission(AdmissionSettings(shed_standard_queue_ms=20), TenantCache(), queue)
    with pytest.raises(Shed):
        open_admission.admit((), "Infer", "m")
    queue.update({"slow": 0.0})
    open_admission.admit((), "Infer", "m")


def test_admission_off_lets_everything_through():
    admission = Admission(AdmissionSettings())
    with admission.admit((), "Embed", "minilm") as ticket:
        ticket.charge(5)
    assert admission.inflight == 0


def test_the_priority_and_quota_conversions():
    assert convert.priority_in(pb.PRIORITY_UNSPECIFIED) == Priority.STANDARD
    assert convert.priority_in(pb.PRIORITY_UNSPECIFIED, None) is None
    with pytest.raises(InvalidArgument, match="priority 9"):
        convert.priority_in(9)


def test_the_gateway_turns_the_retry_hint_into_retry_after():
    error = from_grpc(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant 'acme' is over its request quota", (("retry-after-ms", "1500"),)
    )
    assert error.status == 429 and error.headers == {"Retry-After": "2", "retry-after-ms": "1500"}
    assert from_grpc(grpc.StatusCode.UNAUTHENTICATED, "x").status == 401
    assert from_grpc(grpc.StatusCode.PERMISSION_DENIED, "x").status == 403
