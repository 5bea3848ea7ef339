"""Follows the registry's Watch stream into the routing table; keeps the last state while it is away.

The registry sends a full snapshot first (also after every reconnect), then one whole-model view per
change. If the stream breaks the router keeps serving what it knows and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from maas.v1 import registry_pb2, registry_pb2_grpc
from services.router.routing import (
    ModelRoutes,
    PostKind,
    PreKind,
    RoutingTable,
    Shadow,
    Target,
    TensorInfo,
    VersionInfo,
    ServingState,
)
from services.router.signature import MAX_SEQUENCE_LENGTH_TAG, VOCAB_SIZE_TAG, declared_limit

log = logging.getLogger(__name__)


def _specs(specs) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(s.name, s.datatype, tuple(s.shape)) for s in specs)


def version_from_proto(v: registry_pb2.ModelVersion) -> VersionInfo:
    return VersionInfo(
        model=v.model,
        version=v.version,
        state=ServingState(v.state),
        state_reason=v.state_reason,
        inputs=_specs(v.signature.inputs),
        outputs=_specs(v.signature.outputs),
        pre_kind=PreKind(v.preprocessing.kind),
        pre_name=v.preprocessing.name,
        post_kind=PostKind(v.postprocessing.kind),
        post_output=v.postprocessing.output,
        top_k=v.postprocessing.top_k,
        labels=tuple(v.labels),
        max_sequence_length=declared_limit(v.tags, MAX_SEQUENCE_LENGTH_TAG),
        vocab_size=declared_limit(v.tags, VOCAB_SIZE_TAG),
    )


def _target(t: registry_pb2.TrafficTarget) -> Target:
    which = t.WhichOneof("target")
    return Target(
        version=t.version if which == "version" else 0, alias=t.alias if which == "alias" else "", weight=t.weight
    )


def routes_from_proto(m: registry_pb2.ModelRouting) -> ModelRoutes:
    policy = m.policy
    shadow = None
    if policy.HasField("shadow") and policy.shadow.fraction > 0 and policy.shadow.HasField("target"):
        shadow = Shadow(_target(policy.shadow.target), min(policy.shadow.fraction, 1.0))
    return ModelRoutes(
        name=m.model,
        versions={v.version: version_from_proto(v) for v in m.versions},
        aliases=dict(m.aliases),
        split=tuple(_target(t) for t in policy.split),
        shadow=shadow,
    )


class RegistryWatcher:
    """Background task: Watch → RoutingTable, reconnecting with capped exponential backoff."""

    def __init__(
        self, channel: grpc.aio.Channel, table: RoutingTable, initial_backoff: float = 0.2, max_backoff: float = 5.0
    ):
        self._stub = registry_pb2_grpc.RegistryStub(channel)
        self.table = table
        self.synced = asyncio.Event()  # set once the first snapshot arrived
        self.connected = False
        self._initial_backoff, self._max_backoff = initial_backoff, max_backoff
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"registry-watch-{type(self).__name__}"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def apply(self, event: registry_pb2.WatchEvent) -> None:
        which = event.WhichOneof("event")
        if which == "snapshot":
            self.table.replace_all([routes_from_proto(m) for m in event.snapshot.models], event.revision)
            self.synced.set()
            log.info(
                "routing snapshot",
                extra={"revision": event.revision, "models": [m.model for m in event.snapshot.models]},
            )
        elif which == "model_changed":
            self.table.update(routes_from_proto(event.model_changed), event.revision)
            log.info("routing change", extra={"revision": event.revision, "model": event.model_changed.model})

    def open_stream(self):
        return self._stub.Watch(registry_pb2.WatchRequest())

    async def _run(self) -> None:
        backoff = self._initial_backoff
        while True:
            call = self.open_stream()
            try:
                async for event in call:
                    if not self.connected:
                        self.connected, backoff = True, self._initial_backoff
                        log.info("registry watch connected")
                    self.apply(event)
                log.warning("registry watch ended; reconnecting")
            except grpc.aio.AioRpcError as exc:
                if self.connected or not self.synced.is_set():
                    log.warning(
                        "registry watch failed; serving the last routing state and reconnecting",
                        extra={"code": exc.code().name, "details": exc.details(), "retry_in_s": backoff},
                    )
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception:  # a bad event must not end the watch for good
                log.exception("registry watch event could not be applied; reconnecting for a fresh snapshot")
            finally:
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
