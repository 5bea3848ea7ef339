"""Every metric the chart (Grafana dashboard, prometheus-adapter rules, HPA/KEDA queries) names is one
that a real component exposes after traffic."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from maas.cli.mesh import cat_photo
from maas.client import MeshClient, MeshError
from maas.registry_client import RegistryClient

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "maas-mesh"
METRIC = re.compile(r"\b(?:maas|nv)_[a-z0-9_]+\b")


def expressions(node):
    """Every string in a JSON/YAML tree (PromQL lives in expr/query/seriesQuery/metricsQuery/kedaQuery)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from expressions(value)
    elif isinstance(node, str):
        yield node


def chart_metric_names() -> dict[str, set[str]]:
    adapter = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())
    derived = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}  # served by the adapter, not scraped
    sources = {
        "dashboard": json.loads((CHART / "files" / "dashboards" / "maas-mesh.json").read_text()),
        "adapter rules": adapter,
        "values": yaml.safe_load((CHART / "values.yaml").read_text()),
        **{f"ci/{p.name}": yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*.yaml"))},
    }
    found = {
        where: {name for text in expressions(tree) for name in METRIC.findall(text)} - derived
        for where, tree in sources.items()
    }
    found["templates"] = {name for p in (CHART / "templates").glob("*") for name in METRIC.findall(p.read_text())}
    return found


def scrape(address: str) -> set[str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exposed(mesh) -> dict[str, set[str]]:
    with MeshClient(mesh.router_address, timeout=60) as client:
        client.embed(["metrics please", "word " * 2000], "minilm")
        client.classify([cat_photo()], "efficientnet_lite0")
        with pytest.raises(MeshError):
            client.classify([b"not an image"], "efficientnet_lite0")  # an item error
    # A unary call of the registry's own: its Watch stream is only counted when it ends, and earlier tests
    # may have restarted the registry (a fresh process has counted nothing yet).
    with RegistryClient(mesh.registry_address) as registry:
        registry.list_models()
    request = urllib.request.Request(
        f"{mesh.openai_url}/embeddings",
        data=json.dumps({"input": "x"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # the OpenAI gateway's own metrics
        assert response.status == 200
    return {component: scrape(address) for component, address in mesh.metrics_addresses.items()}


def test_every_component_serves_metrics(mesh, exposed):
    assert set(exposed) == {"router", "registry", "tokenizer", "vision", "openai", "console", "triton"}
    for component in ("router", "registry", "tokenizer", "vision"):
        assert "maas_rpc_server_requests_total" in exposed[component], component
        assert "maas_rpc_server_duration_seconds_bucket" in exposed[component], component
        assert "maas_rpc_server_inflight_requests" in exposed[component], component
    assert {"maas_router_inflight_requests", "maas_router_requests_total"} <= exposed["router"]
    for component in ("tokenizer", "vision"):
        assert {"maas_preprocess_seconds_bucket", "maas_batch_items_bucket"} <= exposed[component], component
    assert "maas_item_errors_total" in exposed["vision"]
    assert "maas_registry_versions" in exposed["registry"]
    assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= exposed["triton"]
    assert {
        "maas_http_requests_total",
        "maas_http_request_duration_seconds_bucket",
        "maas_http_inflight_requests",
        "maas_openai_inflight_streams",
    } <= exposed["openai"]
    assert "maas_console_event_streams" in exposed["console"]


def auth_only_metrics() -> set[str]:
    """The per-tenant counters: a router with auth off (this mesh) has no tenant to label them with, so
    they are checked as defined by the router's admission instead (tests/integration/test_tenants.py
    reads their values after a quota run)."""
    from services.router.admission import TENANT_COST, TENANT_REFUSALS, TENANT_REQUESTS

    return {f"{family.name}_total" for c in (TENANT_REQUESTS, TENANT_COST, TENANT_REFUSALS) for family in c.describe()}


def test_every_metric_the_chart_references_is_exposed(exposed):
    everything = set().union(*exposed.values()) | auth_only_metrics()
    referenced = chart_metric_names()
    assert referenced["dashboard"] and referenced["adapter rules"] and referenced["values"]
    missing = {where: sorted(names - everything) for where, names in referenced.items() if names - everything}
    assert not missing, missing


def test_adapter_derived_metrics_come_from_exposed_series(exposed):
    adapter = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())
    everything = set().union(*exposed.values())
    for rule in adapter["rules"]["custom"]:
        series = METRIC.findall(rule["seriesQuery"])
        assert series and set(series) <= everything, rule["seriesQuery"]
        assert set(METRIC.findall(rule["metricsQuery"])) <= everything, rule["metricsQuery"]
