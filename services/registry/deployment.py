"""Keeps every Triton replica serving exactly each model's live versions.

A model has one Triton config listing all its live versions, so loads (with warm-up), unloads and
repairs of a model run one at a time under that model's lock. Also: start-up reconciliation (Triton
may have restarted with the registry), a watchdog that repairs drifted replicas, and catching up a
replica that joins (from EndpointSlices): it receives every load from the moment it joins, and each
model's live versions are applied to it under that model's lock.

<model>/config.pbtxt on disk always lists exactly the READY versions (rewritten atomically, with no
await between the state commit and the write): a replica started with `--load-model=*` comes up with
the live versions. A version being loaded reaches Triton through the load API's config override only.

Repairs (start-up, the watchdog after a Triton restart) reload models `reload_concurrency` at once
(MAAS_RELOAD_CONCURRENCY; 1 by default: CPU-bound loads only slow each other down on a small CPU
Triton), smallest artefacts first, so a large one (a chat model) does not hold up the others.

With no Triton replica at all, a version stays REGISTERED ("waiting for a Triton replica") and loads
when the first replica joins: the artefact is safely stored, and READY always means "served".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.registry.domain import ArtifactFormat, VersionState
from services.registry.repository import ModelRepository
from services.registry.store import Store
from services.registry.triton_fleet import TritonError, TritonFleet
from services.registry.tritonconfig import LABELS_FILE, model_config, to_pbtxt
from services.shared.config import DEFAULT_RELOAD_CONCURRENCY

log = logging.getLogger(__name__)

# set_state(model, version, state, reason="", load_ms=None): commits the state and tells watchers.
SetState = Callable[..., None]


class Deployment:
    def __init__(
        self,
        store: Store,
        repository: ModelRepository,
        fleet: TritonFleet,
        set_state: SetState,
        *,
        load_timeout: float,
        reconcile_interval: float = 0.0,
        reload_concurrency: int = DEFAULT_RELOAD_CONCURRENCY,
    ):
        self.store = store
        self.repository = repository
        self.fleet = fleet
        self._set_state = set_state
        self.load_timeout = load_timeout
        self.reconcile_interval = reconcile_interval
        self._reloads = asyncio.Semaphore(max(1, reload_concurrency))  # repairs loading at once
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watchdog_task: asyncio.Task | None = None
        self._wanted_replicas: list[str] | None = None  # the last set given to set_replicas
        self._membership = asyncio.Lock()  # one set_replicas at a time (the watcher and the watchdog)
        self._started = False

    async def start(self) -> None:
        self._started = True
        for name in self.reload_order():
            pending = [
                v.version
                for v in self.store.versions(name)
                if v.state in (VersionState.REGISTERED, VersionState.LOADING)
            ]
            self._spawn(self._reconcile(name, pending))
        if self.reconcile_interval > 0:
            self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog())

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._watchdog_task] if self._watchdog_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fleet.close()

    async def wait_idle(self) -> None:
        """Wait for background loads (tests, bench)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    def load_later(self, model: str, number: int) -> None:
        """Load a just-registered version in the background."""
        self._spawn(self.load(model, number))

    def _config(self, model: str, live: list[int], write_labels: bool):
        """Triton config serving `live` (None when nothing is); `write_labels` also refreshes labels.txt."""
        if not live:
            return None
        versions = {v.version: v for v in self.store.versions(model)}
        labelled = next((versions[v] for v in sorted(live, reverse=True) if versions[v].labels), None)
        if labelled is not None and write_labels:
            self.repository.write_file(model, LABELS_FILE, "\n".join(labelled.labels) + "\n")
        return model_config(model, versions[max(live)], live, with_labels=labelled is not None)

    def write_disk_config(self, model: str) -> None:
        """<model>/config.pbtxt := the READY versions. With none, the last one stays: Triton refuses a
        policy with no version, and a replica that loads the stale one is corrected when it joins."""
        config = self._config(model, self.ready_versions(model), write_labels=False)
        if config is not None:
            self.repository.write_file(model, "config.pbtxt", to_pbtxt(config))

    async def apply(self, model: str, live: list[int], addresses: list[str] | None = None) -> None:
        """Make every Triton replica (or those in `addresses`) serve exactly the `live` versions."""
        config = self._config(model, live, write_labels=True)
        self.write_disk_config(model)
        await asyncio.wait_for(self.fleet.apply(model, config, live, addresses), self.load_timeout)

    def ready_versions(self, model: str) -> list[int]:
        return [v.version for v in self.store.versions(model) if v.state == VersionState.READY]

    async def load(self, model: str, number: int) -> None:
        async with self.lock(model):
            version = self.store.version(model, number)
            if version is None or version.state not in (VersionState.REGISTERED, VersionState.LOADING):
                return
            if not self.fleet.members:
                self._wait_for_replica(version)
                return
            self._set_state(model, number, VersionState.LOADING)
            try:
                await self.apply(model, sorted({*self.ready_versions(model), number}))
                served = await asyncio.wait_for(
                    self.fleet.warm_up(
                        model,
                        number,
                        version.signature,
                        version.max_batch_size,
                        generation=version.format == ArtifactFormat.ORT_GENAI,
                    ),
                    self.load_timeout,
                )
                if not served:
                    # Every replica left (or only newcomers remain, caught up without this version) mid-load.
                    self._wait_for_replica(version)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any load failure fails the version, with the reason
                reason = str(exc) or type(exc).__name__
                log.warning("version failed to load", extra={"model": model, "version": number, "reason": reason})
                self._set_state(model, number, VersionState.FAILED, reason)
                try:
                    await self.apply(model, self.ready_versions(model))
                except Exception:
                    log.exception("could not restore the live versions", extra={"model": model})
                return
            load_ms = (time.time() - version.created_at) * 1000.0
            self._set_state(model, number, VersionState.READY, load_ms=load_ms)
            self.write_disk_config(model)  # no await since the commit: the file never lags the state
            log.info("version ready", extra={"model": model, "version": number, "load_ms": round(load_ms, 1)})

    def _wait_for_replica(self, version) -> None:
        """Leave the version REGISTERED until a replica joins (set_replicas loads it then)."""
        reason = "waiting for a Triton replica to load it on"
        if version.state != VersionState.REGISTERED or version.state_reason != reason:
            self._set_state(version.model, version.version, VersionState.REGISTERED, reason)
        log.warning(
            "no Triton replica to load on; the version waits for one",
            extra={"model": version.model, "version": version.version},
        )

    def _load_pending(self) -> None:
        """Load every REGISTERED/LOADING version in the background (idempotent: load() re-checks the state)."""
        for name in self.store.model_names():
            for v in self.store.versions(name):
                if v.state in (VersionState.REGISTERED, VersionState.LOADING):
                    self.load_later(name, v.version)

    async def _reconcile(self, model: str, pending: list[int]) -> None:
        """At start-up: Triton may have restarted too, so re-apply the ready set, then finish pending loads."""
        async with self.lock(model):
            if not await self.fleet.wait_reachable(self.load_timeout):
                log.warning("Triton unreachable at start-up; loading anyway", extra={"replicas": self.fleet.addresses})
            ready = self.ready_versions(model)
            try:
                async with self._reloads:
                    await self.apply(model, ready)
            except Exception:  # keep the registry up; the next mutation retries
                log.exception("could not load the live versions at start-up", extra={"model": model, "live": ready})
        for number in pending:
            await self.load(model, number)

    def reload_order(self) -> list[str]:
        """Model names, the ones quickest to load again (smallest live artefacts) first."""

        def size(name: str) -> int:
            return sum(v.size_bytes for v in self.store.versions(name) if v.state == VersionState.READY)

        return sorted(self.store.model_names(), key=lambda name: (size(name), name))

    async def reconcile_replicas(self) -> list[tuple[str, str]]:
        """Re-apply the live versions on replicas that drifted (a restarted Triton has nothing loaded),
        `reload_concurrency` models at once. Returns the (replica, model) pairs repaired; a repair that
        fails is logged and retried on the next round, the others go on."""
        snapshot = await self.fleet.ready_versions()
        drifted = [
            (address, name)
            for name in self.reload_order()
            for address, models in snapshot.items()
            if models.get(name, set()) != set(self.ready_versions(name))
        ]

        async def repair(address: str, name: str) -> bool:
            async with self.lock(name):  # re-check under the lock: a load may have been under way
                ready = self.ready_versions(name)
                if address not in self.fleet.addresses or await self.fleet.ready_on(address, name) == set(ready):
                    return False
                log.warning(
                    "Triton replica drifted from the live versions; re-applying",
                    extra={"replica": address, "model": name, "live": ready},
                )
                async with self._reloads:  # taken under the model's lock: a waiting model holds no slot
                    await self.apply(name, ready, [address])
                return True

        done = await asyncio.gather(*(repair(a, n) for a, n in drifted), return_exceptions=True)
        for (address, name), outcome in zip(drifted, done):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                log.warning(
                    "could not re-apply the live versions; next round retries",
                    extra={"replica": address, "model": name, "reason": str(outcome) or type(outcome).__name__},
                )
        return [pair for pair, outcome in zip(drifted, done) if outcome is True]

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                if self._wanted_replicas is not None and sorted(self.fleet.members) != self._wanted_replicas:
                    await self.set_replicas(self._wanted_replicas)
                await self.reconcile_replicas()
            except asyncio.CancelledError:
                raise
            except Exception:  # an unreachable replica is retried next round
                log.warning("reconciling Triton replicas failed", exc_info=True)

    async def set_replicas(self, addresses) -> None:
        """Follow a new set of Triton replicas (e.g. from EndpointSlices). A new replica joins the fleet at
        once (so it gets every load from now on), then each model's live versions are applied to it under
        that model's lock. A replica that cannot catch up is dropped and TritonError raised: the caller
        (the watcher, or the watchdog) hands the set over again later."""
        async with self._membership:
            self._wanted_replicas = sorted(set(addresses))
            for address in [a for a in self.fleet.members if a not in self._wanted_replicas]:
                await self.fleet.remove_replica(address)
                log.info("triton replica left", extra={"address": address})
            models = sorted(self.store.model_names())
            added = self.fleet.add_replicas(self._wanted_replicas, models)
            failed: dict[str, str] = {}
            for name in models:
                async with self.lock(name):
                    for address in added:
                        if address in failed:
                            continue
                        try:
                            await self._catch_up(address, name)
                        except Exception as exc:  # noqa: BLE001 - one bad replica must not stop the others
                            failed[address] = f"{name}: {exc}"
                            await self.fleet.remove_replica(address)
            for address in added:
                if address not in failed:
                    log.info("triton replica joined", extra={"address": address})
        if added and self._started:
            self._load_pending()  # versions that waited for a replica, or lost theirs mid-load
        if failed:
            raise TritonError(
                "Triton replica(s) could not load the live versions, left out for now: "
                + "; ".join(f"{a} ({why})" for a, why in sorted(failed.items()))
            )

    async def _catch_up(self, address: str, model: str) -> None:
        """Under the model's lock: make the new replica serve the model's live versions, then mark it so."""
        ready = self.ready_versions(model)
        # A replica started with --load-model=* usually has them already (the config on disk lists them).
        if await self.fleet.ready_on(address, model) != set(ready):
            await self.apply(model, ready, [address])
        self.fleet.caught_up(address, model)
