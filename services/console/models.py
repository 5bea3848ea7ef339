"""The Models page's data: registry Models as plain dicts for the templates, and the registry's Watch
stream fanned out to every open page (server-sent events).

One Watch per console process (the router's RegistryWatcher: same reconnect loop); each change wakes
the subscribers with the model's name, and each page then reads that model with GetModel (the Watch
view lacks alias history and who changed what) and gets the re-rendered card.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import grpc

from maas.registry_client import FORMAT_NAMES, STATE_NAMES, target_name
from maas.v1 import registry_pb2 as pb
from services.router.watcher import RegistryWatcher

# What a model answers, in the words (postprocessing kind of its newest version).
KINDS = {
    pb.Postprocessing.KIND_EMBEDDING: "embedding",
    pb.Postprocessing.KIND_SOFTMAX_TOP_K: "classifier",
    pb.Postprocessing.KIND_GENERATION: "generator",
}
# The two figures of a shadowed pair by kind: the registry keeps a generation pair's exact-token agreement
# in the top-1 field and its mean prefix agreement in the cosine field (docs/rollouts.md).
AGREEMENT_COLUMNS = {
    "generator": ("exact-token agree", "prefix agree"),
}
DEFAULT_AGREEMENT_COLUMNS = ("top-1 agree", "mean cosine")
HISTORY_ROWS = 8  # alias moves shown per model
# Colours of the split bar's segments (enough for any real split; they repeat after that).
PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b")


def when(ts) -> str:
    if not ts.seconds:
        return ""
    return datetime.fromtimestamp(ts.seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def kind_of(model: pb.Model | pb.ModelRouting) -> str:
    versions = sorted(model.versions, key=lambda v: v.version)
    ready = [v for v in versions if v.state == pb.VERSION_STATE_READY] or versions
    return KINDS.get(ready[-1].postprocessing.kind, "tensor") if ready else "tensor"


def _resolve(target: pb.TrafficTarget, aliases: dict[str, int]) -> int | None:
    return target.version if target.WhichOneof("target") == "version" else aliases.get(target.alias)


def split_segments(model: pb.Model) -> list[dict]:
    """The traffic split as bar segments (percent of the weights); no split = all to production."""
    aliases = {a.name: a.version for a in model.aliases}
    split = list(model.policy.split)
    if not split:
        version = aliases.get("production") or max(
            (v.version for v in model.versions if v.state == pb.VERSION_STATE_READY), default=None
        )
        label = "production" if "production" in aliases else "newest ready"
        return [{"label": label, "version": version, "percent": 100.0, "weight": 0, "color": PALETTE[0]}]
    total = sum(t.weight for t in split) or 1
    return [
        {
            "label": target_name(t),
            "version": _resolve(t, aliases),
            "weight": t.weight,
            "percent": round(100.0 * t.weight / total, 1),
            "color": PALETTE[i % len(PALETTE)],
        }
        for i, t in enumerate(split)
    ]


def model_view(model: pb.Model) -> dict:
    aliases = {a.name: a.version for a in model.aliases}
    policy = model.policy
    shadow = None
    if policy.HasField("shadow") and policy.shadow.fraction > 0:
        shadow = {
            "target": target_name(policy.shadow.target),
            "version": _resolve(policy.shadow.target, aliases),
            "percent": round(policy.shadow.fraction * 100, 2),
        }
    kind = kind_of(model)
    return {
        "name": model.name,
        "kind": kind,
        "agreement_columns": AGREEMENT_COLUMNS.get(kind, DEFAULT_AGREEMENT_COLUMNS),
        "versions": [
            {
                "version": v.version,
                "state": STATE_NAMES.get(v.state, str(v.state)),
                "state_reason": v.state_reason,
                "aliases": sorted(v.aliases),
                "created": when(v.created_at),
                "created_by": v.created_by,
                "format": FORMAT_NAMES.get(v.format, ""),
                "size_mb": round(v.size_bytes / 1e6, 1),
                "load_s": round(v.load_ms / 1000, 1),
                "description": v.description,
            }
            for v in sorted(model.versions, key=lambda v: v.version)
        ],
        "aliases": [
            {
                "name": a.name,
                "version": a.version,
                "updated_by": a.updated_by,
                "updated": when(a.updated_at),
                "reason": a.reason,
            }
            for a in sorted(model.aliases, key=lambda a: a.name)
        ],
        "split": split_segments(model),
        "shadow": shadow,
        "policy_by": policy.updated_by,
        "policy_at": when(policy.updated_at),
        "policy_reason": policy.reason,
        "shadow_stats": [
            {
                "primary": s.primary_version,
                "shadow": s.shadow_version,
                "samples": s.samples,
                "top1": round(s.top1_agreement * 100, 1),
                "cosine": round(s.mean_cosine, 4),
                "primary_ms": round(s.primary_latency_ms, 1),
                "shadow_ms": round(s.shadow_latency_ms, 1),
            }
            for s in model.shadow_stats
        ],
        "history": [
            {
                "name": a.name,
                "version": a.version,
                "previous": a.previous_version,
                "by": a.updated_by,
                "at": when(a.updated_at),
                "reason": a.reason,
            }
            for a in model.alias_history[:HISTORY_ROWS]
        ],
    }


class ModelFeed(RegistryWatcher):
    """The registry's Watch, fanned out: each subscriber queue gets the names of changed models
    (every model again after a reconnect's snapshot)."""

    def __init__(self, channel: grpc.aio.Channel, **backoff):
        super().__init__(channel, table=None, **backoff)
        self.revision = 0
        self._subscribers: set[asyncio.Queue] = set()

    def apply(self, event: pb.WatchEvent) -> None:
        self.revision = event.revision
        which = event.WhichOneof("event")
        if which == "snapshot":
            names = [m.model for m in event.snapshot.models]
            self.synced.set()
        elif which == "model_changed":
            names = [event.model_changed.model]
        else:
            return
        for queue in self._subscribers:
            for name in names:
                queue.put_nowait(name)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)


ROLLOUT_STATES = {
    pb.ROLLOUT_STATE_PLANNED: "planned",
    pb.ROLLOUT_STATE_RUNNING: "running",
    pb.ROLLOUT_STATE_PROMOTED: "promoted",
    pb.ROLLOUT_STATE_ROLLED_BACK: "rolled back",
    pb.ROLLOUT_STATE_ABORTED: "aborted",
}


def rollout_view(r: pb.Rollout) -> dict:
    """A rollout as the Operations page shows it: progress towards its max weight, the last analyses."""
    return {
        "model": r.model,
        "canary": r.canary_version,
        "production": r.production_version,
        "state": ROLLOUT_STATES.get(r.state, str(r.state)),
        "weight": r.weight,
        "max_weight": r.policy.max_weight,
        "failures": r.consecutive_failures,
        "failure_limit": r.policy.failure_limit,
        "reason": r.reason,
        "started_by": r.started_by,
        "started": when(r.started_at),
        "updated": when(r.updated_at),
        "analyses": [
            {
                "at": when(a.at),
                "weight": a.weight,
                "outcome": a.outcome,
                "detail": a.detail,
                "canary_requests": a.canary_requests,
                "error_rate": round(a.canary_error_rate * 100, 2),
                "canary_p99": round(a.canary_p99_ms, 1),
                "production_p99": round(a.production_p99_ms, 1),
            }
            for a in list(r.analyses)[-5:]
        ],
    }


def audit_view(e: pb.AuditEntry) -> dict:
    return {
        "at": when(e.at),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "reason": e.reason,
        "detail": e.detail[:200],
    }
