"""Rollout analysis (services/registry/rollout.py) on a real SQLite store with a fake Triton fleet, and the
router's per-version figures (services/router/version_stats.py). Analyses are driven by hand (step())."""

from __future__ import annotations

import asyncio
import bisect
import time

import numpy as np
import pytest

from services.registry.domain import ShadowResult, Target
from services.registry.registry import Registry
from services.registry.repository import ModelRepository
from services.registry.rollout import (
    ROLLOUT_ACTOR,
    Analysis,
    Figures,
    Rollout,
    RolloutPolicy,
    RolloutState,
    check_report,
    policy_with_defaults,
)
from services.registry.store import Store
from services.router.version_stats import LATENCY_BOUNDS_MS, VersionStatsReporter, counted, note_routed
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.unit.test_registry_domain import FakeFleet, register

BOUNDS = tuple(LATENCY_BOUNDS_MS)


def make_registry(tmp_path) -> Registry:
    return Registry(
        Store(tmp_path / "db.sqlite3"),
        ModelRepository(tmp_path / "repo"),
        FakeFleet(),
        executor=None,
        max_artifact_bytes=10_000_000,
        default_max_batch_size=8,
        load_timeout=10,
    )


@pytest.fixture
async def reg(tmp_path):
    registry = make_registry(tmp_path)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()
        registry.store.close()


async def two_versions(reg, model="m"):
    v1 = (await register(reg, model)).version
    v2 = (await register(reg, model)).version
    await reg.set_alias(model, "production", v1, "unit", "")
    return v1, v2


def histogram(latencies_ms) -> list[int]:
    stats = VersionStatsReporter(None)
    for ms in latencies_ms:
        stats.record("m", 1, None, ms / 1000)
    return stats._pending[("m", 1)].counts


def feed(reg, model, version, n, ms=2.0, errors=None):
    errors = dict(errors or {})
    counts = histogram([ms] * (n - sum(errors.values())))
    reg.rollouts.report([(model, version, n, errors, BOUNDS, counts)])


POLICY = RolloutPolicy(
    step_weight=25,
    interval_seconds=3600,
    max_weight=50,
    max_error_rate=0.05,
    max_p99_ratio=2.0,
    min_requests=10,
    failure_limit=2,
)


def test_policy_weights_and_defaults():
    assert RolloutPolicy(step_weight=30, max_weight=100).weights() == [30, 60, 90, 100]
    assert RolloutPolicy(step_weight=25, max_weight=50).weights() == [25, 50]
    assert policy_with_defaults(step_weight=5, max_weight=None) == RolloutPolicy(step_weight=5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("step_weight", 0),
        ("step_weight", 101),
        ("max_weight", 0),
        ("interval_seconds", -1.0),
        ("interval_seconds", float("nan")),
        ("max_error_rate", 1.5),
        ("max_p99_ratio", 0.5),
        ("min_shadow_agreement", -0.1),
        ("failure_limit", 0),
    ],
)
def test_policies_that_cannot_run_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=field):
        policy_with_defaults(**({"max_weight": 100} if field == "step_weight" else {}), **{field: value}).check()


def test_histogram_p99_matches_numpy_within_a_bucket():
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(np.log(5), 0.6, 5000)
    f = Figures(requests=5000, bounds=BOUNDS, counts=histogram(latencies))
    for q in (0.5, 0.9, 0.99):
        assert f.quantile_ms(q) == pytest.approx(np.quantile(latencies, q), rel=0.25)
    assert Figures().quantile_ms(0.99) == 0.0


def test_reports_that_do_not_add_up_are_refused():
    check_report("m", 1, 3, {"INTERNAL": 1}, BOUNDS, [0] * (len(BOUNDS) + 1))
    with pytest.raises(InvalidArgument, match="latency_counts"):
        check_report("m", 1, 3, {}, BOUNDS, [0])
    with pytest.raises(InvalidArgument, match="exceeds requests"):
        check_report("m", 1, 1, {"INTERNAL": 1}, BOUNDS, [1] + [0] * len(BOUNDS))
    with pytest.raises(InvalidArgument, match="ascending"):
        check_report("m", 1, 0, {}, (2.0, 1.0), [0, 0, 0])


async def test_router_counts_requests_against_the_routed_version():
    class Plane:
        version_stats = VersionStatsReporter(None)

        @counted
        async def ok(self, info):
            note_routed(info)

        @counted
        async def fails(self, info):
            note_routed(info)
            raise InvalidArgument("bad")

        @counted
        async def before_routing(self):
            raise InvalidArgument("no model")

    class Info:
        model, version = "m", 3

    plane = Plane()
    await plane.ok(Info())
    with pytest.raises(InvalidArgument):
        await plane.fails(Info())
    with pytest.raises(InvalidArgument):
        await plane.before_routing()
    figures = plane.version_stats._pending
    assert list(figures) == [("m", 3)]
    assert figures[("m", 3)].requests == 2 and figures[("m", 3)].errors == {"INVALID_ARGUMENT": 1}
    assert sum(figures[("m", 3)].counts) == 1


async def test_healthy_canary_steps_then_promotes(reg):
    v1, v2 = await two_versions(reg)
    r = await reg.rollouts.start_rollout("m", v2, POLICY, False, "unit", "")
    assert r.state == RolloutState.RUNNING and r.weight == 25
    assert [(t.version, t.weight) for t in reg.store.policy("m").split] == [(v1, 75), (v2, 25)]
    feed(reg, "m", v2, 5)
    assert await reg.rollouts.step("m")  # 5 < min_requests: waits, window stays open
    assert reg.rollouts.get("m").analyses[-1].outcome == "waiting"
    feed(reg, "m", v2, 10)
    feed(reg, "m", v1, 30)
    assert await reg.rollouts.step("m")
    r = reg.rollouts.get("m")
    assert (r.analyses[-1].outcome, r.analyses[-1].canary_requests, r.weight) == ("passed", 15, 50)
    assert [(t.version, t.weight) for t in reg.store.policy("m").split] == [(v1, 50), (v2, 50)]
    feed(reg, "m", v2, 20)
    feed(reg, "m", v1, 20)
    assert not await reg.rollouts.step("m")
    r = reg.rollouts.get("m")
    assert r.state == RolloutState.PROMOTED
    assert reg.store.alias("m", "production").version == v2 and not reg.store.policy("m").split


async def test_errors_roll_back_after_failure_limit_in_a_row(reg):
    v1, v2 = await two_versions(reg)
    await reg.rollouts.start_rollout("m", v2, POLICY, False, "unit", "")
    feed(reg, "m", v2, 20, errors={"INVALID_ARGUMENT": 4, "CANCELLED": 5})
    assert await reg.rollouts.step("m")
    assert reg.rollouts.get("m").consecutive_failures == 1
    feed(reg, "m", v2, 20)  # a passing analysis resets the count
    assert await reg.rollouts.step("m") and reg.rollouts.get("m").consecutive_failures == 0
    for _ in range(2):
        feed(reg, "m", v2, 20, errors={"INTERNAL": 3})
        done = not await reg.rollouts.step("m")
    r = reg.rollouts.get("m")
    assert done and r.state == RolloutState.ROLLED_BACK
    assert "error rate 0.150 > max_error_rate 0.05 (INTERNAL: 3)" in r.reason and "2 failed analyses" in r.reason
    assert reg.store.alias("m", "production").version == v1 and not reg.store.policy("m").split
    # CANCELLED is the caller's doing: the first failure was INVALID_ARGUMENT's 4 of 20 only.
    assert r.analyses[0].canary_error_rate == pytest.approx(0.2)


async def test_slow_canary_fails_the_p99_gate(reg):
    v1, v2 = await two_versions(reg)
    await reg.rollouts.start_rollout(
        "m", v2, POLICY.__class__(**{**POLICY.__dict__, "failure_limit": 1}), False, "unit", ""
    )
    feed(reg, "m", v1, 50, ms=2.0)
    feed(reg, "m", v2, 20, ms=7.0)
    assert not await reg.rollouts.step("m")
    r = reg.rollouts.get("m")
    assert r.state == RolloutState.ROLLED_BACK and "p99" in r.reason
    assert r.analyses[-1].canary_p99_ms > 2 * r.analyses[-1].production_p99_ms


async def test_shadow_agreement_gate_mirrors_and_judges(reg):
    v1, v2 = await two_versions(reg)
    policy = RolloutPolicy(
        step_weight=50,
        interval_seconds=3600,
        max_weight=50,
        min_requests=1,
        failure_limit=1,
        min_shadow_agreement=0.99,
        max_p99_ratio=0,
    )
    await reg.rollouts.start_rollout("m", v2, policy, False, "unit", "")
    shadow = reg.store.policy("m").shadow
    assert shadow is not None and shadow.version == v2 and reg.store.policy("m").shadow_fraction == 1.0
    feed(reg, "m", v2, 5)
    assert await reg.rollouts.step("m")  # no comparison yet: waits
    reg.report_shadow_results(
        [ShadowResult("m", v1, v2, items=10, top1_agreed=10, cosine_sum=9.0, primary_latency_ms=1, shadow_latency_ms=1)]
    )
    assert not await reg.rollouts.step("m")
    r = reg.rollouts.get("m")  # tiny_onnx has no postprocessing: top-1 agreement (1.0) is the one judged
    assert r.state == RolloutState.PROMOTED, r.reason


async def test_bad_requests_change_nothing(reg):
    v1, v2 = await two_versions(reg)
    before = reg.store.policy("m")
    with pytest.raises(NotFound):
        await reg.rollouts.start_rollout("nope", 1, POLICY, False, "unit", "")
    with pytest.raises(FailedPrecondition, match="already"):
        await reg.rollouts.start_rollout("m", v1, POLICY, False, "unit", "")
    with pytest.raises(InvalidArgument, match="version"):
        await reg.rollouts.start_rollout("m", 0, POLICY, False, "unit", "")
    plan = await reg.rollouts.start_rollout("m", v2, POLICY, True, "unit", "")
    assert plan.state == RolloutState.PLANNED and plan.planned_weights == [25, 50]
    assert reg.store.policy("m") == before
    with pytest.raises(NotFound):
        reg.rollouts.get("m")


async def test_restart_resumes_a_running_rollout_and_settles_a_half_done_rollback(tmp_path):
    reg = make_registry(tmp_path)
    await reg.start()
    v1, v2 = await two_versions(reg)
    await reg.rollouts.start_rollout("m", v2, POLICY, False, "unit", "")
    feed(reg, "m", v2, 20)
    assert await reg.rollouts.step("m")
    await reg.stop()
    # A crash after the policy was set to the default but with the rollout still at 50 %.
    await reg.set_traffic_policy("m", [], None, 0.0, "someone", "")
    reg.store.close()

    reg = make_registry(tmp_path)
    reg.fleet.live = {"m": [v1, v2]}
    await reg.start()
    try:
        r = reg.rollouts.get("m")
        assert r.state == RolloutState.RUNNING and r.weight == 50
        assert [(t.version, t.weight) for t in reg.store.policy("m").split] == [(v1, 50), (v2, 50)]
        assert "m" in reg.rollouts._tasks
        # A rollback whose traffic change a crash cut off is completed on start.
        r.state, r.updated_at = RolloutState.ROLLED_BACK, time.time()  # as _finish commits it
        reg.rollouts._save(r)
        await reg.rollouts.stop()
        await reg.rollouts.start()
        assert not reg.store.policy("m").split and not reg.rollouts._tasks
        # A policy someone set after the rollout ended is theirs: a restart leaves it.
        await reg.set_traffic_policy("m", [Target(version=v2, weight=1)], None, 0.0, ROLLOUT_ACTOR, "later")
        await reg.rollouts.start()
        assert [(t.version, t.weight) for t in reg.store.policy("m").split] == [(v2, 1)]
    finally:
        await reg.stop()
        reg.store.close()
    await asyncio.sleep(0)


def test_status_view_renders_progress_and_analyses():
    from rich.console import Console

    from maas.cli.rollouts import report_view, rollout_view
    from maas.v1 import registry_pb2 as pb
    from services.registry import convert

    reg_rollout = convert.rollout_out(
        Rollout(
            model="m",
            canary_version=2,
            production_version=1,
            state=RolloutState.ROLLED_BACK,
            policy=POLICY,
            weight=25,
            reason="at 25%: error rate 0.200 > max_error_rate 0.05",
            started_at=1.0,
            updated_at=2.0,
            analyses=[
                Analysis(
                    at=2.0,
                    weight=25,
                    canary_requests=40,
                    production_requests=120,
                    canary_error_rate=0.2,
                    canary_p99_ms=3.0,
                    production_p99_ms=2.5,
                    shadow_agreement=0.0,
                    outcome="failed",
                    detail="error rate 0.200 > 0.05",
                )
            ],
        )
    )
    console = Console(record=True, width=160)
    console.print(rollout_view(reg_rollout))
    text = console.export_text()
    assert "m: v2 against production v1 rolled_back at 25%" in text and "25% canary" in text
    assert "failed" in text and "error rate 0.200 > 0.05" in text and "+25% every 3600s up to 50%" in text
    report = pb.ShadowReport(
        model="m",
        primary_version=1,
        shadow_version=2,
        kind="embedding",
        agreement=0.99,
        samples=3,
        items=3,
        mean_cosine=0.99,
        cosine_bounds=[0.5, 1.0],
        cosine_counts=[1, 2],
        worst=[pb.ShadowExample(request_id="abc", score=0.4, items=1)],
    )
    console = Console(record=True, width=160)
    console.print(report_view(report))
    text = console.export_text()
    assert "(-1, 0.5]" in text and "(0.5, 1]" in text and "█" * 30 in text and "abc" in text


def test_fast_path_counts_and_latencies_join_the_version_figures():
    stats = VersionStatsReporter(None)
    stats.record("m", 1, None, 0.002)
    stats.record_counts("m", 1, "OK", 7)
    stats.record_counts("m", 1, "UNAVAILABLE", 2)
    stats.record_counts("m", 2, "OK", 0)  # nothing settled: no entry
    stats.record_latencies("m", 2, [0] * (len(LATENCY_BOUNDS_MS) + 1))  # nothing timed: no entry
    # The forwarder's histogram of its 7 answered calls, on the same bounds: 4 in the 2 ms call's bucket,
    # 3 above the last bound.
    two_ms = bisect.bisect_left(LATENCY_BOUNDS_MS, 2.0)
    fast = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    fast[two_ms], fast[-1] = 4, 3
    stats.record_latencies("m", 1, fast)
    figures = stats._pending[("m", 1)]
    assert (figures.requests, figures.errors, sum(figures.counts)) == (10, {"UNAVAILABLE": 2}, 8)
    assert (figures.counts[two_ms], figures.counts[-1]) == (5, 3)
    assert ("m", 2) not in stats._pending
    with pytest.raises(ValueError, match="buckets"):
        stats.record_latencies("m", 1, [1, 2])  # another histogram's bounds: never merged
