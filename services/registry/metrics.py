"""Prometheus metrics of the registry (names referenced by the chart and the dashboard)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge

from services.registry.domain import PostprocessingKind, ShadowResult, Version, VersionState

VERSIONS = Gauge("maas_registry_versions", "Model versions by state", ["model", "state"])
SHADOW_AGREEMENT = Gauge(
    "maas_registry_shadow_agreement",
    "Shadow vs primary agreement: top-1 agreement for classifiers, mean cosine for embeddings",
    ["model", "primary", "shadow"],
)
SHADOW_SAMPLES = Counter(
    "maas_registry_shadow_samples", "Shadow comparisons reported by the router", ["model", "primary", "shadow"]
)
WATCHERS = Gauge("maas_registry_watchers", "Open Watch streams")
TENANT_WATCHERS = Gauge(
    "maas_registry_tenant_watchers", "Open WatchTenants streams: the routers each quota is divided by"
)
TENANTS = Gauge("maas_registry_tenants", "Tenants by state", ["state"])


def record_versions(versions: list[Version]) -> None:
    counts = Tally((v.model, v.state) for v in versions)
    models = {v.model for v in versions}
    for model in models:
        for state in VersionState:
            VERSIONS.labels(model, state.value).set(counts.get((model, state), 0))


def record_shadow(results: list[ShadowResult], agreement: dict[tuple[str, int, int], float]) -> None:
    for r in results:
        SHADOW_SAMPLES.labels(r.model, str(r.primary_version), str(r.shadow_version)).inc()
    for (model, primary, shadow), value in agreement.items():
        SHADOW_AGREEMENT.labels(model, str(primary), str(shadow)).set(value)


def agreement_value(kind: PostprocessingKind, top1: float, cosine: float) -> float:
    """Embeddings: mean cosine; generation: mean prefix agreement (kept in the cosine sum, shadow_report.py);
    otherwise top-1 agreement."""
    return cosine if kind in (PostprocessingKind.EMBEDDING, PostprocessingKind.GENERATION) else top1


# -- rollouts (rollout.py) --
ROLLOUTS = Counter(
    "maas_registry_rollouts",
    "Rollouts started and how they ended (promoted, rolled_back, aborted)",
    ["model", "outcome"],
)
ROLLOUT_ANALYSES = Counter(
    "maas_registry_rollout_analyses", "Rollout analyses by outcome (passed, failed, waiting)", ["model", "outcome"]
)
ROLLOUT_WEIGHT = Gauge(
    "maas_registry_rollout_weight", "Canary weight of the model's running rollout (0: none)", ["model"]
)
