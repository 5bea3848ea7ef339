"""Triton's queue time, sampled off the request path: the second overload signal of priority shedding.

Every `interval` (0.25 s) the router asks each Triton replica of its pool for ModelStatistics (every model
and version, one call per replica) and takes, per model, the queue time of the requests that left Triton's
queue since the previous sample: (Σ queue ns now − then) / (Σ queue count now − then), summed over versions
and replicas (a mean weighted by requests), less the version's dynamic-batching delay
(`max_queue_delay_microseconds`, read once per version with ModelConfig): a lone request waits that long
in the queue by design (2 ms in the configs the registry writes), which is not overload. `worst` is the
longest of those means: Triton's queue is per model, but its CPU (or GPU) is shared, so a flood queueing
on one model slows the critical calls of every model, and shedding sheddable calls of every model is what
frees it. Admission compares `worst` with the
per-class thresholds (admission.py); the check itself costs an attribute read.

A model nothing left the queue of during the interval counts 0 (idle, or stuck behind one long execution:
the in-flight threshold covers the latter); holding an old value instead could shed a model's sheddable
calls forever, since shed calls never reach the queue to lower it. Counters that went back (a model
reloaded, a Triton restarted) start a new baseline. A replica that does not answer in time keeps its
baseline and is left out of that sample.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

import grpc
from prometheus_client import Gauge
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.shared.replica_pool import ReplicaPool

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.25

TRITON_QUEUE_SECONDS = Gauge(
    "maas_router_triton_queue_seconds",
    "Mean time requests of a model waited in Triton's queue over the last sample interval (all replicas); "
    "the longest is what --shed-*-queue-ms compare with",
    ["model"],
)


class TritonQueueTime:
    def __init__(self, pool: ReplicaPool, interval: float = DEFAULT_INTERVAL):
        self.pool = pool
        self.interval = interval
        self.worst = 0.0  # seconds: the longest mean queue time of a model in the last interval
        self.worst_model = ""
        self.by_model: dict[str, float] = {}
        self._last: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}  # replica → (model, version) → (count, ns)
        self.delays: dict[tuple[str, str], int] = {}  # (model, version) → its batcher's queue delay, ns
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:  # an empty context: no caller's span or metric labels leak into the task
            self._task = asyncio.get_running_loop().create_task(self._loop(), context=contextvars.Context())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sample()
            except Exception:  # never let the signal die: the next sample tries again
                log.exception("sampling Triton's queue time failed")

    async def sample(self) -> None:
        """One sample of every replica of the pool; updates `worst`, `worst_model`, `by_model`."""
        replicas = self.pool.replicas()
        answers = await asyncio.gather(*(self._statistics(r) for r in replicas))
        present = {r.address for r in replicas}
        for address in list(self._last):
            if address not in present:
                del self._last[address]
        totals: dict[str, list[int]] = {}
        for replica, response in zip(replicas, answers):
            if response is None:
                continue
            await self._read_delays(replica, response)
            for model, (count, ns) in self.deltas(replica.address, response).items():
                total = totals.setdefault(model, [0, 0])
                total[0] += count
                total[1] += ns
        self.update({model: ns / count / 1e9 if count > 0 else 0.0 for model, (count, ns) in totals.items()})

    def update(self, by_model: dict[str, float]) -> None:
        for model in self.by_model.keys() - by_model.keys():
            TRITON_QUEUE_SECONDS.labels(model).set(0.0)
        for model, seconds in by_model.items():
            TRITON_QUEUE_SECONDS.labels(model).set(seconds)
        self.by_model = by_model
        self.worst_model, self.worst = max(by_model.items(), key=lambda item: item[1], default=("", 0.0))

    def deltas(self, address: str, response: service_pb2.ModelStatisticsResponse) -> dict[str, tuple[int, int]]:
        """Per model: (requests that left the queue, their queue ns) on this replica since the last sample."""
        last = self._last.get(address)
        now: dict[tuple[str, str], tuple[int, int]] = {}
        out: dict[str, tuple[int, int]] = {}
        for stats in response.model_stats:
            queue = stats.inference_stats.queue
            key = (stats.name, stats.version)
            now[key] = (queue.count, queue.ns)
            count, ns = out.get(stats.name, (0, 0))
            # A version loaded since the last sample started from 0; a replica's first sample is the baseline.
            before = last.get(key, (0, 0)) if last is not None else None
            if before is not None and queue.count >= before[0] and queue.ns >= before[1]:
                left = queue.count - before[0]
                waited = queue.ns - before[1] - left * self.delays.get(key, 0)  # beyond the batcher's delay
                count, ns = count + left, ns + max(waited, 0)
            out[stats.name] = (count, ns)
        self._last[address] = now
        return out

    async def _read_delays(self, replica, response: service_pb2.ModelStatisticsResponse) -> None:
        """The dynamic-batching delay of each version not seen before (versions are immutable: once)."""
        stub = replica.stub(service_pb2_grpc.GRPCInferenceServiceStub)
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            if key in self.delays:
                continue
            try:
                answer = await stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=stats.name, version=stats.version),
                    timeout=max(self.interval, 1.0),
                    wait_for_ready=False,
                )
            except grpc.aio.AioRpcError:
                continue  # the next sample asks again; meanwhile no delay is subtracted
            config = answer.config
            delay = config.dynamic_batching.max_queue_delay_microseconds if config.HasField("dynamic_batching") else 0
            self.delays[key] = int(delay) * 1000

    async def _statistics(self, replica) -> service_pb2.ModelStatisticsResponse | None:
        stub = replica.stub(service_pb2_grpc.GRPCInferenceServiceStub)
        try:
            return await stub.ModelStatistics(
                service_pb2.ModelStatisticsRequest(), timeout=max(self.interval, 1.0), wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("Triton statistics not read", extra={"replica": replica.address, "error": exc.details()})
            return None
