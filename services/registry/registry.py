"""The registry's domain logic: versions, aliases, traffic policy, rollback and the routing state.

Mutations of metadata are synchronous SQLite transactions run on the event loop with no await in
between check and commit, so they are atomic with respect to each other and Watch events leave in
revision order. Triton work (load, warm-up, unload) is the Deployment's (deployment.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor

from services.registry import artifacts, metrics, shadow_report
from services.registry.artifacts import Upload
from services.registry.deployment import Deployment
from services.registry.domain import (
    LIVE_STATES,
    Alias,
    ArtifactFormat,
    Model,
    ModelRouting,
    Postprocessing,
    PostprocessingKind,
    RegistrationRequest,
    ShadowResult,
    Target,
    TrafficPolicy,
    Version,
    VersionState,
    WatchEvent,
    check_name,
)
from services.registry.repository import ModelRepository, fsync_tree
from services.registry.store import Store
from services.registry.triton_fleet import TritonFleet
from services.registry.watch import Subscription, WatchHub
from services.shared.config import DEFAULT_RELOAD_CONCURRENCY
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"


class Registry:
    def __init__(
        self,
        store: Store,
        repository: ModelRepository,
        fleet: TritonFleet,
        *,
        executor: Executor | None,
        max_artifact_bytes: int,
        default_max_batch_size: int,
        load_timeout: float,
        watch_queue_size: int = 1024,
        reconcile_interval: float = 0.0,
        reload_concurrency: int = DEFAULT_RELOAD_CONCURRENCY,
    ):
        self.store = store
        self.repository = repository
        self.fleet = fleet
        self.hub = WatchHub(watch_queue_size)
        self.executor = executor or ThreadPoolExecutor(2, thread_name_prefix="registry-validate")
        self.max_artifact_bytes = max_artifact_bytes
        self.default_max_batch_size = default_max_batch_size
        self.deployment = Deployment(
            store,
            repository,
            fleet,
            self._set_state,
            load_timeout=load_timeout,
            reconcile_interval=reconcile_interval,
            reload_concurrency=reload_concurrency,
        )
        from services.registry.rollout import RolloutController

        self.rollouts = RolloutController(self)  # progressive delivery (rollout.py)
        from services.registry.shadow_report import ShadowReports

        self.shadow_reports = ShadowReports(store.db)  # per-kind agreement reports (shadow_report.py)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Clean up after a crash, then make Triton serve what the database says is live."""
        self.repository.remove_orphans(self.store.version_dirs_known())
        await self.deployment.start()
        metrics.record_versions(self.store.all_versions())
        await self.rollouts.start()  # resume (or finish) what a restart interrupted

    async def stop(self) -> None:
        await self.rollouts.stop()  # running rollouts stay running in the store: the next start resumes them
        await self.deployment.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self) -> None:
        """Wait for background loads (tests, bench)."""
        await self.deployment.wait_idle()

    async def set_triton_replicas(self, addresses) -> None:
        """Follow a new set of Triton replicas (e.g. from EndpointSlices): a new one gets every load at once
        and each model's live versions; one that cannot is dropped and TritonError raised (the watcher and
        the watchdog hand the set over again)."""
        await self.deployment.set_replicas(addresses)

    # -- reads -------------------------------------------------------------------------------------
    def _model(self, name: str, include_archived: bool = True) -> Model:
        versions = self.store.versions(name)
        if not include_archived:
            versions = [v for v in versions if v.state != VersionState.ARCHIVED]
        return Model(
            name=name,
            versions=versions,
            aliases=self.store.aliases(name),
            policy=self.store.policy(name),
            shadow_stats=self.store.shadow_stats(name),
            alias_history=self.store.alias_history(name),
        )

    def list_models(self, include_archived: bool = False) -> list[Model]:
        return [self._model(name, include_archived) for name in self.store.model_names()]

    def get_model(self, name: str) -> Model:
        check_name(name)
        if not self.store.model_exists(name):
            raise NotFound(f"model {name!r} is not registered")
        return self._model(name)

    def get_version(self, model: str, version: int) -> Version:
        check_name(model)
        found = self.store.version(model, version)
        if found is None:
            raise NotFound(f"model {model!r} has no version {version}")
        return found

    def routing(self, name: str) -> ModelRouting:
        return ModelRouting(
            model=name,
            versions=self.store.versions(name),
            aliases={a.name: a.version for a in self.store.aliases(name)},
            policy=self.store.policy(name),
        )

    def routing_state(self) -> tuple[int, list[ModelRouting]]:
        return self.store.revision(), [self.routing(name) for name in self.store.model_names()]

    # -- watch -------------------------------------------------------------------------------------
    async def watch(self) -> AsyncIterator[WatchEvent]:
        """The snapshot, then every change. Subscribing and reading the snapshot happen with no await
        in between, so no change is missed or delivered twice."""
        sub: Subscription = self.hub.subscribe()
        metrics.WATCHERS.inc()
        try:
            revision, models = self.routing_state()
            yield WatchEvent(revision=revision, snapshot=models)
            while True:
                event = await sub.next()
                if event.revision > revision:
                    yield event
        finally:
            sub.close()
            metrics.WATCHERS.dec()

    def _changed(self, model: str, revision: int) -> None:
        """After a commit: tell watchers and refresh the gauges."""
        self.hub.publish(WatchEvent(revision=revision, changed=self.routing(model)))
        metrics.record_versions(self.store.versions(model))

    # -- registration ------------------------------------------------------------------------------
    async def register(self, req: RegistrationRequest, chunks: AsyncIterator[bytes]) -> Version:
        """Receive, validate and store a new version; it then loads in the background."""
        artifacts.check_request(req, self.max_artifact_bytes)
        # Claim the model folder first: a folder the registry does not own is refused before any upload.
        self.repository.claim(req.model, self.store.model_exists(req.model))
        upload = Upload(self.repository.new_staging(req.model), req)
        work = None
        version = None
        try:
            async for chunk in chunks:
                upload.write(chunk)
            # Digest check, format validation and fsync of the laid-out folder: off the event loop.
            work = self.executor.submit(self._prepare_artifact, upload)
            art = await asyncio.wrap_future(work)
            artifacts.check_metadata_against(art.signature, req)
            version = self._commit_version(req, art)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted("no space left in the model repository for this artefact") from None
            raise
        finally:
            if work is not None and not work.done():
                # The caller went away mid-validation: let the worker finish with the folder before removing it.
                await asyncio.wait([asyncio.wrap_future(work)])
            upload.discard()
            if version is None and not self.store.model_exists(req.model):
                self.repository.release(req.model)  # no empty folder left for Triton to trip on
        log.info("version registered", extra={"model": req.model, "version": version.version, "sha256": req.sha256})
        self.deployment.load_later(req.model, version.version)
        return version

    def _prepare_artifact(self, upload: Upload) -> artifacts.ValidatedArtifact:
        upload.finish()
        art = artifacts.validate(upload, self.default_max_batch_size, self.max_artifact_bytes)
        fsync_tree(art.version_dir)
        return art

    def _check_compatible(self, req: RegistrationRequest, art: artifacts.ValidatedArtifact) -> None:
        live = [v for v in self.store.versions(req.model) if v.state in LIVE_STATES]
        if not live:
            return
        newest = live[-1]
        problems = []
        if newest.format != req.format:
            problems.append(f"format {req.format.value} != {newest.format.value}")
        problems += art.signature.differences(newest.signature)
        if (newest.max_batch_size > 0) != (art.max_batch_size > 0):
            problems.append(
                "batch dimension "
                + ("present" if art.max_batch_size > 0 else "absent")
                + " but the live versions have it "
                + ("present" if newest.max_batch_size > 0 else "absent")
            )
        if problems:
            raise FailedPrecondition(
                f"version is incompatible with live version {newest.version} of {req.model!r}: "
                f"{'; '.join(problems)}. Archive the live versions or register it under a new model name"
            )

    def _commit_version(self, req: RegistrationRequest, art: artifacts.ValidatedArtifact) -> Version:
        # No await from here to the commit: the compatibility check and the number are atomic.
        self._check_compatible(req, art)
        self.repository.claim(req.model, self.store.model_exists(req.model))
        # A generation version is always served by Router.Generate, whatever the header said (NONE).
        post = (
            Postprocessing(PostprocessingKind.GENERATION)
            if req.format == ArtifactFormat.ORT_GENAI
            else req.postprocessing
        )
        with self.store.transaction() as tx:
            number = self.store.next_version(tx, req.model)
            version = Version(
                model=req.model,
                version=number,
                state=VersionState.REGISTERED,
                format=req.format,
                sha256=req.sha256,
                size_bytes=req.size_bytes,
                signature=art.signature,
                preprocessing=req.preprocessing,
                postprocessing=post,
                labels=req.labels,
                tags=dict(req.tags),
                created_at=time.time(),
                created_by=req.actor,
                description=req.description,
                max_batch_size=art.max_batch_size,
                base_config=art.base_config,
            )
            self.store.insert_version(tx, version)
            revision = self.store.bump_revision(tx)
            self.store.add_audit(
                tx,
                req.actor,
                "version.register",
                f"model/{req.model}",
                req.description,
                json.dumps({"version": number, "sha256": req.sha256, "format": req.format.value}),
            )
            # Rename inside the transaction: a crash before COMMIT leaves a folder start() removes.
            self.repository.promote(art.version_dir, req.model, number)
        self._changed(req.model, revision)
        return version

    def _set_state(
        self,
        model: str,
        version: int,
        state: VersionState,
        reason: str = "",
        load_ms: float | None = None,
        actor: str | None = None,
    ) -> None:
        """`actor` set = a caller's mutation (archive), recorded in the audit log; load progress is not."""
        with self.store.transaction() as tx:
            self.store.set_state(tx, model, version, state, reason, load_ms)
            revision = self.store.bump_revision(tx)
            if actor is not None:
                self.store.add_audit(
                    tx, actor, f"version.{state.value}", f"model/{model}", reason, json.dumps({"version": version})
                )
        self._changed(model, revision)

    # -- aliases -----------------------------------------------------------------------------------
    def require_ready(self, model: str, number: int, what: str) -> Version:
        version = self.store.version(model, number)
        if version is None:
            raise NotFound(f"{what}: model {model!r} has no version {number}")
        if version.state != VersionState.READY:
            raise FailedPrecondition(
                f"{what}: version {number} of {model!r} is {version.state.value}, not ready"
                + (f" ({version.state_reason})" if version.state_reason else "")
            )
        return version

    def move_alias(
        self, model: str, name: str, number: int, actor: str, reason: str, previous: int, action: str = "alias.set"
    ) -> Alias:
        alias = Alias(model, name, number, previous, actor, time.time(), reason)
        with self.store.transaction() as tx:
            self.store.put_alias(tx, alias)
            revision = self.store.bump_revision(tx)
            self.store.add_audit(
                tx,
                actor,
                action,
                f"model/{model}",
                reason,
                json.dumps({"alias": name, "version": number, "previous_version": previous}),
            )
        self._changed(model, revision)
        log.info(
            "alias moved",
            extra={
                "model": model,
                "alias": name,
                "version": number,
                "previous": previous,
                "actor": actor,
                "reason": reason,
            },
        )
        return alias

    async def set_alias(self, model: str, name: str, number: int, actor: str, reason: str) -> Alias:
        check_name(model)
        check_name(name, "alias name")
        self.require_ready(model, number, f"alias {name!r}")
        current = self.store.alias(model, name)
        if current is not None and current.version == number:
            return current
        return self.move_alias(model, name, number, actor, reason, current.version if current else 0)

    async def rollback(self, model: str, name: str, actor: str, reason: str) -> Alias:
        check_name(model)
        name = name or DEFAULT_ALIAS
        check_name(name, "alias name")
        current = self.store.alias(model, name)
        if current is None:
            raise NotFound(f"model {model!r} has no alias {name!r}")
        if current.previous_version == 0:
            raise FailedPrecondition(f"alias {name!r} of {model!r} has never pointed at another version")
        self.require_ready(model, current.previous_version, f"rollback of {name!r}")
        return self.move_alias(
            model, name, current.previous_version, actor, reason or "rollback", current.version, action="alias.rollback"
        )

    # -- traffic policy ----------------------------------------------------------------------------
    def _check_target(self, model: str, target: Target, what: str) -> None:
        if bool(target.alias) == bool(target.version):
            raise InvalidArgument(f"{what}: name exactly one of a version or an alias")
        if target.alias:
            check_name(target.alias, f"{what} alias")
            alias = self.store.alias(model, target.alias)
            if alias is None:
                raise FailedPrecondition(f"{what}: model {model!r} has no alias {target.alias!r}")
            self.require_ready(model, alias.version, what)
        else:
            self.require_ready(model, target.version, what)

    async def set_traffic_policy(
        self, model: str, split: list[Target], shadow: Target | None, shadow_fraction: float, actor: str, reason: str
    ) -> TrafficPolicy:
        check_name(model)
        if not self.store.model_exists(model):
            raise NotFound(f"model {model!r} is not registered")
        seen = set()
        for i, target in enumerate(split):
            self._check_target(model, target, f"split[{i}] ({target.describe()})")
            if target.weight < 0:
                raise InvalidArgument(f"split[{i}]: weight {target.weight} is negative")
            key = (target.version, target.alias)
            if key in seen:
                raise InvalidArgument(f"split[{i}]: {target.describe()} appears twice")
            seen.add(key)
        if split and sum(t.weight for t in split) == 0:
            raise InvalidArgument("split: the weights sum to 0; give at least one target a positive weight")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise InvalidArgument(f"shadow fraction {shadow_fraction} is outside [0, 1]")
        if shadow is not None:
            self._check_target(model, shadow, f"shadow ({shadow.describe()})")
        elif shadow_fraction > 0:
            raise InvalidArgument("shadow fraction is set but no shadow target is")
        policy = TrafficPolicy(
            model=model,
            split=tuple(split),
            shadow=shadow,
            shadow_fraction=shadow_fraction,
            updated_by=actor,
            updated_at=time.time(),
            reason=reason,
        )
        with self.store.transaction() as tx:
            self.store.put_policy(tx, policy)
            revision = self.store.bump_revision(tx)
            self.store.add_audit(
                tx,
                actor,
                "traffic.set",
                f"model/{model}",
                reason,
                json.dumps(
                    {
                        "split": [t.describe() + f"={t.weight}" for t in split],
                        "shadow": shadow.describe() if shadow else None,
                        "shadow_fraction": shadow_fraction,
                    }
                ),
            )
        self._changed(model, revision)
        return policy

    # -- archive -----------------------------------------------------------------------------------
    async def archive(self, model: str, number: int, actor: str, reason: str) -> Version:
        check_name(model)
        async with self.deployment.lock(model):
            version = self.get_version(model, number)
            if version.state == VersionState.ARCHIVED:
                return version
            aliases = [a.name for a in self.store.aliases(model) if a.version == number]
            if aliases:
                raise FailedPrecondition(
                    f"version {number} of {model!r} is pointed at by alias(es) {', '.join(aliases)}; move them first"
                )
            policy = self.store.policy(model)
            referenced = [
                t for t in (*policy.split, *([policy.shadow] if policy.shadow else [])) if t.version == number
            ]
            if referenced:
                raise FailedPrecondition(f"version {number} of {model!r} is in the traffic policy; change it first")
            was_live = version.state == VersionState.READY
            self._set_state(
                model,
                number,
                VersionState.ARCHIVED,
                reason or f"archived by {actor or 'unknown'}",
                actor=actor or "unknown",
            )
            if was_live:
                await self.deployment.apply(model, self.deployment.ready_versions(model))
            log.info("version archived", extra={"model": model, "version": number, "actor": actor})
            return self.store.version(model, number)

    # -- shadow statistics -------------------------------------------------------------------------
    def report_shadow_results(self, results: list[ShadowResult]) -> None:
        for r in results:
            check_name(r.model)
            if r.items and r.top1_agreed > r.items:
                raise InvalidArgument(f"{r.model}: top1_agreed {r.top1_agreed} > items {r.items}")
            for name in ("cosine_sum", "primary_latency_ms", "shadow_latency_ms", "top5_overlap_sum"):
                if not math.isfinite(getattr(r, name)):  # NaN would reach SQLite as NULL
                    raise InvalidArgument(f"{r.model}: {name} is {getattr(r, name)}, not a finite number")
            shadow_report.check_result(r)
        kinds = {}
        for key in {(r.model, r.primary_version) for r in results}:
            primary = self.store.version(*key)
            kinds[key] = shadow_report.KINDS.get(primary.postprocessing.kind, "tensor") if primary else "tensor"
        with self.store.transaction() as tx:
            self.store.add_shadow_results(tx, results)
            self.shadow_reports.add(tx, results, kinds)
        agreement = {}
        for model in {r.model for r in results}:
            versions = {v.version: v for v in self.store.versions(model)}
            for s in self.store.shadow_stats(model):
                primary = versions.get(s.primary_version)
                kind = primary.postprocessing.kind if primary else None
                agreement[(model, s.primary_version, s.shadow_version)] = metrics.agreement_value(
                    kind, s.top1_agreement, s.mean_cosine
                )
        metrics.record_shadow(results, agreement)
