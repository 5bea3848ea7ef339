"""The console's pieces without processes: metrics text -> rates and quantiles (the real prometheus_client
exposition of real metric objects), the split bar, form parsing, config limits."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from maas.v1 import registry_pb2 as pb
from services.console.app import environment
from services.console.charts import agreement_histogram, line_chart, split_bar
from services.console.config import load_config
from services.console.metrics import History, parse, quantile
from services.console.models import model_view, split_segments
from services.console.mesh import Refused
from services.console.operations import parse_fraction, parse_split, parse_version


def _exposition():
    registry = CollectorRegistry()
    requests = Counter(
        "maas_rpc_server_requests", "r", ["service", "method", "model", "version", "code"], registry=registry
    )
    duration = Histogram(
        "maas_rpc_server_duration_seconds", "d", ["service", "method"], buckets=(0.01, 0.1, 1.0), registry=registry
    )
    return registry, requests, duration


def test_rates_errors_and_quantiles_from_two_reads():
    registry, requests, duration = _exposition()
    requests.labels("router", "Embed", "minilm", "1", "OK").inc(10)
    requests.labels("tokenizer", "Tokenize", "minilm", "", "OK").inc(99)  # not the router's: ignored
    first = parse(generate_latest(registry).decode(), at=100.0)
    requests.labels("router", "Embed", "minilm", "1", "OK").inc(20)
    requests.labels("router", "Embed", "minilm", "1", "INVALID_ARGUMENT").inc(4)
    requests.labels("router", "Embed", "minilm", "2", "OK").inc(2)  # a new version between the reads
    for _ in range(90):
        duration.labels("router", "Embed").observe(0.005)
    for _ in range(10):
        duration.labels("router", "Embed").observe(0.5)
    second = parse(generate_latest(registry).decode(), at=102.0)
    history = History(keep=600)
    history.add(first)
    history.add(second)
    rate, errors, p50, p99 = history.charts(now=102.0)
    assert rate.lines["minilm v1"] == [(0.0, 12.0)]  # (20 + 4) / 2 s
    assert rate.lines["minilm v2"] == [(0.0, 1.0)]
    assert errors.lines["minilm v1"] == [(0.0, 2.0)]
    assert set(rate.lines) == {"minilm v1", "minilm v2"}
    assert p50.lines["Embed"][0][1] == pytest.approx(0.01 * 50 / 90 * 1000)  # inside the first bucket
    assert 100 < p99.lines["Embed"][0][1] <= 1000  # in the (0.1, 1] bucket


def test_latency_is_per_version_once_the_router_exports_it():
    registry, requests, duration = _exposition()
    by_version = Histogram(
        "maas_router_version_duration_seconds", "v", ["model", "version"], buckets=(0.01, 0.1, 1.0), registry=registry
    )
    first = parse(generate_latest(registry).decode(), at=0.0)
    for _ in range(10):
        by_version.labels("minilm", "1").observe(0.005)  # the fast version
        by_version.labels("minilm", "2").observe(0.5)  # the slow canary
        duration.labels("router", "Embed").observe(0.005)
    history = History(keep=600)
    history.add(first)
    history.add(parse(generate_latest(registry).decode(), at=1.0))
    _, _, p50, p99 = history.charts(now=1.0)
    assert p50.title == "p50 latency, per version" and set(p99.lines) == {"minilm v1", "minilm v2"}
    assert p99.lines["minilm v1"][0][1] <= 10 < 100 < p99.lines["minilm v2"][0][1] <= 1000


def test_agreement_histogram_is_labelled_svg_with_a_bar_per_bucket():
    svg = agreement_histogram([0.5, 0.9, 0.99, 1.0], [1, 0, 3, 16], "minilm", "v1 vs v2")
    assert svg.startswith("<svg") and svg.count("<rect") == 4 and 'role="img"' in svg
    assert "cosine agreement of minilm v1 vs v2" in svg and "&lt;= 1: 16 items (80%)" in svg


def test_a_counter_that_went_down_is_a_restart():
    registry, requests, _ = _exposition()
    requests.labels("router", "Embed", "minilm", "1", "OK").inc(50)
    history = History(keep=600)
    history.add(parse(generate_latest(registry).decode(), at=0.0))
    fresh, again, _ = _exposition()
    again.labels("router", "Embed", "minilm", "1", "OK").inc(3)
    history.add(parse(generate_latest(fresh).decode(), at=1.0))
    assert history.charts(now=1.0)[0].lines["minilm v1"] == [(0.0, 3.0)]


def test_history_keeps_only_its_window():
    history = History(keep=10)
    for t in range(0, 30, 2):
        history.add(parse("", at=float(t)))
    assert history.samples[0].at == 18.0 and len(history.samples) == 6


def test_quantile_like_histogram_quantile():
    rows = [(0.1, 0.0), (0.2, 10.0), (float("inf"), 10.0)]
    assert quantile(0.5, rows) == pytest.approx(0.15)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # beyond the last finite bound


def _model():
    model = pb.Model(
        name="minilm",
        versions=[
            pb.ModelVersion(
                version=1,
                state=pb.VERSION_STATE_READY,
                postprocessing=pb.Postprocessing(kind=pb.Postprocessing.KIND_EMBEDDING),
            ),
            pb.ModelVersion(version=2, state=pb.VERSION_STATE_READY),
        ],
    )
    model.aliases.add(name="production", version=1)
    model.aliases.add(name="canary", version=2)
    return model


def test_split_segments_resolve_aliases_and_default_to_production():
    model = _model()
    assert [(s["label"], s["version"], s["percent"]) for s in split_segments(model)] == [("production", 1, 100.0)]
    model.policy.split.add(alias="production", weight=90)
    model.policy.split.add(version=2, weight=10)
    assert [(s["label"], s["version"], s["percent"]) for s in split_segments(model)] == [
        ("production", 1, 90.0),
        ("v2", 2, 10.0),
    ]
    svg = split_bar(split_segments(model), "minilm")
    assert 'role="img"' in svg and "production (v1) 90%" in svg and svg.count("<rect") == 2


def test_model_view_kind_and_shadow():
    model = _model()
    model.policy.shadow.target.version = 2
    model.policy.shadow.fraction = 0.25
    view = model_view(model)
    assert view["kind"] == "tensor"  # the newest READY version (v2) has no postprocessing
    assert view["shadow"] == {"target": "v2", "version": 2, "percent": 25.0}


def _shadowed(kind: int) -> pb.Model:
    model = pb.Model(
        name="m",
        versions=[
            pb.ModelVersion(version=v, state=pb.VERSION_STATE_READY, postprocessing=pb.Postprocessing(kind=kind))
            for v in (1, 2)
        ],
    )
    model.shadow_stats.add(primary_version=1, shadow_version=2, samples=6, top1_agreement=0.5, mean_cosine=0.75)
    return model


@pytest.mark.parametrize(
    "kind, columns",
    [
        (pb.Postprocessing.KIND_GENERATION, ("exact-token agree", "prefix agree")),
        (pb.Postprocessing.KIND_SOFTMAX_TOP_K, ("top-1 agree", "mean cosine")),
        (pb.Postprocessing.KIND_EMBEDDING, ("top-1 agree", "mean cosine")),
    ],
)
def test_shadow_figures_are_labelled_by_the_pair_kind(kind, columns):
    """A generation pair's two figures are exact-token and prefix agreement (the registry keeps them in
    the top-1 and cosine fields), not top-1 / mean cosine; the rendered card says so."""
    view = model_view(_shadowed(kind))
    assert view["agreement_columns"] == columns
    card = environment().get_template("_model_card.html").render(m=view)
    headers = [f'<th scope="col">{c}</th>' for c in columns]
    assert all(h in card for h in headers) and "<td>50.0%</td><td>0.75</td>" in card
    others = {"exact-token agree", "prefix agree", "top-1 agree", "mean cosine"} - set(columns)
    assert not any(f'<th scope="col">{c}</th>' in card for c in others)


def test_line_chart_is_labelled_svg():
    history = History(keep=600)
    history.add(parse("", at=0.0))
    svg = line_chart(history.charts(now=0.0)[0], 600, "c0")
    assert svg.startswith("<svg") and 'aria-labelledby="c0-t"' in svg and "<title" in svg


def test_operation_forms_name_the_field():
    assert [(t.alias, t.version, t.weight) for t in parse_split("production=90, v2=10")] == [
        ("production", 0, 90),
        ("", 2, 10),
    ]
    assert parse_split("") == []
    for bad, call in (
        ("production", parse_split),
        ("x", parse_version),
        ("0", parse_version),
        ("150", parse_fraction),
        ("nan", parse_fraction),
    ):
        with pytest.raises(Refused) as caught:
            call(bad)
        assert caught.value.status == 400 and caught.value.field in ("split", "version", "fraction")


def test_config_limits_and_urls():
    config = load_config(["--router-metrics", "http://127.0.0.1:9/metrics", "--max-texts", "4"])
    assert config.limits.max_texts == 4 and config.port == 8091
    with pytest.raises(SystemExit):
        load_config(["--router-metrics", "127.0.0.1:9"])
    with pytest.raises(SystemExit):
        load_config(["--max-upload-bytes", "0"])
