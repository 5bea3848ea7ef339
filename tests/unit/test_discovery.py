"""EndpointSlice -> ready replica addresses, discovery configuration, the static source."""

from __future__ import annotations

import argparse

import pytest
from kubernetes import client as k8s

from services.shared import discovery
from services.shared.config import ConfigError
from services.shared.discovery import (
    StaticReplicas,
    TritonReplicaWatcher,
    create_replica_source,
    endpoint_is_ready,
    ready_addresses,
    slice_addresses,
)


def make_slice(endpoints, *, ports=(("grpc", 8001), ("http", 8000)), name="s", address_type="IPv4"):
    """endpoints: [(addresses or a single address, conditions kwargs or None)]."""
    return k8s.V1EndpointSlice(
        address_type=address_type,
        metadata=k8s.V1ObjectMeta(name=name),
        ports=[k8s.DiscoveryV1EndpointPort(name=n, port=p) for n, p in ports],
        endpoints=[
            k8s.V1Endpoint(
                addresses=[a] if isinstance(a, str) else list(a),
                conditions=None if c is None else k8s.V1EndpointConditions(**c),
            )
            for a, c in endpoints
        ],
    )


@pytest.mark.parametrize(
    "conditions, ready",
    [
        (None, True),  # no conditions: unknown, treated as ready
        ({}, True),  # ready unset: unknown, treated as ready
        ({"ready": True}, True),
        ({"ready": False}, False),
        ({"ready": False, "serving": True, "terminating": True}, False),
        ({"ready": True, "terminating": True}, False),  # publishNotReadyAddresses: never a draining pod
    ],
)
def test_endpoint_readiness(conditions, ready):
    assert endpoint_is_ready(None if conditions is None else k8s.V1EndpointConditions(**conditions)) is ready


def test_only_ready_endpoints_on_the_grpc_port():
    s = make_slice([("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": False}), ("10.0.0.3", None)])
    assert slice_addresses(s) == {"10.0.0.1:8001", "10.0.0.3:8001"}
    assert slice_addresses(s, port_name="http") == {"10.0.0.1:8000", "10.0.0.3:8000"}


def test_slice_without_the_named_port_gives_nothing():
    s = make_slice([("10.0.0.1", {"ready": True})], ports=[("http", 8000)])
    assert slice_addresses(s) == frozenset()


def test_empty_slice_and_unnamed_single_port():
    assert slice_addresses(k8s.V1EndpointSlice(address_type="IPv4", endpoints=None, ports=None)) == frozenset()
    unnamed = make_slice([("10.0.0.1", {"ready": True})], ports=[("", 9000)])
    assert slice_addresses(unnamed, port_name="") == {"10.0.0.1:9000"}


def test_ipv6_addresses_are_bracketed_and_only_the_first_address_counts():
    s = make_slice([(["fd00::1", "fd00::99"], {"ready": True})], address_type="IPv6")
    assert slice_addresses(s) == {"[fd00::1]:8001"}


def test_union_over_slices_deduplicates():
    a = make_slice([("10.0.0.1", {"ready": True}), ("10.0.0.2", {"ready": True})], name="a")
    b = make_slice([("10.0.0.2", {"ready": True}), ("10.0.0.3", {"ready": False})], name="b")
    assert ready_addresses([a, b]) == {"10.0.0.1:8001", "10.0.0.2:8001"}
    assert ready_addresses([]) == frozenset()


# -- configuration ---------------------------------------------------------------------------------
def parse(argv, monkeypatch, **env):
    for name in ("MAAS_TRITON_DISCOVERY", "MAAS_TRITON_SERVICE", "MAAS_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    discovery.add_discovery_arguments(parser)
    return parser.parse_args(argv)


def test_static_is_the_default(monkeypatch):
    cfg = discovery.discovery_config(parse([], monkeypatch), ["a:8001", "b:8001"])
    assert cfg.mode == "static" and cfg.static_addresses == ("a:8001", "b:8001")
    source = create_replica_source(cfg)
    assert isinstance(source, StaticReplicas) and source.addresses == {"a:8001", "b:8001"}


def test_endpointslices_from_env(monkeypatch):
    args = parse(
        [],
        monkeypatch,
        MAAS_TRITON_DISCOVERY="endpointslices",
        MAAS_TRITON_SERVICE="rel-maas-mesh-triton-headless",
        MAAS_NAMESPACE="models",
    )
    cfg = discovery.discovery_config(args)
    assert (cfg.mode, cfg.service, cfg.namespace) == ("endpointslices", "rel-maas-mesh-triton-headless", "models")
    source = create_replica_source(cfg, api_client=k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:1")))
    assert isinstance(source, TritonReplicaWatcher)


def test_flags_override_env(monkeypatch):
    args = parse(
        ["--triton-discovery", "endpointslices", "--triton-service", "t", "--namespace", "flag-ns"],
        monkeypatch,
        MAAS_TRITON_DISCOVERY="static",
        MAAS_NAMESPACE="env-ns",
    )
    assert discovery.discovery_config(args).namespace == "flag-ns"


def test_namespace_defaults_to_the_pods(monkeypatch, tmp_path):
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a\n")
    monkeypatch.setattr(discovery, "NAMESPACE_FILE", ns_file)
    args = parse(["--triton-discovery", "endpointslices", "--triton-service", "t"], monkeypatch)
    assert discovery.discovery_config(args).namespace == "team-a"


def test_missing_service_or_namespace_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(discovery, "NAMESPACE_FILE", tmp_path / "absent")
    with pytest.raises(ConfigError, match="MAAS_TRITON_SERVICE"):
        discovery.discovery_config(parse(["--triton-discovery", "endpointslices"], monkeypatch))
    with pytest.raises(ConfigError, match="MAAS_NAMESPACE"):
        discovery.discovery_config(
            parse(["--triton-discovery", "endpointslices", "--triton-service", "t"], monkeypatch)
        )


def test_unknown_mode_is_refused(monkeypatch):
    with pytest.raises(SystemExit):
        parse(["--triton-discovery", "dns"], monkeypatch)


async def test_static_source_reports_once():
    seen = []
    source = StaticReplicas(["a:1", "b:2"])
    await source.start(seen.append)  # plain (non-async) callbacks work too
    assert seen == [frozenset({"a:1", "b:2"})]
    assert await source.wait_synced() == {"a:1", "b:2"}
    await source.stop()
