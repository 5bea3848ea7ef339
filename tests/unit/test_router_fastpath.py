"""What the router tells its OIP fast path: each model's routable versions, as a FastPathSnapshot
(protos/maas/v1/fastpath.proto), computed with the routing table's own rules."""

from __future__ import annotations

import pytest

from services.router.config import load_config
from maas.v1 import fastpath_pb2
from services.router.fastpath import framed, model_spec, snapshot
from services.router.routing import ModelRoutes, RoutingTable, Shadow, Target, ServingState
from services.shared.config import ConfigError
from tests.unit.test_router_routing import minilm, version


def spec(routes: ModelRoutes) -> fastpath_pb2.FastPathModel:
    found = model_spec(routes)
    assert found is not None
    return found


def test_a_model_spec_carries_default_ready_versions_usable_split_and_ready_aliases():
    routes = minilm(
        split=(Target(alias="production", weight=90), Target(version=2, weight=10), Target(version=3, weight=50))
    )  # v3 is LOADING: no traffic
    found = spec(routes)
    assert (found.name, found.default_version, list(found.ready_versions)) == ("minilm", 1, [1, 2])
    assert found.has_policy and [(t.version, t.weight) for t in found.split] == [(1, 90), (2, 10)]
    assert dict(found.aliases) == {"canary": 2, "production": 1}


def test_the_python_router_keeps_what_it_must_answer_itself():
    no_ready = spec(minilm(versions={3: version(3, ServingState.LOADING)}, aliases={}))
    assert (no_ready.default_version, list(no_ready.ready_versions), no_ready.has_policy) == (0, [], False)
    unusable = spec(minilm(split=(Target(version=3, weight=100),)))
    assert unusable.has_policy and not unusable.split  # FAILED_PRECONDITION comes from the Python router
    # A shadow policy may copy any call, explicit versions included: the model is the Python router's.
    assert model_spec(minilm(shadow=Shadow(Target(version=2), 0.5))) is None
    assert spec(minilm(name="tab\tand,comma")).name == "tab\tand,comma"  # any name travels in protobuf


def test_a_snapshot_replaces_the_whole_table_with_the_replicas():
    table = RoutingTable()
    empty = snapshot(table, [])
    assert not empty.models and not empty.replicas  # no routing state yet: every call falls back
    table.replace_all([minilm()], revision=1)
    snap = snapshot(table, ["b:8001", "a:8001"])
    assert list(snap.replicas) == ["a:8001", "b:8001"] and [m.name for m in snap.models] == ["minilm"]
    data = framed(snap)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert fastpath_pb2.FastPathSnapshot.FromString(data[4:]) == snap


def test_the_fast_path_is_configured_by_flag_or_env(monkeypatch, tmp_path):
    assert load_config([]).oip_fast_listen == "127.0.0.1:50055"
    assert load_config(["--oip-fast-listen", "off"]).oip_fast_listen == ""
    monkeypatch.setenv("MAAS_ROUTER_OIP_FAST_LISTEN", "off")
    assert load_config([]).oip_fast_listen == ""
    binary = tmp_path / "forwarder"
    binary.write_text("")
    cfg = load_config(["--oip-fast-listen", "127.0.0.1:9", "--oip-fast-binary", str(binary)])
    assert (cfg.oip_fast_listen, cfg.oip_fast_binary) == ("127.0.0.1:9", str(binary))


def test_a_named_binary_that_is_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--oip-fast-binary"):
        load_config(["--oip-fast-binary", str(tmp_path / "missing")])


def test_durations_counted_by_the_forwarder_export_like_observed_ones():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from services.router.fastpath import add_to_histogram

    registry = CollectorRegistry()
    histogram = Histogram("d", "d", ["path"], buckets=(0.001, 0.01, 0.1), registry=registry)
    seconds = [0.0005, 0.001, 0.004, 0.004, 0.05, 2.0]
    for value in seconds:
        histogram.labels("observed").observe(value)
    add_to_histogram(histogram.labels("added"), [2, 2, 1, 1], sum(seconds))  # per bucket, +Inf last
    exported = generate_latest(registry).decode().splitlines()

    def series(path: str) -> list[str]:  # without the creation timestamps, which differ
        label = f'path="{path}"'
        return sorted(line.replace(label, "") for line in exported if label in line and "_created" not in line)

    assert series("observed") == series("added") and any("d_bucket{" in line for line in series("added"))
