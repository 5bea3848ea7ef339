"""Shadow agreement reports: per version pair, what the routers' shadow comparisons add up to by model kind.

Beside the running means of `shadow_stats` (store.py: top-1 agreement, mean cosine, latencies) this keeps,
in its own table: the top-5 overlap sum (classifiers), the distribution of per-item cosines over fixed
buckets (embeddings), and the few lowest-scoring requests by request id (never payloads). `maas models
compare MODEL A B` prints it; its `agreement` is the figure rollouts gate on (min_shadow_agreement).

Generation pairs (one generated sequence per request, compared by the router on token ids) use the same
rows: items = 1, top1_agreed = exact match, cosine_sum / cosines = the prefix agreement (common prefix /
longer length), so exact-token agreement is the "top-1" mean and prefix agreement the "cosine" mean; their
histogram has its own bounds (PREFIX_BOUNDS) and the worst examples are the lowest prefix agreements.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
from dataclasses import dataclass, field

from services.registry import metrics
from services.registry.domain import PostprocessingKind, ShadowResult, ShadowStats, check_name
from services.shared.errors import NotFound

# Upper bounds of the cosine buckets: finer near 1, where versions that mostly agree differ.
COSINE_BOUNDS: tuple[float, ...] = (-0.5, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
WORST_KEPT = 5
# Upper bounds of the prefix agreement buckets (generation): bucket 0 holds 0 (first tokens differ).
PREFIX_BOUNDS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_reports (
  model TEXT NOT NULL, primary_version INTEGER NOT NULL, shadow_version INTEGER NOT NULL,
  top5_sum REAL NOT NULL, cosine_counts TEXT NOT NULL, worst TEXT NOT NULL,
  PRIMARY KEY (model, primary_version, shadow_version)
);
"""

KINDS = {
    PostprocessingKind.SOFTMAX_TOP_K: "classifier",
    PostprocessingKind.EMBEDDING: "embedding",
    PostprocessingKind.GENERATION: "generation",
}


def bounds_of(kind: str) -> tuple[float, ...]:
    return PREFIX_BOUNDS if kind == "generation" else COSINE_BOUNDS


@dataclass
class ShadowReport:
    model: str
    primary_version: int
    shadow_version: int
    kind: str
    agreement: float
    samples: int
    items: int
    top1_agreement: float
    top5_agreement: float
    mean_cosine: float
    cosine_bounds: tuple[float, ...]
    cosine_counts: list[int]
    worst: list[tuple[float, str, int]] = field(default_factory=list)  # (score, request_id, items)
    primary_latency_ms: float = 0.0
    shadow_latency_ms: float = 0.0
    # generation
    exact_agreement: float = 0.0
    prefix_agreement: float = 0.0


def bucket(cosine: float, bounds: tuple[float, ...] = COSINE_BOUNDS) -> int:
    """Index of the cosine's bucket: (bounds[i-1], bounds[i]]; float error above 1 goes to the last."""
    return min(bisect.bisect_left(bounds, cosine), len(bounds) - 1)


def score(r: ShadowResult, kind: str) -> float:
    if kind == "classifier":
        return r.top1_agreed / r.items if r.items else 1.0
    return min(r.cosines) if r.cosines else (r.cosine_sum / r.items if r.items else 1.0)


MAX_REQUEST_ID = 128


def check_result(r: ShadowResult) -> None:
    """INVALID_ARGUMENT for report fields that cannot be right (the caller is a router, or a bug)."""
    from services.shared.errors import InvalidArgument

    if r.top5_overlap_sum > r.items + 1e-6 or r.top5_overlap_sum < 0:
        raise InvalidArgument(f"{r.model}: top5_overlap_sum {r.top5_overlap_sum} is outside 0..items ({r.items})")
    if len(r.cosines) > r.items:
        raise InvalidArgument(f"{r.model}: {len(r.cosines)} cosines for {r.items} items")
    if any(not -1.001 <= c <= 1.001 for c in r.cosines):  # also refuses NaN
        raise InvalidArgument(f"{r.model}: a cosine outside [-1, 1]")
    if len(r.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"{r.model}: request_id longer than {MAX_REQUEST_ID} characters")
    if r.prefix_tokens > r.generated_tokens:
        raise InvalidArgument(f"{r.model}: prefix_tokens {r.prefix_tokens} > generated_tokens {r.generated_tokens}")


class ShadowReports:
    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self._db.executescript(SCHEMA)

    def add(self, tx: sqlite3.Connection, results: list[ShadowResult], kinds: dict[tuple[str, int], str]) -> None:
        """Inside the caller's transaction (the one adding the same results to shadow_stats)."""
        for r in results:
            key = (r.model, r.primary_version, r.shadow_version)
            row = tx.execute(
                "SELECT * FROM shadow_reports WHERE model=? AND primary_version=? AND shadow_version=?", key
            ).fetchone()
            kind = kinds.get((r.model, r.primary_version), "tensor")
            bounds = bounds_of(kind)
            counts = json.loads(row["cosine_counts"]) if row else [0] * len(bounds)
            worst = [tuple(w) for w in json.loads(row["worst"])] if row else []
            for c in r.cosines:
                counts[bucket(c, bounds)] += 1
            if r.items:
                worst = sorted(worst + [(score(r, kind), r.request_id, r.items)])[:WORST_KEPT]
            tx.execute(
                "INSERT OR REPLACE INTO shadow_reports VALUES (?,?,?,?,?,?)",
                (*key, (row["top5_sum"] if row else 0.0) + r.top5_overlap_sum, json.dumps(counts), json.dumps(worst)),
            )

    def compare(self, store, model: str, a: int, b: int) -> ShadowReport:
        """The report of shadow version b against primary version a."""
        check_name(model)
        if not store.model_exists(model):
            raise NotFound(f"model {model!r} is not registered")
        for number in (a, b):
            if store.version(model, number) is None:
                raise NotFound(f"model {model!r} has no version {number}")
        stats = next((s for s in store.shadow_stats(model) if (s.primary_version, s.shadow_version) == (a, b)), None)
        if stats is None:
            raise NotFound(
                f"no shadow comparisons of {model!r} v{b} against v{a} yet; mirror traffic first: "
                f"maas models traffic {model} --shadow {b} --shadow-fraction 0.1"
            )
        items = self._db.execute(
            "SELECT items FROM shadow_stats WHERE model=? AND primary_version=? AND shadow_version=?", (model, a, b)
        ).fetchone()[0]
        return self.report(model, stats, store.version(model, a).postprocessing.kind, items)

    def report(self, model: str, stats: ShadowStats, kind: PostprocessingKind | None, items: int) -> ShadowReport:
        row = self._db.execute(
            "SELECT * FROM shadow_reports WHERE model=? AND primary_version=? AND shadow_version=?",
            (model, stats.primary_version, stats.shadow_version),
        ).fetchone()
        name = KINDS.get(kind, "tensor")
        bounds = bounds_of(name)
        counts = json.loads(row["cosine_counts"]) if row else [0] * len(bounds)
        generation = name == "generation"
        return ShadowReport(
            model=model,
            primary_version=stats.primary_version,
            shadow_version=stats.shadow_version,
            kind=name,
            agreement=metrics.agreement_value(kind, stats.top1_agreement, stats.mean_cosine),
            samples=stats.samples,
            items=items,
            top1_agreement=stats.top1_agreement,
            top5_agreement=(row["top5_sum"] / items) if row and items else 0.0,
            mean_cosine=stats.mean_cosine,
            cosine_bounds=bounds,
            cosine_counts=counts,
            worst=[tuple(w) for w in json.loads(row["worst"])] if row else [],
            primary_latency_ms=stats.primary_latency_ms,
            shadow_latency_ms=stats.shadow_latency_ms,
            exact_agreement=stats.top1_agreement if generation else 0.0,
            prefix_agreement=stats.mean_cosine if generation else 0.0,
        )
