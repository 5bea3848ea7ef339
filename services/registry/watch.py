"""Fan-out of routing changes to Watch subscribers.

Publishing never waits: each subscriber has a bounded queue, and one that falls behind is cut off
(its stream ends with an error, the watcher reconnects and gets a fresh snapshot) instead of slowing
down mutations or the other watchers.
"""

from __future__ import annotations

import asyncio

from services.registry.domain import WatchEvent
from services.shared.errors import Unavailable


class Subscription:
    def __init__(self, hub: "WatchHub", queue_size: int):
        self._hub = hub
        self._queue: asyncio.Queue[WatchEvent] = asyncio.Queue(queue_size)
        self.overflowed = False

    def offer(self, event: WatchEvent) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            # Wake a consumer blocked in get() (cannot be: the queue is full) — keep the flag as the signal.

    async def next(self) -> WatchEvent:
        if self.overflowed:
            raise Unavailable("watch stream fell behind the registry's changes; reconnect for a fresh snapshot")
        return await self._queue.get()

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WatchHub:
    def __init__(self, queue_size: int = 1024):
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.queue_size)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def publish(self, event: WatchEvent) -> None:
        for sub in list(self._subscribers):
            sub.offer(event)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
