"""ReplicaPool: channels follow the discovered replicas; calls go to the less busy; admission gates joins."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.shared.errors import Unavailable
from services.shared.replica_pool import ReplicaPool


class FakeChannel:
    def __init__(self, address: str):
        self.address = address
        self.closed_with: list[float | None] = []

    async def close(self, grace: float | None = None) -> None:
        self.closed_with.append(grace)


class Channels:
    """connect() for the pool, remembering every channel it opened."""

    def __init__(self):
        self.opened: dict[str, FakeChannel] = {}

    def __call__(self, address: str) -> FakeChannel:
        self.opened[address] = FakeChannel(address)
        return self.opened[address]


@pytest.fixture
async def pools():
    made = []

    def make(**kwargs) -> tuple[ReplicaPool, Channels]:
        channels = Channels()
        pool = ReplicaPool("triton", connect=channels, **kwargs)
        made.append(pool)
        return pool, channels

    try:
        yield make
    finally:
        for pool in made:
            await pool.close()


async def test_empty_pool_is_unavailable(pools):
    pool, _ = pools()
    with pytest.raises(Unavailable, match="no triton replica is ready"):
        pool.pick()


async def test_channels_follow_the_replica_set(pools):
    pool, channels = pools(close_grace=7.0)
    await pool.set_replicas({"a:1", "b:1"})
    assert pool.addresses == {"a:1", "b:1"} and set(channels.opened) == {"a:1", "b:1"}
    first_b = channels.opened["b:1"]

    await pool.set_replicas({"b:1", "c:1"})
    await asyncio.sleep(0)  # the retired channel closes in the background
    assert pool.addresses == {"b:1", "c:1"}
    assert channels.opened["a:1"].closed_with == [7.0]  # in-flight calls get the grace
    assert channels.opened["b:1"] is first_b and first_b.closed_with == []  # kept, not reopened

    await pool.close()
    assert pool.addresses == frozenset() and first_b.closed_with == [None]


async def test_calls_go_to_the_less_busy_replica(pools):
    pool, _ = pools()
    await pool.set_replicas({"a:1", "b:1"})
    with pool.lease() as busy:
        # With two replicas both are sampled, so the idle one always wins.
        picks = Counter(pool.pick().address for _ in range(50))
        assert picks == {({"a:1", "b:1"} - {busy.address}).pop(): 50}
        assert busy.inflight == 1
    assert busy.inflight == 0


async def test_idle_replicas_share_the_calls(pools):
    pool, _ = pools()
    await pool.set_replicas({f"r{i}:1" for i in range(4)})
    for _ in range(400):
        with pool.lease():
            pass
    calls = [r.calls for r in pool.replicas()]
    assert sum(calls) == 400 and min(calls) > 0  # every replica is used


async def test_stubs_are_built_once_per_replica(pools):
    pool, _ = pools()
    await pool.set_replicas({"a:1"})
    built = []

    def factory(channel):
        built.append(channel)
        return object()

    with pool.lease() as r:
        first = r.stub(factory)
    with pool.lease() as r:
        assert r.stub(factory) is first
    assert len(built) == 1


async def test_admission_gates_new_replicas(pools):
    loaded: set[str] = set()

    async def admit(address, channel):
        return address in loaded

    pool, _ = pools(admit=admit, admit_interval=0.01)
    await pool.set_replicas({"a:1", "b:1"})
    await asyncio.sleep(0.05)
    assert pool.addresses == frozenset()
    with pytest.raises(Unavailable, match="2 starting"):
        pool.pick()
    loaded.add("b:1")
    while pool.addresses != {"b:1"}:
        await asyncio.sleep(0.01)
    loaded.add("a:1")
    while pool.addresses != {"a:1", "b:1"}:
        await asyncio.sleep(0.01)


async def test_failing_admission_check_is_retried_and_cancelled_when_the_replica_leaves(pools):
    attempts = []

    async def admit(address, channel):
        attempts.append(address)
        raise ConnectionError("not up yet")

    pool, channels = pools(admit=admit, admit_interval=0.01)
    await pool.set_replicas({"a:1"})
    while len(attempts) < 3:
        await asyncio.sleep(0.01)
    await pool.set_replicas(set())
    await asyncio.sleep(0.05)
    count = len(attempts)
    await asyncio.sleep(0.05)
    assert len(attempts) == count  # no more probing
    assert channels.opened["a:1"].closed_with  # and its channel is closed
