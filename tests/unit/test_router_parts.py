"""Post-processing, shadow comparison, registry → routing conversion and configuration of the router."""

from __future__ import annotations

import numpy as np
import pytest

from maas.v1 import registry_pb2 as R
from services.router.config import load_config
from services.router.postprocess import as_matrix, cosine_sum, l2_normalise, softmax, top1_agreed, top_k
from services.router.routing import PostKind, PreKind, VersionInfo, ServingState
from services.router.shadow import compare
from services.router.watcher import routes_from_proto
from services.shared.config import ConfigError
from services.shared.errors import FailedPrecondition


def test_softmax_top_k_with_labels_best_first():
    logits = np.array([[1.0, 3.0, 2.0, -1.0], [0.5, 0.0, 0.1, 5.0]], np.float32)
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    result = top_k(p, 2, ("a", "b", "c"))
    assert [(c.index, c.label) for c in result[0]] == [(1, "b"), (2, "c")]
    assert [(c.index, c.label) for c in result[1]] == [(3, ""), (0, "a")]  # no label for index 3
    assert len(top_k(p, 99, ())[0]) == 4
    assert softmax(np.array([[1000.0, 0.0]], np.float32))[0, 0] == pytest.approx(1.0)  # no overflow


def test_embedding_helpers():
    v = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalise(v), [[0.6, 0.8], [0.0, 0.0]])
    assert cosine_sum(v[:1], -v[:1]) == pytest.approx(-1.0)
    assert cosine_sum(v, v[:1]) == 0.0 and top1_agreed(v, v[:1]) == 0  # shapes differ: nothing comparable
    with pytest.raises(FailedPrecondition, match=r"\[batch, n\]"):
        as_matrix(np.zeros((2, 3, 4)), "model 'x'")


def test_shadow_comparison_record():
    info = VersionInfo("m", 1)
    a = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    b = np.array([[0.2, 0.7], [0.1, 0.9]], np.float32)
    result = compare("m", info, VersionInfo("m", 2), a, b, 1.5, 2.5)
    assert (result.items, result.top1_agreed, result.primary_version, result.shadow_version) == (2, 1, 1, 2)
    assert -2 <= result.cosine_sum <= 2 and result.shadow_latency_ms == 2.5


def test_routing_view_from_the_registry_messages():
    version = R.ModelVersion(
        model="m",
        version=2,
        state=R.VERSION_STATE_LOADING,
        state_reason="warming up",
        signature=R.Signature(
            inputs=[R.TensorSpec(name="x", datatype="FP32", shape=[-1])],
            outputs=[R.TensorSpec(name="y", datatype="FP32", shape=[10])],
        ),
        preprocessing=R.Preprocessing(kind=R.Preprocessing.KIND_VISION, name="spec"),
        postprocessing=R.Postprocessing(kind=R.Postprocessing.KIND_SOFTMAX_TOP_K, top_k=3),
        labels=["a"],
    )
    policy = R.TrafficPolicy(
        split=[R.TrafficTarget(alias="production", weight=9), R.TrafficTarget(version=2, weight=1)],
        shadow=R.ShadowPolicy(target=R.TrafficTarget(version=2), fraction=0.5),
    )
    routes = routes_from_proto(R.ModelRouting(model="m", versions=[version], aliases={"production": 1}, policy=policy))
    info = routes.versions[2]
    assert (info.state, info.pre_kind, info.post_kind, info.output_name, info.top_k) == (
        ServingState.LOADING,
        PreKind.VISION,
        PostKind.SOFTMAX_TOP_K,
        "y",
        3,
    )
    assert [(t.alias, t.version, t.weight) for t in routes.split] == [("production", 0, 9), ("", 2, 1)]
    assert routes.shadow.fraction == 0.5 and routes.shadow.target.version == 2
    assert routes_from_proto(R.ModelRouting(model="m")).shadow is None


def test_config_defaults_flags_and_env(monkeypatch):
    cfg = load_config([])
    assert (cfg.server.listen, cfg.registry, cfg.tokenizer, cfg.vision, cfg.triton) == (
        "127.0.0.1:50051",
        "127.0.0.1:50052",
        "127.0.0.1:50053",
        "127.0.0.1:50054",
        "127.0.0.1:8001",
    )
    monkeypatch.setenv("MAAS_TRITON_ADDRESS", "triton:9001")
    monkeypatch.setenv("MAAS_SHADOW_MAX_INFLIGHT", "5")
    cfg = load_config(["--registry", "reg:1"])
    assert (cfg.triton, cfg.registry, cfg.shadow_max_inflight) == ("triton:9001", "reg:1", 5)
    with pytest.raises(ConfigError, match="--vision"):
        load_config(["--vision", "no-port"])
    with pytest.raises(ConfigError, match="--default-timeout"):
        load_config(["--default-timeout", "0"])


def test_shedding_thresholds_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("MAAS_ROUTER_SHED_SHEDDABLE_QUEUE_MS", "2.5")
    monkeypatch.setenv("MAAS_ROUTER_SHED_STANDARD_QUEUE_MS", "10")
    adm = load_config(["--queue-sample-interval", "0.1"]).admission
    assert (adm.shed_sheddable_queue_ms, adm.shed_standard_queue_ms, adm.queue_sample_interval) == (2.5, 10.0, 0.1)
    assert (
        adm.sheds_on_queue_time
        and not load_config(
            ["--shed-sheddable-queue-ms", "0", "--shed-standard-queue-ms", "0"]
        ).admission.sheds_on_queue_time
    )
    with pytest.raises(ConfigError, match="--shed-sheddable-queue-ms must be >= 0"):
        load_config(["--shed-sheddable-queue-ms", "-1"])
    with pytest.raises(ConfigError, match="--queue-sample-interval must be positive"):
        load_config(["--queue-sample-interval", "0"])
    # Sheddable calls are refused first: a standard threshold needs a sheddable one at or below it.
    with pytest.raises(ConfigError, match=r"--shed-standard-queue-ms 10 needs --shed-sheddable-queue-ms .*\(got 20\)"):
        load_config(["--shed-sheddable-queue-ms", "20"])
    monkeypatch.delenv("MAAS_ROUTER_SHED_SHEDDABLE_QUEUE_MS")
    with pytest.raises(ConfigError, match="needs --shed-sheddable-queue-ms"):
        load_config([])
    with pytest.raises(ConfigError, match="--shed-standard-inflight 4 needs --shed-sheddable-inflight"):
        load_config(["--shed-standard-queue-ms", "0", "--shed-standard-inflight", "4"])


async def test_shadow_runs_in_a_new_trace_linked_to_the_callers_span():
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.router.shadow import ShadowRunner

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    runner = ShadowRunner(None, max_inflight=1, tracer=tracer)
    release = asyncio.Event()
    a = np.ones((1, 2), np.float32)

    async def primary():
        return a

    async def slow_shadow():
        await release.wait()
        return a

    with tracer.start_as_current_span("caller") as caller:
        assert runner.submit(VersionInfo("m", 1), VersionInfo("m", 2), primary, slow_shadow, 1.0)
        assert not runner.submit(VersionInfo("m", 1), VersionInfo("m", 2), primary, slow_shadow, 1.0)  # saturated
    release.set()
    await runner.stop()
    shadow = next(s for s in exporter.get_finished_spans() if s.name == "router.shadow")
    assert shadow.parent is None  # a new root: never lengthens the caller's trace
    assert shadow.context.trace_id != caller.get_span_context().trace_id
    assert [link.context.span_id for link in shadow.links] == [caller.get_span_context().span_id]
    assert runner._pending and runner._pending[0].items == 1  # compared (no registry here to report to)
