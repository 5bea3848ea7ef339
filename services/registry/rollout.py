"""Automatic rollouts: canary analysis on what the routers report, step by step, promote or roll back.

A rollout moves a READY version (the canary) from `step_weight` % of a model's traffic to `max_weight` %
in steps, one step per `interval_seconds`, while every gate holds on the figures of the interval just
ended (per-version request counts, errors by code and latency histograms the routers send to
ReportVersionStats; shadow agreement from ReportShadowResults). After the last step it promotes: the
"production" alias moves to the canary and the traffic policy returns to the default (everything to
production). When a gate fails `failure_limit` analyses in a row it rolls back at once: the traffic
policy returns to the default, the alias is restored if it moved, and the reason is recorded.

State lives in the registry's SQLite store (rollout_store.py) and every change is committed before it
takes effect on traffic, so a registry restarted mid-rollout resumes it (re-applying the weight it had)
or finishes what it was doing (a promotion or a rollback half done): never stuck. While a rollout runs
it owns the model's traffic policy.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import math
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from maas.rollout_defaults import RolloutDefaults
from services.registry import metrics
from services.registry.domain import Target, VersionState, WatchEvent, check_name
from services.registry.rollout_store import RolloutStore
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from services.registry.registry import Registry

log = logging.getLogger(__name__)
audit = logging.getLogger("maas.audit")

PRODUCTION_ALIAS = "production"
ROLLOUT_ACTOR = "rollout"
# Codes that are the caller's doing (or a limit), never the version's: not counted as canary errors.
CALLER_CODES = frozenset({"CANCELLED", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "NOT_FOUND"})
MAX_ANALYSES_KEPT = 100
MAX_INTERVAL_SECONDS = 86400.0
# Share of the model's requests mirrored to the canary while a min_shadow_agreement gate is on.
SHADOW_FRACTION = 1.0


class RolloutState(Enum):
    PLANNED = "planned"
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


@dataclass(frozen=True)
class RolloutPolicy(RolloutDefaults):
    """A rollout's policy: the defaults (maas/rollout_defaults.py) for every field a caller leaves unset."""

    def check(self) -> None:
        """INVALID_ARGUMENT naming the field for a policy that cannot be run."""

        def bad(name, why):
            raise InvalidArgument(f"rollout policy {name}: {getattr(self, name)} {why}")

        if not 1 <= self.step_weight <= 100:
            bad("step_weight", "is outside 1..100")
        if not 1 <= self.max_weight <= 100:
            bad("max_weight", "is outside 1..100")
        if self.step_weight > self.max_weight:
            bad("step_weight", f"is above max_weight {self.max_weight}")
        if not (math.isfinite(self.interval_seconds) and 0 < self.interval_seconds <= MAX_INTERVAL_SECONDS):
            bad("interval_seconds", f"is not in (0, {MAX_INTERVAL_SECONDS:g}]")
        if not (math.isfinite(self.max_error_rate) and 0 <= self.max_error_rate <= 1):
            bad("max_error_rate", "is outside 0..1")
        if not (math.isfinite(self.max_p99_ratio) and (self.max_p99_ratio == 0 or self.max_p99_ratio >= 1)):
            bad("max_p99_ratio", "must be 0 (off) or at least 1")
        if not (math.isfinite(self.min_shadow_agreement) and 0 <= self.min_shadow_agreement <= 1):
            bad("min_shadow_agreement", "is outside 0..1")
        if self.min_requests < 0:
            bad("min_requests", "is negative")
        if self.failure_limit < 1:
            bad("failure_limit", "must be at least 1")

    def weights(self) -> list[int]:
        """The canary weights stepped through, e.g. 10, 20, ... up to max_weight."""
        out, w = [], self.step_weight
        while w < self.max_weight:
            out.append(w)
            w += self.step_weight
        return out + [self.max_weight]


@dataclass(frozen=True)
class Analysis:
    at: float
    weight: int
    canary_requests: int
    production_requests: int
    canary_error_rate: float
    canary_p99_ms: float
    production_p99_ms: float
    shadow_agreement: float
    outcome: str  # passed | failed | waiting
    detail: str


@dataclass
class Rollout:
    model: str
    canary_version: int
    production_version: int
    state: RolloutState
    policy: RolloutPolicy
    weight: int = 0
    consecutive_failures: int = 0
    reason: str = ""
    started_by: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    analyses: list[Analysis] = field(default_factory=list)
    planned_weights: list[int] = field(default_factory=list)
    id: int = 0


# -- figures the routers report -------------------------------------------------------------------


@dataclass
class Figures:
    """Cumulative figures of one version since the registry started (summed over routers)."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bounds: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)

    def copy(self) -> "Figures":
        return Figures(self.requests, dict(self.errors), self.bounds, list(self.counts))

    def minus(self, before: "Figures | None") -> "Figures":
        if before is None:
            return self.copy()
        counts = list(self.counts)
        if before.bounds == self.bounds:
            counts = [a - b for a, b in zip(self.counts, before.counts)]
        return Figures(
            self.requests - before.requests,
            {c: n - before.errors.get(c, 0) for c, n in self.errors.items() if n - before.errors.get(c, 0)},
            self.bounds,
            counts,
        )

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.errors.items() if code not in CALLER_CODES)

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @property
    def answered(self) -> int:
        return sum(self.counts)

    def quantile_ms(self, q: float) -> float:
        """The q-quantile of the latency histogram, interpolated within its bucket (0 with no sample)."""
        total = sum(self.counts)
        if not total or not self.bounds:
            return 0.0
        rank = q * total
        cumulative = 0
        for i, n in enumerate(self.counts):
            if n and cumulative + n >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                return low + (self.bounds[i] - low) * (rank - cumulative) / n
            cumulative += n
        return self.bounds[-1]


class StatsBook:
    def __init__(self):
        self._figures: dict[tuple[str, int], Figures] = {}

    def add(
        self,
        model: str,
        version: int,
        requests: int,
        errors: dict[str, int],
        bounds: tuple[float, ...],
        counts: list[int],
    ) -> None:
        f = self._figures.get((model, version))
        if f is None or f.bounds != bounds:
            f = self._figures[(model, version)] = Figures(
                bounds=bounds,
                counts=[0] * len(counts),
                requests=f.requests if f else 0,
                errors=dict(f.errors) if f else {},
            )
        f.requests += requests
        for code, n in errors.items():
            f.errors[code] = f.errors.get(code, 0) + n
        f.counts = [a + b for a, b in zip(f.counts, counts)]

    def get(self, model: str, version: int) -> Figures:
        f = self._figures.get((model, version))
        return f.copy() if f else Figures()


def check_report(model: str, version: int, requests: int, errors: dict[str, int], bounds, counts) -> None:
    where = f"stats of {model!r} v{version}"
    check_name(model)
    if version <= 0:
        raise InvalidArgument(f"{where}: version must be positive")
    if any(not math.isfinite(b) or b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise InvalidArgument(f"{where}: latency_bounds_ms must be positive, finite and strictly ascending")
    if len(counts) != len(bounds) + 1:
        raise InvalidArgument(f"{where}: {len(counts)} latency_counts for {len(bounds)} bounds (need bounds + 1)")
    if sum(counts) + sum(errors.values()) > requests:
        raise InvalidArgument(
            f"{where}: answered + failed ({sum(counts)} + {sum(errors.values())}) exceeds requests ({requests})"
        )


# -- the controller -------------------------------------------------------------------------------


class RolloutController:
    def __init__(self, registry: "Registry", clock=time.time):
        self.registry = registry
        self.store = RolloutStore(registry.store)
        self.book = StatsBook()
        self.clock = clock
        self._tasks: dict[str, asyncio.Task] = {}
        # Per model: the canary's and production's cumulative figures when the current window opened.
        self._window: dict[str, tuple[Figures, Figures]] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every running rollout; finish promotions and rollbacks a crash left half done."""
        for rollout in self.store.latest_all():
            if rollout.state == RolloutState.RUNNING:
                await self._resume(rollout)
            else:
                await self._settle(rollout)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resume(self, rollout: Rollout) -> None:
        alias = self.registry.store.alias(rollout.model, PRODUCTION_ALIAS)
        if alias is not None and alias.version == rollout.canary_version:
            await self._finish(rollout, RolloutState.PROMOTED, "promoted (completed after a registry restart)")
            return
        problem = self._unroutable(rollout)
        if problem:
            await self._finish(rollout, RolloutState.ROLLED_BACK, f"{problem} (found on registry restart)")
            return
        log.info(
            "rollout resumed",
            extra={"model": rollout.model, "canary": rollout.canary_version, "weight": rollout.weight},
        )
        await self._apply_weight(rollout)
        self._run(rollout.model)

    async def _settle(self, rollout: Rollout) -> None:
        """An ended rollout whose traffic change did not happen (crash in between): make it happen."""
        # Only what has not changed since the rollout ended (its end is committed first): a policy or alias
        # someone set afterwards stays as they set it.
        policy = self.registry.store.policy(rollout.model)
        if (
            policy.updated_by == ROLLOUT_ACTOR
            and policy.updated_at < rollout.updated_at
            and (policy.split or policy.shadow)
        ):
            await self._default_policy(rollout.model, f"rollout {rollout.state.value} (completed after a restart)")
        alias = self.registry.store.alias(rollout.model, PRODUCTION_ALIAS)
        if (
            rollout.state == RolloutState.PROMOTED
            and alias is not None
            and alias.updated_at < rollout.updated_at
            and alias.version == rollout.production_version
        ):
            self._move_production(rollout, rollout.canary_version, "rollout promoted (completed after a restart)")

    # -- requests ----------------------------------------------------------------------------------
    def report(self, stats: list[tuple[str, int, int, dict[str, int], tuple[float, ...], list[int]]]) -> None:
        for s in stats:
            check_report(*s)
        for s in stats:
            self.book.add(*s)

    def get(self, model: str) -> Rollout:
        check_name(model)
        rollout = self.store.latest(model)
        if rollout is None:
            raise NotFound(f"model {model!r} has had no rollout")
        return rollout

    def list(self) -> list[Rollout]:
        return self.store.latest_all()

    async def start_rollout(
        self, model: str, version: int, policy: RolloutPolicy, dry_run: bool, actor: str, reason: str
    ) -> Rollout:
        check_name(model)
        if version <= 0:
            raise InvalidArgument("version: name the READY version to roll out (a positive number)")
        if not self.registry.store.model_exists(model):
            raise NotFound(f"model {model!r} is not registered")
        policy.check()
        running = self.store.latest(model)
        if running is not None and running.state == RolloutState.RUNNING:
            raise FailedPrecondition(
                f"model {model!r} already has a rollout running (version "
                f"{running.canary_version} at {running.weight}%); abort it first"
            )
        alias = self.registry.store.alias(model, PRODUCTION_ALIAS)
        if alias is None:
            raise FailedPrecondition(
                f"version: model {model!r} has no {PRODUCTION_ALIAS!r} alias to roll out "
                f"against; set it first (maas models alias {model} {PRODUCTION_ALIAS} N)"
            )
        if version == alias.version:
            raise FailedPrecondition(f"version: {version} is already {model!r}'s {PRODUCTION_ALIAS} version")
        self.registry.require_ready(model, version, "rollout version")
        self.registry.require_ready(model, alias.version, f"{PRODUCTION_ALIAS} version")
        now = self.clock()
        weights = policy.weights()
        rollout = Rollout(
            model=model,
            canary_version=version,
            production_version=alias.version,
            state=RolloutState.PLANNED if dry_run else RolloutState.RUNNING,
            policy=policy,
            weight=weights[0],
            reason=reason,
            started_by=actor,
            started_at=now,
            updated_at=now,
            planned_weights=weights,
        )
        if dry_run:
            return rollout
        # Committed before traffic changes: a crash in between resumes and applies the weight.
        self._save(
            rollout,
            new=True,
            audit_row=(
                "rollout.started",
                actor,
                reason,
                f"canary v{version} against production v{alias.version}, weights {weights}",
            ),
        )
        audit.info(
            "rollout started",
            extra={
                "model": model,
                "canary": version,
                "production": alias.version,
                "actor": actor,
                "reason": reason,
                "weights": weights,
            },
        )
        metrics.ROLLOUTS.labels(model, "started").inc()
        await self._apply_weight(rollout)
        self._run(model)
        return rollout

    async def abort(self, model: str, actor: str, reason: str) -> Rollout:
        rollout = self.get(model)
        if rollout.state != RolloutState.RUNNING:
            raise FailedPrecondition(f"the last rollout of {model!r} is {rollout.state.value}, not running")
        self._cancel(model)
        return await self._finish(
            rollout, RolloutState.ABORTED, f"aborted by {actor or 'unknown'}" + (f": {reason}" if reason else "")
        )

    # -- the analysis loop -------------------------------------------------------------------------
    def _run(self, model: str) -> None:
        self._cancel(model)
        self._open_window(self.store.latest(model))
        self._tasks[model] = asyncio.get_running_loop().create_task(self._loop(model), name=f"rollout-{model}")

    def _cancel(self, model: str) -> None:
        task = self._tasks.pop(model, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _loop(self, model: str) -> None:
        while True:
            rollout = self.store.latest(model)
            if rollout is None or rollout.state != RolloutState.RUNNING:
                return
            await asyncio.sleep(rollout.policy.interval_seconds)
            try:
                if not await self.step(model):
                    return
            except Exception:
                log.exception("rollout analysis failed; rolling back", extra={"model": model})
                rollout = self.store.latest(model)
                if rollout is not None and rollout.state == RolloutState.RUNNING:
                    await self._finish(rollout, RolloutState.ROLLED_BACK, "internal error in the rollout analysis")
                return

    def _open_window(self, rollout: Rollout) -> None:
        self._window[rollout.model] = (
            self.book.get(rollout.model, rollout.canary_version),
            self.book.get(rollout.model, rollout.production_version),
        )

    async def step(self, model: str) -> bool:
        """One analysis of the interval just ended; False once the rollout ended."""
        rollout = self.store.latest(model)
        if rollout is None or rollout.state != RolloutState.RUNNING:
            return False
        problem = self._unroutable(rollout)
        if problem:
            await self._finish(rollout, RolloutState.ROLLED_BACK, problem)
            return False
        analysis = self._analyse(rollout)
        metrics.ROLLOUT_ANALYSES.labels(model, analysis.outcome).inc()
        rollout.analyses = (rollout.analyses + [analysis])[-MAX_ANALYSES_KEPT:]
        rollout.updated_at = analysis.at
        if analysis.outcome == "waiting":  # the window stays open until it has enough requests
            self._save(rollout)
            return True
        self._open_window(rollout)
        if analysis.outcome == "failed":
            rollout.consecutive_failures += 1
            if rollout.consecutive_failures >= rollout.policy.failure_limit:
                await self._finish(
                    rollout,
                    RolloutState.ROLLED_BACK,
                    f"at {rollout.weight}%: {analysis.detail} ({rollout.consecutive_failures} failed "
                    f"analys{'es' if rollout.consecutive_failures > 1 else 'is'} in a row)",
                )
                return False
            self._save(rollout)
            return True
        rollout.consecutive_failures = 0
        if rollout.weight >= rollout.policy.max_weight:
            await self._finish(rollout, RolloutState.PROMOTED, f"every gate held up to {rollout.weight}%")
            return False
        rollout.weight = min(rollout.weight + rollout.policy.step_weight, rollout.policy.max_weight)
        self._save(rollout)
        await self._apply_weight(rollout)
        return True

    def _analyse(self, rollout: Rollout) -> Analysis:
        p = rollout.policy
        before_canary, before_production = self._window.get(rollout.model, (None, None))
        canary = self.book.get(rollout.model, rollout.canary_version).minus(before_canary)
        production = self.book.get(rollout.model, rollout.production_version).minus(before_production)
        canary_p99, production_p99 = canary.quantile_ms(0.99), production.quantile_ms(0.99)
        agreement, samples = self._agreement(rollout)
        failed, waiting = [], []
        if canary.requests < p.min_requests or canary.requests == 0:
            waiting.append(f"{canary.requests} of {max(p.min_requests, 1)} canary requests")
        else:
            if canary.error_rate > p.max_error_rate:
                codes = ", ".join(f"{c}: {n}" for c, n in sorted(canary.errors.items()) if c not in CALLER_CODES)
                failed.append(f"error rate {canary.error_rate:.3f} > max_error_rate {p.max_error_rate:g} ({codes})")
            if (
                p.max_p99_ratio > 0
                and canary.answered
                and production.answered >= max(p.min_requests, 1)
                and production_p99 > 0
                and canary_p99 > p.max_p99_ratio * production_p99
            ):
                failed.append(
                    f"p99 {canary_p99:.1f} ms > max_p99_ratio {p.max_p99_ratio:g} x production's "
                    f"{production_p99:.1f} ms"
                )
            if p.min_shadow_agreement > 0:
                if samples == 0:
                    waiting.append("shadow comparisons")
                elif agreement < p.min_shadow_agreement:
                    failed.append(f"shadow agreement {agreement:.4f} < min_shadow_agreement {p.min_shadow_agreement:g}")
        outcome = "failed" if failed else "waiting" if waiting else "passed"
        detail = (
            "; ".join(failed) if failed else ("waiting for " + ", ".join(waiting)) if waiting else "every gate held"
        )
        return Analysis(
            at=self.clock(),
            weight=rollout.weight,
            canary_requests=canary.requests,
            production_requests=production.requests,
            canary_error_rate=canary.error_rate,
            canary_p99_ms=canary_p99,
            production_p99_ms=production_p99,
            shadow_agreement=agreement,
            outcome=outcome,
            detail=detail,
        )

    def _agreement(self, rollout: Rollout) -> tuple[float, int]:
        for s in self.registry.store.shadow_stats(rollout.model):
            if (s.primary_version, s.shadow_version) == (rollout.production_version, rollout.canary_version):
                version = self.registry.store.version(rollout.model, rollout.production_version)
                kind = version.postprocessing.kind if version else None
                return metrics.agreement_value(kind, s.top1_agreement, s.mean_cosine), s.samples
        return 0.0, 0

    def _unroutable(self, rollout: Rollout) -> str:
        for what, number in (("canary", rollout.canary_version), (PRODUCTION_ALIAS, rollout.production_version)):
            version = self.registry.store.version(rollout.model, number)
            if version is None or version.state != VersionState.READY:
                state = version.state.value if version else "gone"
                return f"{what} version {number} is {state}, not ready"
        return ""

    # -- effects -----------------------------------------------------------------------------------
    def _save(self, rollout: Rollout, new: bool = False, audit_row: tuple[str, str, str, str] | None = None) -> None:
        """Commit the rollout; `audit_row` (action, actor, reason, detail) goes into the registry's audit log
        in the same transaction, as every registry mutation's does (`maas audit`)."""
        with self.registry.store.transaction() as tx:
            if new:
                rollout.id = self.store.insert(tx, rollout)
            else:
                self.store.update(tx, rollout)
            if audit_row is not None:
                action, actor, reason, detail = audit_row
                self.registry.store.add_audit(tx, actor, action, f"model/{rollout.model}", reason, detail)
            revision = self.registry.store.bump_revision(tx)
        self.registry.hub.publish(WatchEvent(revision=revision, rollout=rollout))
        metrics.ROLLOUT_WEIGHT.labels(rollout.model).set(rollout.weight if rollout.state == RolloutState.RUNNING else 0)

    async def _apply_weight(self, rollout: Rollout) -> None:
        split = [
            Target(version=rollout.production_version, weight=100 - rollout.weight),
            Target(version=rollout.canary_version, weight=rollout.weight),
        ]
        shadow = Target(version=rollout.canary_version) if rollout.policy.min_shadow_agreement > 0 else None
        await self._set_policy(
            rollout.model, split, shadow, f"rollout of version {rollout.canary_version}: {rollout.weight}%"
        )

    async def _default_policy(self, model: str, reason: str) -> None:
        await self._set_policy(model, [], None, reason)

    async def _set_policy(self, model: str, split: builtins.list[Target], shadow: Target | None, reason: str) -> None:
        await self.registry.set_traffic_policy(
            model, split, shadow, SHADOW_FRACTION if shadow else 0.0, ROLLOUT_ACTOR, reason
        )

    def _move_production(self, rollout: Rollout, number: int, reason: str) -> None:
        alias = self.registry.store.alias(rollout.model, PRODUCTION_ALIAS)
        if alias is not None and alias.version == number:
            return
        self.registry.move_alias(
            rollout.model, PRODUCTION_ALIAS, number, ROLLOUT_ACTOR, reason, alias.version if alias else 0
        )

    async def _finish(self, rollout: Rollout, state: RolloutState, reason: str) -> Rollout:
        """End a rollout: the state is committed first, then traffic follows (start() completes the rest
        after a crash in between)."""
        rollout.state, rollout.reason, rollout.updated_at = state, reason, self.clock()
        self._save(
            rollout,
            audit_row=(
                f"rollout.{state.value}",
                ROLLOUT_ACTOR,
                reason,
                f"canary v{rollout.canary_version} at {rollout.weight}%, production v{rollout.production_version}",
            ),
        )
        self._cancel(rollout.model)
        self._window.pop(rollout.model, None)
        if state == RolloutState.PROMOTED:
            self._move_production(rollout, rollout.canary_version, f"rollout promoted: {reason}")
        else:
            alias = self.registry.store.alias(rollout.model, PRODUCTION_ALIAS)
            if alias is not None and alias.version != rollout.production_version:
                production = self.registry.store.version(rollout.model, rollout.production_version)
                if production is not None and production.state == VersionState.READY:
                    self._move_production(rollout, rollout.production_version, f"rollout {state.value}: {reason}")
        await self._default_policy(
            rollout.model, f"rollout of version {rollout.canary_version} {state.value}: {reason}"
        )
        outcome = state.value
        metrics.ROLLOUTS.labels(rollout.model, outcome).inc()
        line = audit.warning if state == RolloutState.ROLLED_BACK else audit.info
        line(
            f"rollout {outcome}",
            extra={
                "model": rollout.model,
                "canary": rollout.canary_version,
                "production": rollout.production_version,
                "weight": rollout.weight,
                "reason": reason,
            },
        )
        return rollout


def policy_with_defaults(**given) -> RolloutPolicy:
    """A policy from the fields a caller set (None = unset → default)."""
    return replace(RolloutPolicy(), **{k: v for k, v in given.items() if v is not None})


__all__ = [
    "Analysis",
    "Figures",
    "Rollout",
    "RolloutController",
    "RolloutPolicy",
    "RolloutState",
    "StatsBook",
    "policy_with_defaults",
]
