"""TritonReplicaWatcher against the fake Kubernetes API (in-process HTTP server, the real client)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.shared.discovery import TritonReplicaWatcher

NS = "models"
SERVICE = "rel-maas-mesh-triton-headless"
WAIT = 10.0


class Changes:
    """on_change callback recording every set it is handed."""

    def __init__(self):
        self.queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()
        self.seen: list[frozenset[str]] = []

    async def __call__(self, addresses: frozenset[str]) -> None:
        self.seen.append(addresses)
        await self.queue.put(addresses)

    async def next(self) -> frozenset[str]:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def until(self, expected: set[str]) -> None:
        """Wait for `expected` (intermediate sets may come first: the watcher reports every change)."""
        while await self.next() != expected:
            pass


def put(fake_kube, name, port, *endpoints, service=SERVICE, namespace=NS):
    fake_kube.put_slice(namespace, name, service=service, port=port, endpoints=list(endpoints))


@pytest.fixture
async def watch(fake_kube):
    """Start a watcher on the fake; yields (watcher, changes); always stopped."""
    started = []

    async def start(**kwargs):
        kwargs.setdefault("backoff_initial_seconds", 0.05)
        kwargs.setdefault("backoff_max_seconds", 0.2)
        watcher = TritonReplicaWatcher(SERVICE, NS, api_client=fake_kube.api_client(), **kwargs)
        changes = Changes()
        started.append(watcher)
        await watcher.start(changes)
        return watcher, changes

    try:
        yield start
    finally:
        for watcher in started:
            await watcher.stop()


async def test_initial_list_reports_ready_replicas_of_this_service_only(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None))
    put(fake_kube, "other", 8001, ("10.9.9.9", True), service="something-else")
    put(fake_kube, "elsewhere", 8001, ("10.8.8.8", True), namespace="other-ns")
    watcher, changes = await watch()
    assert await watcher.wait_synced(WAIT) == {"10.0.0.1:8001", "10.0.0.3:8001"}
    assert changes.seen == [frozenset({"10.0.0.1:8001", "10.0.0.3:8001"})]
    assert fake_kube.lists()[0].query["labelSelector"] == f"kubernetes.io/service-name={SERVICE}"


async def test_empty_service_is_reported_once(fake_kube, watch):
    watcher, changes = await watch()
    assert await changes.next() == frozenset()
    assert await watcher.wait_synced(WAIT) == frozenset()


async def test_replicas_appear_become_unready_and_disappear(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    watcher, changes = await watch()
    assert await changes.next() == {"10.0.0.1:8001"}
    fake_kube.wait_for(lambda k: k.open_watches == 1)

    put(fake_kube, "b", 8001, ("10.0.0.2", False))  # not ready yet: no change reported
    put(fake_kube, "b", 8001, ("10.0.0.2", True))  # ready
    assert await changes.next() == {"10.0.0.1:8001", "10.0.0.2:8001"}
    put(fake_kube, "a", 8001, ("10.0.0.1", False))  # failing readiness probe
    assert await changes.next() == {"10.0.0.2:8001"}
    fake_kube.delete_slice(NS, "b")
    assert await changes.next() == frozenset()
    assert watcher.addresses == frozenset()
    assert len(fake_kube.lists()) == 1  # all of it over one watch


async def test_expired_watch_relists_and_keeps_changes_made_meanwhile(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    watcher, changes = await watch()
    assert await changes.next() == {"10.0.0.1:8001"}
    fake_kube.wait_for(lambda k: k.open_watches == 1)

    fake_kube.drop_watches()  # the watcher is away...
    put(fake_kube, "b", 8001, ("10.0.0.2", True))  # ...while this happens...
    fake_kube.expire_history()  # ...and the history is compacted
    await changes.until({"10.0.0.1:8001", "10.0.0.2:8001"})
    assert len(fake_kube.lists()) == 2  # it re-listed after 410 Gone
    assert watcher.relists == 2

    fake_kube.wait_for(lambda k: k.open_watches == 1)
    fake_kube.expire_history()  # 410 on an open watch (ERROR event)
    fake_kube.wait_for(lambda k: len(k.lists()) == 3)
    fake_kube.wait_for(lambda k: k.open_watches == 1)
    fake_kube.delete_slice(NS, "a")
    assert await changes.next() == {"10.0.0.2:8001"}


async def test_dropped_connection_resumes_from_the_last_version_without_relisting(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    watcher, changes = await watch()
    assert await changes.next() == {"10.0.0.1:8001"}
    fake_kube.wait_for(lambda k: k.open_watches == 1)
    seen_version = fake_kube.resource_version

    fake_kube.drop_watches()
    put(fake_kube, "b", 8001, ("10.0.0.2", True))  # happens while disconnected
    assert await changes.next() == {"10.0.0.1:8001", "10.0.0.2:8001"}
    assert len(fake_kube.lists()) == 1
    resumed = fake_kube.watches()[-1]
    assert resumed.query["resourceVersion"] == str(seen_version)


async def test_server_side_watch_timeout_rewatches(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    watcher, changes = await watch(watch_timeout_seconds=1)
    assert await changes.next() == {"10.0.0.1:8001"}
    fake_kube.wait_for(lambda k: len(k.watches()) >= 2, timeout=WAIT)  # the first watch ended cleanly
    assert fake_kube.watches()[0].query["timeoutSeconds"] == "1"
    put(fake_kube, "b", 8001, ("10.0.0.2", True))
    assert await changes.next() == {"10.0.0.1:8001", "10.0.0.2:8001"}
    assert len(fake_kube.lists()) == 1


async def test_api_errors_back_off_then_recover(fake_kube, watch):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    fake_kube.fail_next(500, times=2)
    fake_kube.fail_next(403)
    watcher, changes = await watch()
    assert await changes.next() == {"10.0.0.1:8001"}
    assert len(fake_kube.lists()) == 4  # three refused, then the one that worked

    fake_kube.wait_for(lambda k: k.open_watches == 1)
    fake_kube.fail_next(503, times=3)  # the re-watches fail for a while
    fake_kube.drop_watches()
    put(fake_kube, "a", 8001, ("10.0.0.1", True), ("10.0.0.5", True))
    assert await changes.next() == {"10.0.0.1:8001", "10.0.0.5:8001"}


async def test_unreachable_api_reports_nothing_and_still_stops(fake_kube, watch):
    fake_kube.stop()  # connection refused from now on
    watcher, changes = await watch(backoff_max_seconds=0.1)
    with pytest.raises(asyncio.TimeoutError):
        await watcher.wait_synced(0.5)
    assert changes.seen == [] and watcher._thread.is_alive()  # still retrying
    await watcher.stop()
    assert not watcher._thread.is_alive()


async def test_failing_callback_is_retried_with_the_current_set(fake_kube):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    calls = []

    async def flaky(addresses):
        calls.append(addresses)
        if len(calls) < 3:
            raise RuntimeError("replica not loadable yet")

    watcher = TritonReplicaWatcher(
        SERVICE, NS, api_client=fake_kube.api_client(), backoff_initial_seconds=0.02, backoff_max_seconds=0.05
    )
    await watcher.start(flaky)
    try:
        await watcher.wait_synced(WAIT)
        deadline = time.monotonic() + WAIT
        while len(calls) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert calls == [frozenset({"10.0.0.1:8001"})] * 3
        await asyncio.sleep(0.2)
        assert len(calls) == 3  # delivered: no more retries
    finally:
        await watcher.stop()


async def test_slow_callback_gets_only_the_newest_set(fake_kube):
    put(fake_kube, "a", 8001, ("10.0.0.1", True))
    calls, release = [], asyncio.Event()

    async def slow(addresses):
        calls.append(addresses)
        await release.wait()

    watcher = TritonReplicaWatcher(SERVICE, NS, api_client=fake_kube.api_client())
    await watcher.start(slow)
    try:
        while not calls:
            await asyncio.sleep(0.01)
        fake_kube.wait_for(lambda k: k.open_watches == 1)
        for i in range(2, 6):  # four changes while the callback is busy
            put(fake_kube, f"s{i}", 8001, (f"10.0.0.{i}", True))
        final = {f"10.0.0.{i}:8001" for i in range(1, 6)}
        deadline = time.monotonic() + WAIT
        while watcher.addresses != final and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        release.set()
        while len(calls) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert calls == [frozenset({"10.0.0.1:8001"}), frozenset(final)]
    finally:
        await watcher.stop()


async def test_stop_is_prompt_during_an_open_watch(fake_kube, watch):
    watcher, changes = await watch()
    await watcher.wait_synced(WAIT)
    fake_kube.wait_for(lambda k: k.open_watches == 1)
    await watcher.stop()  # no waiting for the 300 s watch timeout:
    assert not watcher._thread.is_alive()  # stop() gives up on the thread after 10 s
    fake_kube.wait_for(lambda k: k.open_watches == 0)
