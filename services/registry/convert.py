"""protobuf ⇄ domain conversions for the registry servicer."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from maas.v1 import registry_pb2 as pb
from services.registry import domain as d
from services.shared.errors import InvalidArgument

_FORMATS = {
    pb.ARTIFACT_FORMAT_ONNX: d.ArtifactFormat.ONNX,
    pb.ARTIFACT_FORMAT_TORCHSCRIPT: d.ArtifactFormat.TORCHSCRIPT,
    pb.ARTIFACT_FORMAT_TRITON_FOLDER: d.ArtifactFormat.TRITON_FOLDER,
    pb.ARTIFACT_FORMAT_ORT_GENAI: d.ArtifactFormat.ORT_GENAI,
}
_FORMATS_PB = {v: k for k, v in _FORMATS.items()}
_STATES_PB = {s: pb.VersionState.Value(f"VERSION_STATE_{s.name}") for s in d.VersionState}
_PRE = {
    pb.Preprocessing.KIND_UNSPECIFIED: d.PreprocessingKind.NONE,
    pb.Preprocessing.KIND_NONE: d.PreprocessingKind.NONE,
    pb.Preprocessing.KIND_TOKENIZER: d.PreprocessingKind.TOKENIZER,
    pb.Preprocessing.KIND_VISION: d.PreprocessingKind.VISION,
}
_PRE_PB = {kind: value for value, kind in _PRE.items() if value != pb.Preprocessing.KIND_UNSPECIFIED}
_POST = {
    pb.Postprocessing.KIND_UNSPECIFIED: d.PostprocessingKind.NONE,
    pb.Postprocessing.KIND_NONE: d.PostprocessingKind.NONE,
    pb.Postprocessing.KIND_EMBEDDING: d.PostprocessingKind.EMBEDDING,
    pb.Postprocessing.KIND_SOFTMAX_TOP_K: d.PostprocessingKind.SOFTMAX_TOP_K,
    pb.Postprocessing.KIND_GENERATION: d.PostprocessingKind.GENERATION,
}
_POST_PB = {kind: value for value, kind in _POST.items() if value != pb.Postprocessing.KIND_UNSPECIFIED}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# -- in ---------------------------------------------------------------------------------------------


def signature_in(sig: pb.Signature) -> d.Signature:
    spec = lambda t: d.TensorSpec(t.name, t.datatype, tuple(t.shape))
    return d.Signature(tuple(map(spec, sig.inputs)), tuple(map(spec, sig.outputs)))


def registration_in(h: pb.RegistrationHeader) -> d.RegistrationRequest:
    if h.format not in _FORMATS:
        raise InvalidArgument(f"header.format must be ONNX, TORCHSCRIPT, TRITON_FOLDER or ORT_GENAI, got {h.format}")
    if h.preprocessing.kind not in _PRE or h.postprocessing.kind not in _POST:
        raise InvalidArgument("header: unknown preprocessing or postprocessing kind")
    return d.RegistrationRequest(
        model=h.model,
        format=_FORMATS[h.format],
        sha256=h.sha256.lower(),
        size_bytes=h.size_bytes,
        signature=signature_in(h.signature),
        preprocessing=d.Preprocessing(_PRE[h.preprocessing.kind], h.preprocessing.name),
        postprocessing=d.Postprocessing(_POST[h.postprocessing.kind], h.postprocessing.output, h.postprocessing.top_k),
        labels=tuple(h.labels),
        tags=dict(h.tags),
        max_batch_size=h.max_batch_size,
        actor=h.actor,
        description=h.description,
    )


def target_in(t: pb.TrafficTarget) -> d.Target:
    which = t.WhichOneof("target")
    return d.Target(
        version=t.version if which == "version" else 0, alias=t.alias if which == "alias" else "", weight=t.weight
    )


def shadow_result_in(r: pb.ShadowResult) -> d.ShadowResult:
    return d.ShadowResult(
        r.model,
        r.primary_version,
        r.shadow_version,
        r.items,
        r.top1_agreed,
        r.cosine_sum,
        r.primary_latency_ms,
        r.shadow_latency_ms,
        r.top5_overlap_sum,
        tuple(r.cosines),
        r.request_id,
        r.generated_tokens,
        r.prefix_tokens,
    )


# -- out --------------------------------------------------------------------------------------------


def signature_out(sig: d.Signature) -> pb.Signature:
    spec = lambda t: pb.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape))
    return pb.Signature(inputs=list(map(spec, sig.inputs)), outputs=list(map(spec, sig.outputs)))


def version_out(v: d.Version) -> pb.ModelVersion:
    return pb.ModelVersion(
        model=v.model,
        version=v.version,
        state=_STATES_PB[v.state],  # type: ignore[arg-type]  # protoc .pyi: enum fields typed as the enum class, ints accepted
        state_reason=v.state_reason,
        format=_FORMATS_PB[v.format],
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        signature=signature_out(v.signature),
        preprocessing=pb.Preprocessing(kind=_PRE_PB[v.preprocessing.kind], name=v.preprocessing.name),
        postprocessing=pb.Postprocessing(
            kind=_POST_PB[v.postprocessing.kind], output=v.postprocessing.output, top_k=v.postprocessing.top_k
        ),
        labels=list(v.labels),
        tags=v.tags,
        created_at=timestamp(v.created_at),
        created_by=v.created_by,
        aliases=list(v.aliases),
        description=v.description,
        load_ms=v.load_ms,
    )


def alias_out(a: d.Alias) -> pb.Alias:
    return pb.Alias(
        model=a.model,
        name=a.name,
        version=a.version,
        previous_version=a.previous_version,
        updated_by=a.updated_by,
        updated_at=timestamp(a.updated_at),
        reason=a.reason,
    )


def target_out(t: d.Target) -> pb.TrafficTarget:
    if t.alias:
        return pb.TrafficTarget(alias=t.alias, weight=t.weight)
    return pb.TrafficTarget(version=t.version, weight=t.weight)


def policy_out(p: d.TrafficPolicy) -> pb.TrafficPolicy:
    out = pb.TrafficPolicy(
        model=p.model, split=[target_out(t) for t in p.split], updated_by=p.updated_by, reason=p.reason
    )
    if p.updated_at:
        out.updated_at.CopyFrom(timestamp(p.updated_at))
    if p.shadow is not None:
        out.shadow.CopyFrom(pb.ShadowPolicy(target=target_out(p.shadow), fraction=p.shadow_fraction))
    return out


def shadow_stats_out(s: d.ShadowStats) -> pb.ShadowStats:
    return pb.ShadowStats(
        primary_version=s.primary_version,
        shadow_version=s.shadow_version,
        samples=s.samples,
        top1_agreement=s.top1_agreement,
        mean_cosine=s.mean_cosine,
        primary_latency_ms=s.primary_latency_ms,
        shadow_latency_ms=s.shadow_latency_ms,
    )


def model_out(m: d.Model) -> pb.Model:
    return pb.Model(
        name=m.name,
        versions=[version_out(v) for v in m.versions],
        aliases=[alias_out(a) for a in m.aliases],
        policy=policy_out(m.policy),
        shadow_stats=[shadow_stats_out(s) for s in m.shadow_stats],
        alias_history=[alias_out(a) for a in m.alias_history],
    )


def routing_out(r: d.ModelRouting) -> pb.ModelRouting:
    return pb.ModelRouting(
        model=r.model, versions=[version_out(v) for v in r.versions], aliases=r.aliases, policy=policy_out(r.policy)
    )


def watch_event_out(e: d.WatchEvent) -> pb.WatchEvent:
    if e.snapshot is not None:
        return pb.WatchEvent(revision=e.revision, snapshot=pb.RoutingState(models=[routing_out(m) for m in e.snapshot]))
    if e.rollout is not None:
        return pb.WatchEvent(revision=e.revision, rollout_changed=rollout_out(e.rollout))
    return pb.WatchEvent(revision=e.revision, model_changed=routing_out(e.changed))


# -- progressive delivery (rollout.py) -------------------------------------------------------------

POLICY_FIELDS = (
    "step_weight",
    "interval_seconds",
    "max_weight",
    "max_error_rate",
    "max_p99_ratio",
    "min_shadow_agreement",
    "min_requests",
    "failure_limit",
)


def rollout_policy_in(p: pb.RolloutPolicy):
    from services.registry.rollout import policy_with_defaults

    return policy_with_defaults(**{name: getattr(p, name) for name in POLICY_FIELDS if p.HasField(name)})


def rollout_policy_out(p) -> pb.RolloutPolicy:
    return pb.RolloutPolicy(**{name: getattr(p, name) for name in POLICY_FIELDS})


def rollout_out(r) -> pb.Rollout:
    return pb.Rollout(
        model=r.model,
        canary_version=r.canary_version,
        production_version=r.production_version,
        state=pb.RolloutState.Value(f"ROLLOUT_STATE_{r.state.name}"),  # type: ignore[arg-type]  # protoc .pyi enums
        policy=rollout_policy_out(r.policy),
        weight=r.weight,
        consecutive_failures=r.consecutive_failures,
        reason=r.reason,
        started_by=r.started_by,
        started_at=timestamp(r.started_at),
        updated_at=timestamp(r.updated_at),
        analyses=[
            pb.RolloutAnalysis(
                at=timestamp(a.at),
                weight=a.weight,
                canary_requests=a.canary_requests,
                production_requests=a.production_requests,
                canary_error_rate=a.canary_error_rate,
                canary_p99_ms=a.canary_p99_ms,
                production_p99_ms=a.production_p99_ms,
                shadow_agreement=a.shadow_agreement,
                outcome=a.outcome,
                detail=a.detail,
            )
            for a in r.analyses
        ],
        planned_weights=r.planned_weights,
    )


def shadow_report_out(r) -> pb.ShadowReport:
    return pb.ShadowReport(
        model=r.model,
        primary_version=r.primary_version,
        shadow_version=r.shadow_version,
        kind=r.kind,
        agreement=r.agreement,
        samples=r.samples,
        items=r.items,
        top1_agreement=r.top1_agreement,
        top5_agreement=r.top5_agreement,
        mean_cosine=r.mean_cosine,
        cosine_bounds=r.cosine_bounds,
        cosine_counts=r.cosine_counts,
        worst=[pb.ShadowExample(score=s, request_id=i, items=n) for s, i, n in r.worst],
        primary_latency_ms=r.primary_latency_ms,
        shadow_latency_ms=r.shadow_latency_ms,
        # generation
        exact_agreement=r.exact_agreement,
        prefix_agreement=r.prefix_agreement,
    )


def version_stats_in(s: pb.VersionStats) -> tuple:
    return (s.model, s.version, s.requests, dict(s.errors), tuple(s.latency_bounds_ms), list(s.latency_counts))


# -- tenants ----------------------------------------------------------------------------------------
from services.registry import tenants as t  # noqa: E402

_PRIORITY = {
    pb.PRIORITY_CRITICAL: t.Priority.CRITICAL,
    pb.PRIORITY_STANDARD: t.Priority.STANDARD,
    pb.PRIORITY_SHEDDABLE: t.Priority.SHEDDABLE,
}
_PRIORITY_PB = {v: k for k, v in _PRIORITY.items()}


def priority_in(value: int, default: t.Priority | None = t.Priority.STANDARD) -> t.Priority | None:
    if value == pb.PRIORITY_UNSPECIFIED:
        return default
    if value not in _PRIORITY:
        raise InvalidArgument(f"priority {value} is not one of CRITICAL, STANDARD, SHEDDABLE")
    return _PRIORITY[value]  # type: ignore[index]  # protoc .pyi enums


def quota_in(q: pb.Quota) -> t.Quota:
    return t.Quota(q.requests_per_second, q.request_burst, q.cost_per_second, q.cost_burst)


def quota_out(q: t.Quota) -> pb.Quota:
    return pb.Quota(
        requests_per_second=q.requests_per_second,
        request_burst=q.request_burst,
        cost_per_second=q.cost_per_second,
        cost_burst=q.cost_burst,
    )


def tenant_out(x: t.Tenant) -> pb.Tenant:
    return pb.Tenant(
        name=x.name,
        key_prefix=x.key_prefix,
        allowed_models=list(x.allowed_models),
        quota=quota_out(x.quota),
        priority=_PRIORITY_PB[x.priority],
        revoked=x.revoked,
        created_at=timestamp(x.created_at),
        created_by=x.created_by,
        updated_at=timestamp(x.updated_at),
        updated_by=x.updated_by,
        description=x.description,
    )


def tenants_event_out(s: t.TenantsSnapshot) -> pb.TenantsEvent:
    return pb.TenantsEvent(
        revision=s.revision,
        routers=s.routers,
        tenants=[pb.TenantAuth(tenant=tenant_out(x), key_sha256=x.key_sha256) for x in s.tenants],
    )


def audit_out(e: t.AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        id=e.id, at=timestamp(e.at), actor=e.actor, action=e.action, target=e.target, reason=e.reason, detail=e.detail
    )
