"""Long-lived gRPC channels to every replica of a peer, with calls spread over them.

A ClusterIP Service balances connections, not calls: one long-lived HTTP/2 channel to it sends every
request to the same pod. The pool keeps one channel per replica (fed by a discovery source, see
services.shared.discovery) and hands out the one with fewer calls in flight of two picked at random
("power of two choices": near least-loaded, without a global scan or herding on one replica).

    pool = ReplicaPool("triton", admit=has_live_versions)
    await source.start(pool.set_replicas)
    with pool.lease() as replica:
        stub = replica.stub(service_pb2_grpc.GRPCInferenceServiceStub)
        await stub.ModelInfer(request, timeout=...)

`admit(address, channel)` (optional) gates a new replica until it can really serve - e.g. until the
registry has loaded the live model versions on it; it is polled every `admit_interval` seconds.

Outlier ejection and a retry budget (services.shared.outlier): callers report each call's outcome
(`report`); a replica failing too many calls in a row leaves the serving set for a while and comes
back once `probe` (default: `admit`, else the channel connects) passes. Callers retry another replica
only while `try_retry()` allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.shared.channels import open_channel
from services.shared.config import OutlierSettings, RetryBudgetSettings
from services.shared.errors import Unavailable
from services.shared.outlier import OutlierDetector, RetryBudget

log = logging.getLogger(__name__)

S = TypeVar("S")
Admit = Callable[[str, grpc.aio.Channel], Awaitable[bool]]

POOL_REPLICAS = Gauge("maas_replica_pool_replicas", "Replicas calls are spread over", ["pool"])
POOL_EJECTED = Gauge("maas_replica_pool_ejected_replicas", "Replicas ejected (outlier detection) right now", ["pool"])
POOL_EJECTIONS = Counter("maas_replica_pool_ejections", "Replicas ejected for failing calls in a row", ["pool"])
POOL_RETRIES = Counter("maas_replica_pool_retries", "Calls sent again to another replica", ["pool"])
POOL_BUDGET_REFUSALS = Counter(
    "maas_replica_pool_retry_budget_refusals", "Retries not made because the retry budget was spent", ["pool"]
)


class Replica:
    """One replica's channel, its in-flight call count and stubs built on the channel (built once)."""

    def __init__(self, address: str, channel: grpc.aio.Channel):
        self.address = address
        self.channel = channel
        self.inflight = 0
        self.calls = 0
        self._stubs: dict[Any, Any] = {}

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """One call on this replica: in its in-flight count (what pick() balances on) until the block
        ends, and in its call total."""
        self.inflight += 1
        self.calls += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def stub(self, factory: Callable[[grpc.aio.Channel], S]) -> S:
        """factory(channel), cached by factory: pass a stub class or module-level function, not a new lambda."""
        if factory not in self._stubs:
            self._stubs[factory] = factory(self.channel)
        return self._stubs[factory]


class ReplicaPool:
    def __init__(
        self,
        name: str,
        *,
        connect: Callable[[str], grpc.aio.Channel] = open_channel,
        admit: Admit | None = None,
        admit_interval: float = 1.0,
        close_grace: float = 30.0,
        outlier: OutlierSettings | None = None,
        retry_budget: RetryBudgetSettings | None = None,
        probe: Admit | None = None,
    ):
        self.name = name
        self._connect = connect
        self._admit = admit
        self._admit_interval = admit_interval
        self._close_grace = close_grace
        self._known: dict[str, Replica] = {}  # every reported replica, admitted or not
        self._serving: list[Replica] = []  # admitted: calls go here
        self._pending: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self.listeners: list[Callable[[], None]] = []  # called when the serving set changes
        self.outlier_settings = outlier or OutlierSettings()
        self.outliers = OutlierDetector(self.outlier_settings)
        self.budget = RetryBudget(retry_budget or RetryBudgetSettings())
        self._probe = probe or admit or _connects
        self._ejected: dict[str, asyncio.Task] = {}  # address -> the task that probes it back

    @property
    def addresses(self) -> frozenset[str]:
        """Replicas calls are spread over now."""
        return frozenset(r.address for r in self._serving)

    def replicas(self) -> list[Replica]:
        return list(self._serving)

    def known(self) -> dict[str, Replica]:
        """Every replica discovery reports, serving, waiting for admission or ejected."""
        return dict(self._known)

    async def set_replicas(self, addresses: Iterable[str]) -> None:
        """The discovery callback: open channels to new replicas, retire the ones that left."""
        wanted = frozenset(addresses)
        for address in sorted(wanted - self._known.keys()):
            replica = Replica(address, self._connect(address))
            self._known[address] = replica
            if self._admit is None:
                self._join(replica)
            else:
                self._pending[address] = asyncio.create_task(
                    self._admit_when_ready(replica), name=f"{self.name}-admit-{address}"
                )
        for address in sorted(self._known.keys() - wanted):
            self._retire(self._known.pop(address))

    def _join(self, replica: Replica) -> None:
        self._serving.append(replica)
        self.outliers.add(replica.address)
        POOL_REPLICAS.labels(self.name).set(len(self._serving))
        log.info("replica serving", extra={"pool": self.name, "address": replica.address})
        self._changed()

    def _retire(self, replica: Replica) -> None:
        task = self._pending.pop(replica.address, None)
        if task is not None:
            task.cancel()
        probing = self._ejected.pop(replica.address, None)
        if probing is not None:
            probing.cancel()
            POOL_EJECTED.labels(self.name).set(len(self._ejected))
        self.outliers.remove(replica.address)
        if replica in self._serving:
            self._serving.remove(replica)
            POOL_REPLICAS.labels(self.name).set(len(self._serving))
            log.info("replica left", extra={"pool": self.name, "address": replica.address})
            self._changed()
        # Calls already on the channel get the grace period to finish.
        closing = asyncio.create_task(replica.channel.close(self._close_grace))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def _admit_when_ready(self, replica: Replica) -> None:
        while True:
            try:
                if await self._admit(replica.address, replica.channel):
                    break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not ready yet, whatever the reason
                log.debug("replica not admitted yet: %s", exc, extra={"pool": self.name, "address": replica.address})
            await asyncio.sleep(self._admit_interval)
        self._pending.pop(replica.address, None)
        self._join(replica)

    # -- outlier ejection and retry budget -----------------------------------------------------------
    def report(self, replica: Replica, ok: bool) -> None:
        """One call's outcome on `replica`: ok, or a retryable failure (UNAVAILABLE)."""
        if ok:
            self.outliers.success(replica.address)
            return
        seconds = self.outliers.failure(replica.address)
        if seconds is not None and replica in self._serving:
            self._serving.remove(replica)
            POOL_EJECTIONS.labels(self.name).inc()
            log.warning(
                "replica ejected: failed %d calls in a row",
                self.outlier_settings.consecutive_failures,
                extra={"pool": self.name, "address": replica.address, "ejected_for_s": seconds},
            )
            self._ejected[replica.address] = asyncio.get_running_loop().create_task(
                self._probe_back(replica, seconds), name=f"{self.name}-probe-{replica.address}"
            )
            self._update_ejected()

    def ejected(self) -> frozenset[str]:
        return frozenset(self._ejected)

    def _update_ejected(self) -> None:
        POOL_EJECTED.labels(self.name).set(len(self._ejected))
        POOL_REPLICAS.labels(self.name).set(len(self._serving))
        self._changed()

    async def _probe_back(self, replica: Replica, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                passed = bool(
                    await asyncio.wait_for(
                        self._probe(replica.address, replica.channel), self.outlier_settings.probe_timeout_seconds
                    )
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any probe failure keeps it out
                log.debug("probe failed: %s", exc, extra={"pool": self.name, "address": replica.address})
                passed = False
            again = self.outliers.probed(replica.address, passed)
            if again is None:
                break
            seconds = again
            log.info(
                "ejected replica failed its probe; ejected again",
                extra={"pool": self.name, "address": replica.address, "ejected_for_s": seconds},
            )
        self._ejected.pop(replica.address, None)
        self._serving.append(replica)
        log.info(
            "ejected replica passed its probe: serving again", extra={"pool": self.name, "address": replica.address}
        )
        self._update_ejected()

    def request(self) -> None:
        """A call begins (what the retry budget's share is of)."""
        self.budget.request()

    def try_retry(self) -> bool:
        """May a failed call be sent to another replica? Counted (retries or refusals)."""
        if self.budget.try_retry():
            POOL_RETRIES.labels(self.name).inc()
            return True
        POOL_BUDGET_REFUSALS.labels(self.name).inc()
        return False

    def pick(self, exclude: Collection[Replica] = ()) -> Replica:
        """The less busy of two random serving replicas (not in `exclude`): less_busy_of_two."""
        serving = [r for r in self._serving if r not in exclude] if exclude else self._serving
        if not serving:
            waiting = f" ({len(self._pending)} starting)" if self._pending else ""
            others = " other" if exclude else ""
            raise Unavailable(f"no{others} {self.name} replica is ready{waiting}")
        n = len(serving)
        if n == 1:
            return serving[0]
        return serving[less_busy_of_two([r.inflight for r in serving], random.randrange(n), random.randrange(n - 1))]

    @contextlib.contextmanager
    def lease(self) -> Iterator[Replica]:
        """A replica for one call, counted as in flight until the block ends."""
        replica = self.pick()
        with replica.counted():
            yield replica

    async def close(self) -> None:
        for task in [*self._pending.values(), *self._ejected.values()]:
            task.cancel()
        self._pending.clear()
        self._ejected.clear()
        POOL_EJECTED.labels(self.name).set(0)
        replicas, self._known, self._serving = list(self._known.values()), {}, []
        POOL_REPLICAS.labels(self.name).set(0)
        await asyncio.gather(*(r.channel.close() for r in replicas), *self._closing, return_exceptions=True)


def less_busy_of_two(inflight: Sequence[int], first: int, second: int) -> int:
    """The replica rule shared with the router's fast path (protos/maas/v1/fastpath.proto, rule 2):
    `first` uniform in [0, n), `second` uniform in [0, n - 1) name two distinct replicas (first, and
    first + 1 + second mod n); the one with fewer calls in flight wins, ties go to first."""
    n = len(inflight)
    if n == 1:
        return 0
    other = (first + 1 + second) % n
    return first if inflight[first] <= inflight[other] else other


async def _connects(address: str, channel: grpc.aio.Channel) -> bool:
    """The default probe: the channel connects (the pool bounds it by probe_timeout_seconds)."""
    await channel.channel_ready()
    return True


async def triton_live(replica: Replica, timeout: float) -> bool:
    """Triton's ServerLive on the replica's own channel (raises AioRpcError when it does not answer)."""
    stub = replica.stub(service_pb2_grpc.GRPCInferenceServiceStub)
    return (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout)).live


def triton_admission(required: Callable[[], Iterable[tuple[str, str]]], timeout: float = 5.0) -> Admit:
    """An `admit` for Triton: the replica is ready and serves every (model, version) `required()` names
    (for the router: the READY versions of its routing table, which the registry loads on new replicas)."""

    async def admit(address: str, channel: grpc.aio.Channel) -> bool:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        if not (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)).ready:
            return False
        index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=timeout)
        serving = {(m.name, m.version) for m in index.models if m.state == "READY"}
        return set(required()) <= serving

    return admit
