"""A bounded thread pool for CPU-heavy request work (tokenizing, decoding), so the event loop keeps
serving and concurrent requests run side by side instead of queueing behind one another.

The libraries doing the work (tokenizers, Pillow, numpy) release the GIL in their hot loops, so
threads give real parallelism. The caller's contextvars (trace span, request labels) go along.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class WorkerPool:
    def __init__(self, workers: int, name: str):
        if workers <= 0:
            raise ValueError("workers must be positive")
        self.size = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"maas-{name}")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run fn(*args, **kwargs) on a worker thread and await its result."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def map_chunks(self, fn: Callable[[int, int], T], count: int, chunk_size: int) -> list[T]:
        """fn(start, stop) over contiguous chunks of range(count), results in chunk order.

        At most `size` chunks of one call run at once and the next is queued only when one finishes,
        so concurrent calls share the workers chunk by chunk instead of one large call filling the
        queue ahead of everyone. After a failure no new chunk starts, and the exception of the
        earliest failed chunk is raised (chunks are handed out in order, so all earlier ones ran)."""
        starts = range(0, count, max(1, chunk_size))
        results: list = [None] * len(starts)
        errors: dict[int, BaseException] = {}
        pending = iter(enumerate(starts))

        async def lane() -> None:
            for i, start in pending:  # one iterator shared by all lanes: each chunk is taken once
                if errors:
                    return
                try:
                    results[i] = await self.run(fn, start, min(start + chunk_size, count))
                except Exception as exc:  # noqa: BLE001 - re-raised below, earliest chunk first
                    errors[i] = exc
                    return

        await asyncio.gather(*(lane() for _ in range(min(self.size, len(starts)))))
        if errors:
            raise errors[min(errors)]
        return results

    def shutdown(self) -> None:
        """Stop accepting work; queued work is dropped, running work finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
