"""One request = one trace, across real processes: router → tokenizer/vision → Triton.

A mesh of its own (tracing on, every component exporting to the session's OTLP receiver over HTTP,
Triton in its OpenTelemetry trace mode). Each request carries a `traceparent` made up by the test, so
the trace to look at is known and the router's server span must hang under that made-up parent.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from maas.cli.mesh import cat_photo
from maas.client import MeshClient, classify_request, embed_request, infer_request
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from maas.registry_client import RegistryClient, parse_target
from maas.v1 import router_pb2_grpc
from tests.fixtures.mesh import REPO, register_tiny

SERVER, CLIENT = 2, 3  # OTLP SpanKind
SPAN_WAIT = 40.0  # exporters batch: ours every 200 ms here, Triton's on its own schedule


@pytest.fixture(scope="module")
def traced_mesh(otlp_receiver, tmp_path_factory):
    subprocess.run([sys.executable, str(REPO / "tools" / "build_models.py")], check=True, cwd=REPO)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    if any(os.environ.get(k) for k in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER")):
        env.update(OTEL_SDK_DISABLED="false", OTEL_TRACES_EXPORTER="otlp", OTEL_TRACES_SAMPLER="parentbased_always_on")
    config = MeshConfig(
        state_dir=tmp_path_factory.mktemp("traced-mesh"),
        ports=FREE_PORTS,
        env=env,
        service_args={"router": ["--log-level", "DEBUG"]},
    )
    with LocalMesh(config) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def router(traced_mesh):
    with grpc.insecure_channel(traced_mesh.router_address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def traceparent() -> tuple[str, str, tuple[tuple[str, str]]]:
    """(trace id, parent span id, metadata): the test plays the caller's side of W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def wait_trace(receiver, trace_id: str, complete, mesh: LocalMesh | None = None) -> list:
    receiver.wait_for(lambda _: complete(receiver.trace(trace_id)), timeout=SPAN_WAIT)
    spans = receiver.trace(trace_id)
    if mesh is not None and not complete(spans):  # say what did arrive, so a missing span can be traced down
        with receiver.lock:
            triton = [(s.trace_id[:8], s.name, s.end_ns) for s in receiver.spans if s.service == "maas-triton"]
        raise AssertionError(
            f"trace {trace_id} incomplete after {SPAN_WAIT} s: {[(s.service, s.name) for s in spans]}; "
            f"receiver errors {receiver.errors}; last Triton spans received {triton[-8:]}; "
            f"Triton log:\n{mesh.log_tail('triton', 15)}"
        )
    return spans


def matching(spans, service: str, kind: int | None = None, name_ends: str = "", name: str = "") -> list:
    return [
        s
        for s in spans
        if s.service == service
        and (kind is None or s.kind == kind)
        and s.name.endswith(name_ends)
        and (not name or s.name == name)
    ]


def one(spans, service: str, kind: int | None = None, name_ends: str = "", name: str = ""):
    found = matching(spans, service, kind, name_ends, name)
    assert len(found) == 1, (service, kind, name_ends or name, [(s.service, s.name) for s in spans])
    return found[0]


def request_trace_arrived(spans, pre_service: str, pre_method: str) -> bool:
    """Every span check_request_trace looks at is in: each process exports its spans in its own batches,
    so a span that ends last (the caller's) may come a batch after the rest."""
    triton = matching(spans, "maas-triton", name="InferRequest")
    return bool(
        matching(spans, "maas-router", SERVER)
        and matching(spans, "maas-router", CLIENT, name_ends=pre_method)
        and matching(spans, "maas-router", CLIENT, name_ends="/ModelInfer")
        and matching(spans, pre_service, SERVER, name_ends=pre_method)
        and triton
        and any(s.parent_span_id == triton[0].span_id for s in spans if s.service == "maas-triton")
    )


def check_request_trace(spans, caller_span: str, pre_service: str, pre_method: str) -> dict:
    """The shape every Embed/Classify trace has; returns the named spans for attribute checks."""
    assert {s.service for s in spans} == {"maas-router", pre_service, "maas-triton"}, spans
    ids = {s.span_id for s in spans}
    for s in spans:  # every span's parent is in this trace, but the root's: the caller's (made-up) span
        assert s.parent_span_id in ids or (s.service == "maas-router" and s.parent_span_id == caller_span), s
    server = one(spans, "maas-router", SERVER)
    assert server.parent_span_id == caller_span
    to_pre = one(spans, "maas-router", CLIENT, name_ends=pre_method)
    to_triton = one(spans, "maas-router", CLIENT, name_ends="/ModelInfer")
    pre = one(spans, pre_service, SERVER, name_ends=pre_method)
    triton = one(spans, "maas-triton", name="InferRequest")
    assert to_pre.parent_span_id == server.span_id and to_triton.parent_span_id == server.span_id
    assert pre.parent_span_id == to_pre.span_id  # W3C context went router → preprocessing service
    assert triton.parent_span_id == to_triton.span_id  # ... and router → Triton
    assert [s for s in spans if s.service == "maas-triton" and s.parent_span_id == triton.span_id], (
        "Triton's model span under InferRequest"
    )
    # Children run inside the caller's span, in order: preprocessing, then Triton.
    assert (
        server.start_ns <= to_pre.start_ns <= to_pre.end_ns <= to_triton.start_ns <= to_triton.end_ns <= server.end_ns
    )
    for span in (server, to_pre, to_triton, pre):  # RPC semantic conventions from the instrumentation
        assert span.attributes["rpc.system"] == "grpc"
    assert (server.attributes["rpc.service"], to_triton.attributes["rpc.service"]) == (
        "maas.v1.Router",
        "inference.GRPCInferenceService",
    )
    return {"server": server, "pre": pre}


def test_embed_is_one_trace_router_tokenizer_triton(traced_mesh, router, otlp_receiver):
    trace_id, caller, metadata = traceparent()
    texts = ["A cat sits on the warm windowsill.", "word " * 2000]  # the second is truncated
    response = router.Embed(embed_request(texts, "minilm", None, None, None), metadata=metadata, timeout=60)
    assert list(response.truncated) == [False, True]

    spans = wait_trace(
        otlp_receiver,
        trace_id,
        lambda s: request_trace_arrived(s, "maas-tokenizer", "/Tokenize"),
        traced_mesh,
    )
    named = check_request_trace(spans, caller, "maas-tokenizer", "/Tokenize")
    server, pre = named["server"].attributes, named["pre"].attributes
    assert server["rpc.method"] == "Embed"
    assert (
        server["maas.model"],
        server["maas.version"],
        server["maas.route"],
        server["maas.route_target"],
        server["maas.shadow"],
    ) == ("minilm", response.routed.version, "default", "production", False)
    assert (server["maas.batch_size"], server["maas.items"], server["maas.truncated"]) == (2, 2, 1)
    assert server["maas.preprocess_ms"] > 0
    assert (pre["maas.items"], pre["maas.truncated"]) == (2, 1)
    assert pre["maas.bytes"] > 10_000 and pre["maas.preprocess_ms"] > 0 and pre["maas.model"]

    # The router's log line for this request names the trace and the server span.
    log = traced_mesh.log_dir / "router.log"
    deadline = time.monotonic() + 10
    while not (
        lines := [
            json.loads(line) for line in log.read_text().splitlines() if trace_id in line and line.startswith("{")
        ]
    ):
        assert time.monotonic() < deadline, "no router log line carries the trace id"
        time.sleep(0.2)
    assert any(line["span_id"] == named["server"].span_id and line["msg"] == "routed" for line in lines), lines


def test_classify_is_one_trace_router_vision_triton(traced_mesh, router, otlp_receiver):
    trace_id, caller, metadata = traceparent()
    photo = cat_photo()
    response = router.Classify(
        classify_request([photo], "efficientnet_lite0", 3, None, None, None), metadata=metadata, timeout=60
    )
    assert len(response.results) == 1

    spans = wait_trace(
        otlp_receiver,
        trace_id,
        lambda s: request_trace_arrived(s, "maas-vision", "/Preprocess"),
        traced_mesh,
    )
    named = check_request_trace(spans, caller, "maas-vision", "/Preprocess")
    server, pre = named["server"].attributes, named["pre"].attributes
    assert server["rpc.method"] == "Classify"
    assert (server["maas.model"], server["maas.version"], server["maas.route"]) == (
        "efficientnet_lite0",
        response.routed.version,
        "default",
    )
    assert (server["maas.batch_size"], server["maas.items"], server["maas.bytes"]) == (1, 1, len(photo))
    assert server["maas.preprocess_ms"] > 0
    assert (pre["maas.items"], pre["maas.model"]) == (1, "efficientnet_lite0")
    assert pre["maas.bytes"] >= len(photo) and pre["maas.preprocess_ms"] > 0


def test_shadow_copy_is_a_linked_span_in_its_own_trace(traced_mesh, router, otlp_receiver, tmp_path):
    with RegistryClient(traced_mesh.registry_address, timeout=30) as registry:
        v1 = register_tiny(registry, "traced_tiny", tmp_path, scale=1.0)
        v2 = register_tiny(registry, "traced_tiny", tmp_path, scale=3.0)
        registry.set_alias("traced_tiny", "production", v1)
        registry.set_traffic("traced_tiny", [], shadow=parse_target(str(v2)), shadow_fraction=1.0)
    x = {"x": np.ones((2, 4), np.float32)}
    with MeshClient(traced_mesh.router_address) as client:
        deadline = time.monotonic() + 20
        while not client.infer("traced_tiny", x).routed.shadowed:
            assert time.monotonic() < deadline, "the shadow policy never reached the router"
            time.sleep(0.05)

    trace_id, _, metadata = traceparent()
    response = router.Infer(
        infer_request("traced_tiny", x, None, None, [], None, None, None), metadata=metadata, timeout=30
    )
    assert response.routed.shadowed and response.routed.version == v1
    # Each process exports on its own schedule: wait for the router's span, not just any of the trace.
    caller = one(
        wait_trace(
            otlp_receiver, trace_id, lambda spans: any(s.service == "maas-router" and s.kind == SERVER for s in spans)
        ),
        "maas-router",
        SERVER,
    )
    assert caller.attributes["maas.shadow"] is True and caller.attributes["maas.shadow_version"] == v2

    spans = otlp_receiver.wait_for(
        lambda all_spans: any(caller.span_id in s.links for s in all_spans), timeout=SPAN_WAIT
    )
    shadow = next(s for s in spans if caller.span_id in s.links)
    assert shadow.name == "router.shadow" and shadow.service == "maas-router"
    assert not shadow.status, f"the shadow call failed: {shadow.status}"
    assert shadow.trace_id != trace_id and not shadow.parent_span_id  # a new root, not the caller's child
    assert (
        shadow.attributes["maas.model"],
        shadow.attributes["maas.version"],
        shadow.attributes["maas.primary_version"],
    ) == ("traced_tiny", v2, v1)
    # The caller's trace holds no span of the shadow call.
    assert not [s for s in otlp_receiver.trace(trace_id) if s.name == "router.shadow"]
    shadow_calls = otlp_receiver.wait_for(
        lambda all_spans: any(s.trace_id == shadow.trace_id and s.service == "maas-triton" for s in all_spans),
        timeout=SPAN_WAIT,
    )
    assert any(s.trace_id == shadow.trace_id and s.service == "maas-triton" for s in shadow_calls), (
        [(s.service, s.name) for s in shadow_calls if s.trace_id == shadow.trace_id],
        otlp_receiver.errors,
        traced_mesh.log_tail("triton", 20),
    )


def test_openai_http_request_is_one_trace_gateway_router_triton(traced_mesh, otlp_receiver):
    import urllib.request

    trace_id, caller, metadata = traceparent()
    request = urllib.request.Request(
        f"{traced_mesh.openai_url}/embeddings",
        data=json.dumps({"model": "minilm", "input": ["a traced sentence"]}).encode(),
        headers={"Content-Type": "application/json", **dict(metadata)},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    spans = wait_trace(
        otlp_receiver,
        trace_id,
        lambda s: (
            request_trace_arrived(s, "maas-tokenizer", "/Tokenize")
            and matching(s, "maas-openai", SERVER, name="POST /v1/embeddings")
            and matching(s, "maas-openai", CLIENT, name_ends="/Embed")
        ),
        traced_mesh,
    )
    http_span = one(spans, "maas-openai", SERVER, name="POST /v1/embeddings")  # one server span per request
    assert http_span.parent_span_id == caller  # the HTTP caller's traceparent
    assert (http_span.attributes["http.route"], http_span.attributes["http.response.status_code"]) == (
        "/v1/embeddings",
        200,
    )
    to_router = one(spans, "maas-openai", CLIENT, name_ends="/Embed")
    router_server = one(spans, "maas-router", SERVER)
    assert to_router.parent_span_id == http_span.span_id and router_server.parent_span_id == to_router.span_id
    assert http_span.start_ns <= to_router.start_ns <= to_router.end_ns <= http_span.end_ns
