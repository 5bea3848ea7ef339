"""Shadow report figures (services/router/postprocess.py, services/registry/shadow_report.py) against a
direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from services.registry.domain import ShadowResult, ShadowStats
from services.registry.shadow_report import COSINE_BOUNDS, ShadowReports, bucket, check_result
from services.registry.store import Store
from services.router.postprocess import cosines, top5_overlap_sum
from services.shared.errors import InvalidArgument


def test_top5_overlap_and_cosines_match_a_direct_computation():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(16, 20)), rng.normal(size=(16, 20))
    b[:4] = a[:4]  # a few identical rows
    direct = sum(len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b))
    assert top5_overlap_sum(a, b) == pytest.approx(direct)
    expected = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosines(a, b), expected, rtol=1e-6)
    assert top5_overlap_sum(a[:, :4], b[:, :4]) == 0.0


def test_buckets_and_report_aggregate_over_requests(tmp_path):
    assert [bucket(c) for c in (-1.0, 0.0, 0.95, 0.951, 1.0, 1.0000001)] == [0, 1, 5, 6, 11, 11]
    store = Store(tmp_path / "db")
    reports = ShadowReports(store.db)
    results = [
        ShadowResult("m", 1, 2, 2, 1, 1.5, 1.0, 2.0, 1.6, (0.6, 0.9), "r1"),
        ShadowResult("m", 1, 2, 1, 1, 0.99, 1.0, 2.0, 1.0, (0.99,), "r2"),
    ]
    with store.transaction() as tx:
        reports.add(tx, results, {("m", 1): "embedding"})
    stats = ShadowStats(
        1, 2, samples=2, top1_agreement=2 / 3, mean_cosine=2.49 / 3, primary_latency_ms=1, shadow_latency_ms=2
    )
    from services.registry.domain import PostprocessingKind

    r = reports.report("m", stats, PostprocessingKind.EMBEDDING, items=3)
    assert r.kind == "embedding" and r.agreement == pytest.approx(2.49 / 3)
    assert r.top5_agreement == pytest.approx(2.6 / 3)
    expected = np.bincount([bucket(c) for c in (0.6, 0.9, 0.99)], minlength=len(COSINE_BOUNDS)).tolist()
    assert r.cosine_counts == expected
    assert [(round(s, 2), rid) for s, rid, _ in r.worst] == [(0.6, "r1"), (0.99, "r2")]
    store.close()


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(top5_overlap_sum=3.0), "top5_overlap_sum"),
        (dict(cosines=(0.1, 0.2, 0.3)), "cosines"),
        (dict(cosines=(float("nan"),)), "cosine"),
        (dict(request_id="x" * 200), "request_id"),
    ],
)
def test_results_that_cannot_be_right_are_refused(kwargs, words):
    with pytest.raises(InvalidArgument, match=words):
        check_result(ShadowResult("m", 1, 2, 2, 1, 1.0, 1.0, 1.0, **kwargs))


def test_generation_token_comparison_and_its_report(tmp_path):
    from services.registry import metrics
    from services.registry.domain import PostprocessingKind
    from services.registry.shadow_report import PREFIX_BOUNDS
    from services.router.routing import VersionInfo
    from services.router.shadow import compare_tokens

    one, two = VersionInfo("g", 1), VersionInfo("g", 2)
    pairs = [([5, 6, 7, 8], [5, 6, 7, 8]), ([5, 6, 7, 8], [5, 6, 9]), ([1, 2], [3, 2]), ([], [])]
    got = [compare_tokens("g", one, two, np.array(a), np.array(b), 1.0, 2.0) for a, b in pairs]
    assert [(r.generated_tokens, r.prefix_tokens, r.top1_agreed) for r in got] == [
        (4, 4, 1),
        (4, 2, 0),
        (2, 0, 0),
        (0, 0, 1),
    ]
    assert [r.cosine_sum for r in got] == [1.0, 0.5, 0.0, 1.0] and all(r.items == 1 for r in got)
    assert [bucket(s, PREFIX_BOUNDS) for s in (0.0, 0.05, 0.5, 0.99, 1.0)] == [0, 1, 5, 11, 12]

    store = Store(tmp_path / "db")
    reports = ShadowReports(store.db)
    results = [
        ShadowResult("g", 1, 2, r.items, r.top1_agreed, r.cosine_sum, 1.0, 2.0, 0.0, tuple(r.cosines), f"r{i}", 0, 0)
        for i, r in enumerate(got)
    ]
    with store.transaction() as tx:
        reports.add(tx, results, {("g", 1): "generation"})
    stats = ShadowStats(
        1, 2, samples=4, top1_agreement=0.5, mean_cosine=0.625, primary_latency_ms=1, shadow_latency_ms=2
    )
    r = reports.report("g", stats, PostprocessingKind.GENERATION, 4)
    assert (r.kind, r.exact_agreement, r.prefix_agreement) == ("generation", 0.5, 0.625)
    assert r.cosine_bounds == PREFIX_BOUNDS and r.cosine_counts[0] == 1 and r.cosine_counts[5] == 1
    assert r.cosine_counts[-1] == 2 and [w[0] for w in r.worst][:2] == [0.0, 0.5]
    # The rollout gate's figure for a generation pair is the mean prefix agreement.
    assert metrics.agreement_value(PostprocessingKind.GENERATION, 0.5, 0.625) == 0.625
    with pytest.raises(InvalidArgument, match="prefix_tokens"):
        check_result(ShadowResult("g", 1, 2, 1, 0, 0.5, 1, 1, 0, (0.5,), "x", generated_tokens=2, prefix_tokens=3))
