"""A batch of figures sent to the registry every few seconds, off the request path (shadow results,
per-version request figures): one task, started on first use, stopped with a last flush."""

from __future__ import annotations

import asyncio
import contextvars


class PeriodicReport:
    """Subclasses set `report_interval`, implement `flush()` and call `_start_reporting()` when they
    have something to send."""

    report_interval: float
    _reporter: asyncio.Task | None = None

    async def flush(self) -> None:
        raise NotImplementedError

    def _start_reporting(self) -> None:
        if self._reporter is None:  # an empty context: no caller's span or metric labels leak into the task
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop(), context=contextvars.Context())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            await self.flush()

    async def _stop_reporting(self) -> None:
        """Cancel the task and send what is left."""
        if self._reporter is not None:
            self._reporter.cancel()
            try:
                await self._reporter
            except asyncio.CancelledError:
                pass
            self._reporter = None
        await self.flush()
