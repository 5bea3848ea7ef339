"""Version choice: explicit version > alias > traffic policy > default, sticky keys, shadow sampling."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest

from services.router.routing import (
    ModelRoutes,
    PostKind,
    PreKind,
    RouteKind,
    RoutingTable,
    Shadow,
    Target,
    VersionInfo,
    ServingState,
    unit_interval,
)
from services.shared.errors import FailedPrecondition, NotFound, Unavailable


def version(n: int, state: ServingState = ServingState.READY) -> VersionInfo:
    return VersionInfo(
        model="minilm",
        version=n,
        state=state,
        pre_kind=PreKind.TOKENIZER,
        pre_name="minilm",
        post_kind=PostKind.EMBEDDING,
    )


def table_with(routes: ModelRoutes, seed: int = 7) -> RoutingTable:
    table = RoutingTable(random.Random(seed))
    table.replace_all([routes], revision=1)
    return table


def minilm(**kw) -> ModelRoutes:
    defaults = dict(
        name="minilm",
        versions={1: version(1), 2: version(2), 3: version(3, ServingState.LOADING)},
        aliases={"production": 1, "canary": 2, "next": 3},
    )
    return ModelRoutes(**{**defaults, **kw})


def test_no_state_yet_is_unavailable():
    with pytest.raises(Unavailable) as err:
        RoutingTable().resolve("minilm")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_unknown_model_is_not_found_and_names_known_models():
    with pytest.raises(NotFound, match="'nope'.*minilm"):
        table_with(minilm()).resolve("nope")


def test_precedence_explicit_then_alias_then_policy():
    table = table_with(minilm(split=(Target(version=2, weight=1),)))
    explicit = table.resolve("minilm", version=1, alias="canary")
    assert (explicit.info.version, explicit.kind) == (1, RouteKind.EXPLICIT_VERSION)
    aliased = table.resolve("minilm", alias="production")
    assert (aliased.info.version, aliased.kind, aliased.target) == (1, RouteKind.ALIAS, "production")
    policy = table.resolve("minilm")
    assert (policy.info.version, policy.kind, policy.target) == (2, RouteKind.TRAFFIC_POLICY, "v2")


def test_default_is_production_alias_else_newest_ready():
    assert table_with(minilm()).resolve("minilm").info.version == 1
    route = table_with(minilm(aliases={})).resolve("minilm")
    assert (route.info.version, route.kind) == (2, RouteKind.DEFAULT)  # v3 is still LOADING


def test_not_ready_and_missing_versions():
    table = table_with(minilm())
    with pytest.raises(FailedPrecondition, match="LOADING"):
        table.resolve("minilm", version=3)
    with pytest.raises(FailedPrecondition, match="alias 'next'"):
        table.resolve("minilm", alias="next")
    with pytest.raises(NotFound, match="no version 9"):
        table.resolve("minilm", version=9)
    with pytest.raises(NotFound, match="no alias 'blue'"):
        table.resolve("minilm", alias="blue")
    with pytest.raises(FailedPrecondition, match="no READY version"):
        table_with(ModelRoutes("minilm", {1: version(1, ServingState.FAILED)})).resolve("minilm")


def test_canary_split_share_and_alias_targets():
    table = table_with(minilm(split=(Target(alias="production", weight=90), Target(alias="canary", weight=10))))
    counts = Counter(table.resolve("minilm").info.version for _ in range(20_000))
    assert set(counts) == {1, 2}
    assert 0.09 < counts[2] / 20_000 < 0.11


def test_keyless_split_is_even_over_any_window():
    # Low-discrepancy draws: every 100 consecutive requests give the 10% canary 8-12 of them.
    table = table_with(minilm(split=(Target(version=1, weight=90), Target(version=2, weight=10))), seed=3)
    versions = [table.resolve("minilm").info.version for _ in range(2000)]
    for start in range(0, 2000, 100):
        assert 8 <= versions[start : start + 100].count(2) <= 12
    other = table_with(minilm(split=(Target(version=1, weight=90), Target(version=2, weight=10))), seed=5)
    assert [other.resolve("minilm").info.version for _ in range(50)] != versions[:50]  # replicas differ


def test_sticky_routing_key_always_gets_the_same_version_and_spreads_keys():
    table = table_with(minilm(split=(Target(version=1, weight=50), Target(version=2, weight=50))))
    for key in ("alice", "bob", "carol"):
        assert len({table.resolve("minilm", routing_key=key).info.version for _ in range(50)}) == 1
    per_key = Counter(table.resolve("minilm", routing_key=f"user-{i}").info.version for i in range(4000))
    assert 0.45 < per_key[1] / 4000 < 0.55
    assert 0 <= unit_interval("a", "b") < 1 and unit_interval("a", "b") == unit_interval("a", "b")


def test_targets_that_are_not_ready_get_no_traffic():
    table = table_with(minilm(split=(Target(version=1, weight=1), Target(version=3, weight=99))))
    assert {table.resolve("minilm").info.version for _ in range(200)} == {1}
    broken = table_with(minilm(split=(Target(version=3, weight=1), Target(alias="gone", weight=1))))
    with pytest.raises(FailedPrecondition, match="traffic policy"):
        broken.resolve("minilm")


def test_shadow_fraction_and_never_onto_itself():
    table = table_with(minilm(shadow=Shadow(Target(alias="canary"), 0.25)))
    shadowed = sum(table.resolve("minilm").shadow is not None for _ in range(8000))
    assert 0.22 < shadowed / 8000 < 0.28
    assert all(table.resolve("minilm", version=2).shadow is None for _ in range(100))
    full = table_with(minilm(shadow=Shadow(Target(version=2), 1.0)))
    assert full.resolve("minilm").shadow.version == 2


def test_updates_replace_a_model_whole_and_ignore_stale_revisions():
    table = table_with(minilm())
    table.update(minilm(aliases={"production": 2}), revision=5)
    assert table.resolve("minilm").info.version == 2
    table.update(minilm(aliases={"production": 1}), revision=4)  # stale: ignored
    assert table.resolve("minilm").info.version == 2
    table.replace_all([], revision=1)  # a fresh snapshot (after a reconnect) always wins
    with pytest.raises(NotFound):
        table.resolve("minilm")
