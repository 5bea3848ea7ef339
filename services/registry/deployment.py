"""Keeps every Triton replica serving exactly each model's live versions.

A model has one Triton config listing all its live versions, so loads (with warm-up), unloads and
repairs of a model run one at a time under that model's lock. Also: start-up reconciliation (Triton
may have restarted with the registry), a watchdog that repairs drifted replicas, and admitting a new
replica only once it serves every live version.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from services.registry.domain import VersionState
from services.registry.repository import ModelRepository
from services.registry.store import Store
from services.registry.triton_fleet import TritonFleet
from services.registry.tritonconfig import LABELS_FILE, model_config, to_pbtxt

log = logging.getLogger(__name__)

# set_state(model, version, state, reason="", load_ms=None): commits the state and tells watchers.
SetState = Callable[..., None]


class Deployment:
    def __init__(self, store: Store, repository: ModelRepository, fleet: TritonFleet, set_state: SetState, *,
                 load_timeout: float, reconcile_interval: float = 0.0):
        self.store = store
        self.repository = repository
        self.fleet = fleet
        self._set_state = set_state
        self.load_timeout = load_timeout
        self.reconcile_interval = reconcile_interval
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watchdog_task: asyncio.Task | None = None
        self._wanted_replicas: list[str] | None = None  # the last set given to set_replicas

    async def start(self) -> None:
        for name in self.store.model_names():
            pending = [v.version for v in self.store.versions(name)
                       if v.state in (VersionState.REGISTERED, VersionState.LOADING)]
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

    def _write_config(self, model: str, live: list[int]):
        """Write <model>/config.pbtxt (and labels.txt) for `live`; returns the config (None when nothing is live)."""
        if not live:
            return None
        versions = {v.version: v for v in self.store.versions(model)}
        labelled = next((versions[v] for v in sorted(live, reverse=True) if versions[v].labels), None)
        if labelled is not None:
            self.repository.write_file(model, LABELS_FILE, "\n".join(labelled.labels) + "\n")
        config = model_config(model, versions[max(live)], live, with_labels=labelled is not None)
        self.repository.write_file(model, "config.pbtxt", to_pbtxt(config))
        return config

    async def apply(self, model: str, live: list[int], addresses: list[str] | None = None) -> None:
        """Make every Triton replica (or those in `addresses`) serve exactly the `live` versions."""
        config = self._write_config(model, live)
        await asyncio.wait_for(self.fleet.apply(model, config, live, addresses), self.load_timeout)

    def ready_versions(self, model: str) -> list[int]:
        return [v.version for v in self.store.versions(model) if v.state == VersionState.READY]

    async def load(self, model: str, number: int) -> None:
        async with self.lock(model):
            version = self.store.version(model, number)
            if version is None or version.state not in (VersionState.REGISTERED, VersionState.LOADING):
                return
            self._set_state(model, number, VersionState.LOADING)
            try:
                await self.apply(model, sorted({*self.ready_versions(model), number}))
                await asyncio.wait_for(
                    self.fleet.warm_up(model, number, version.signature, version.max_batch_size), self.load_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any load failure fails the version, with the reason
                reason = str(exc) or type(exc).__name__
                log.warning("version failed to load", extra={"model": model, "version": number, "reason": reason})
                self._set_state(model, number, VersionState.FAILED, reason)
                try:
                    await self.apply(model, self.ready_versions(model))
                except Exception:  # noqa: BLE001
                    log.exception("could not restore the live versions", extra={"model": model})
                return
            load_ms = (time.time() - version.created_at) * 1000.0
            self._set_state(model, number, VersionState.READY, load_ms=load_ms)
            log.info("version ready", extra={"model": model, "version": number, "load_ms": round(load_ms, 1)})

    async def _reconcile(self, model: str, pending: list[int]) -> None:
        """At start-up: Triton may have restarted too, so re-apply the ready set, then finish pending loads."""
        async with self.lock(model):
            if not await self.fleet.wait_reachable(self.load_timeout):
                log.warning("Triton unreachable at start-up; loading anyway", extra={"replicas": self.fleet.addresses})
            ready = self.ready_versions(model)
            try:
                await self.apply(model, ready)
            except Exception:  # noqa: BLE001 - keep the registry up; the next mutation retries
                log.exception("could not load the live versions at start-up", extra={"model": model, "live": ready})
        for number in pending:
            await self.load(model, number)

    async def reconcile_replicas(self) -> list[tuple[str, str]]:
        """Re-apply the live versions on replicas that drifted (a restarted Triton has nothing loaded).
        Returns the (replica, model) pairs repaired."""
        repaired = []
        snapshot = await self.fleet.ready_versions()
        for name in self.store.model_names():
            for address, models in snapshot.items():
                if models.get(name, set()) == set(self.ready_versions(name)):
                    continue
                async with self.lock(name):  # re-check under the lock: a load may have been under way
                    ready = self.ready_versions(name)
                    if address not in self.fleet.addresses or await self.fleet.ready_on(address, name) == set(ready):
                        continue
                    log.warning("Triton replica drifted from the live versions; re-applying",
                                extra={"replica": address, "model": name, "live": ready})
                    await self.apply(name, ready, [address])
                    repaired.append((address, name))
        return repaired

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                if self._wanted_replicas is not None and sorted(self.fleet.addresses) != self._wanted_replicas:
                    await self.set_replicas(self._wanted_replicas)
                await self.reconcile_replicas()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an unreachable replica is retried next round
                log.warning("reconciling Triton replicas failed", exc_info=True)

    def desired_state(self) -> dict[str, tuple[object, list[int]]]:
        """{model: (config, ready versions)} — what a new Triton replica must load before it joins."""
        out = {}
        for name in self.store.model_names():
            ready = self.ready_versions(name)
            if ready:
                versions = {v.version: v for v in self.store.versions(name)}
                labelled = any(versions[v].labels for v in ready)
                out[name] = (model_config(name, versions[max(ready)], ready, labelled), ready)
        return out

    async def set_replicas(self, addresses) -> None:
        """Follow a new set of Triton replicas (e.g. from EndpointSlices). A new replica first loads every
        live version and only then joins; one that cannot is retried by the watchdog."""
        self._wanted_replicas = sorted(set(addresses))
        # Hold every model's lock: no load may run while the fleet changes under it.
        async with contextlib.AsyncExitStack() as stack:
            for name in sorted(self.store.model_names()):
                await stack.enter_async_context(self.lock(name))
            await self.fleet.set_replicas(self._wanted_replicas, self.desired_state())
