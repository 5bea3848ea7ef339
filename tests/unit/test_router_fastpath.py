"""What the router tells its OIP fast path: each model's routable versions, in lines the
forwarder reads, computed with the routing table's own rules."""

from __future__ import annotations

import pytest

from services.router.config import load_config
from services.router.fastpath import model_line, snapshot
from services.router.routing import ModelRoutes, RoutingTable, Shadow, Target, ServingState
from services.shared.config import ConfigError
from tests.unit.test_router_routing import minilm, version


def fields(routes: ModelRoutes) -> list[str]:
    line = model_line(routes)
    assert line is not None
    return line.split("\t")


def test_a_model_line_carries_default_ready_versions_usable_split_and_ready_aliases():
    routes = minilm(
        split=(Target(alias="production", weight=90), Target(version=2, weight=10), Target(version=3, weight=50))
    )  # v3 is LOADING: no traffic
    # model, default (production → v1), READY versions, usable targets, aliases to READY versions, shadow
    assert fields(routes) == ["model", "minilm", "1", "1,2", "1:90,2:10", "canary=2,production=1", "0"]


def test_the_python_router_keeps_what_it_must_answer_itself():
    no_ready = minilm(versions={3: version(3, ServingState.LOADING)}, aliases={})
    assert fields(no_ready)[2:5] == ["0", "-", "-"]  # no default: version-less calls go to the Python router
    unusable = minilm(split=(Target(version=3, weight=100),))
    assert fields(unusable)[4] == "!"  # FAILED_PRECONDITION comes from the Python router
    shadowed = minilm(shadow=Shadow(Target(version=2), 0.5))
    assert fields(shadowed)[6] == "1"
    assert model_line(minilm(name="bad\tname")) is None


def test_a_snapshot_replaces_the_whole_table_with_the_replicas():
    table = RoutingTable()
    assert snapshot(table, []) == "begin\nreplicas\t-\ncommit\n"  # no routing state yet: every call falls back
    table.replace_all([minilm()], revision=1)
    lines = snapshot(table, ["b:8001", "a:8001"]).splitlines()
    assert lines[0] == "begin" and lines[1] == "replicas\ta:8001,b:8001" and lines[-1] == "commit"
    assert lines[2].startswith("model\tminilm\t")


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
