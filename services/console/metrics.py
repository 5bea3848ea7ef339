"""The Charts page's data: the router's Prometheus endpoint read every few seconds, kept for the last
minutes, turned into per-version request and error rates and per-method p50/p99.

Parsed with prometheus_client's own text parser. Rates are counter deltas between two reads (a counter
that went down means the router restarted: its new value is the delta). Quantiles are interpolated in
the histogram buckets' deltas, as PromQL's histogram_quantile does. Latency is per version from the
router's maas_router_version_duration_seconds; per router method (maas_rpc_server_duration_seconds) only
when no version histogram has been seen yet, e.g. a router older than it (docs/console.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

REQUESTS = "maas_rpc_server_requests"  # counter: service, method, model, version, code
DURATION = "maas_rpc_server_duration_seconds"  # histogram: service, method
VERSION_DURATION = "maas_router_version_duration_seconds"  # histogram: model, version
SERVICE = "router"
OK = "OK"


@dataclass
class Sample:
    """One read of the endpoint: cumulative counts."""

    at: float
    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, version) -> count
    errors: dict[tuple[str, str], float] = field(default_factory=dict)  # the same, codes other than OK
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # method -> [(le, count)]
    version_buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # "model vN" -> rows


def parse(text: str, at: float) -> Sample:
    sample = Sample(at)
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS:
            for s in family.samples:
                if not s.name.endswith("_total") or s.labels.get("service") != SERVICE or not s.labels.get("model"):
                    continue
                key = (s.labels["model"], s.labels.get("version", ""))
                sample.requests[key] = sample.requests.get(key, 0.0) + s.value
                if s.labels.get("code") != OK:
                    sample.errors[key] = sample.errors.get(key, 0.0) + s.value
        elif family.name == DURATION:
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels.get("service") == SERVICE:
                    sample.buckets.setdefault(s.labels["method"], []).append((float(s.labels["le"]), s.value))
        elif family.name == VERSION_DURATION:
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    line = f"{s.labels['model']} v{s.labels['version']}"
                    sample.version_buckets.setdefault(line, []).append((float(s.labels["le"]), s.value))
    for rows in (*sample.buckets.values(), *sample.version_buckets.values()):
        rows.sort()
    return sample


def _delta(now: float, before: float | None) -> float:
    if before is None or now < before:  # new series, or the router restarted
        return now
    return now - before


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (le, count) rows; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_le  # beyond the last finite bucket: its bound, as PromQL does
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, count
    return lower_le


@dataclass
class Series:
    """Named lines of (seconds before now, value) points, for one chart."""

    title: str
    unit: str
    lines: dict[str, list[tuple[float, float]]]


class History:
    """The last `keep` seconds of samples and the charts computed from them."""

    def __init__(self, keep: float):
        self.keep = keep
        self.samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while self.samples and sample.at - self.samples[0].at > self.keep:
            self.samples.popleft()

    def charts(self, now: float | None = None) -> list[Series]:
        now = self.samples[-1].at if now is None and self.samples else (now or time.time())
        rate: dict[str, list] = {}
        errors: dict[str, list] = {}
        p50: dict[str, list] = {}
        p99: dict[str, list] = {}
        pairs = list(zip(self.samples, list(self.samples)[1:]))
        by_version = any(sample.version_buckets for sample in self.samples)
        for before, after in pairs:
            dt = after.at - before.at
            if dt <= 0:
                continue
            x = after.at - now
            for key, count in after.requests.items():
                name = f"{key[0]} v{key[1]}"
                rate.setdefault(name, []).append((x, _delta(count, before.requests.get(key)) / dt))
                errors.setdefault(name, []).append((x, _delta(after.errors.get(key, 0.0), before.errors.get(key)) / dt))
            latency_after, latency_before = (
                (after.version_buckets, before.version_buckets) if by_version else (after.buckets, before.buckets)
            )
            for line, rows in latency_after.items():
                old = dict(latency_before.get(line, []))
                restarted = any(count < old.get(le, 0.0) for le, count in rows)
                window = [(le, count - (0.0 if restarted else old.get(le, 0.0))) for le, count in rows]
                for q, lines in ((0.5, p50), (0.99, p99)):
                    value = quantile(q, window)
                    if value is not None:
                        lines.setdefault(line, []).append((x, value * 1000))
        per = "per version" if by_version else "per router method"
        return [
            Series("Requests per second, per version", "req/s", rate),
            Series("Errors per second (status other than OK), per version", "err/s", errors),
            Series(f"p50 latency, {per}", "ms", p50),
            Series(f"p99 latency, {per}", "ms", p99),
        ]


def fetch(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # a configured http(s) URL
        return response.read().decode("utf-8", "replace")


class Scraper:
    """Background task reading `url` every `interval` seconds into a History."""

    def __init__(self, url: str, interval: float, keep: float):
        self.url, self.interval = url, interval
        self.history = History(keep)
        self.last_error = ""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.url and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-scrape")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                text = await asyncio.to_thread(fetch, self.url)
                self.history.add(parse(text, time.time()))
                self.last_error = ""
            except Exception as exc:  # noqa: BLE001 - the page says why there are no new points
                if not self.last_error:
                    log.warning("router metrics not readable", extra={"url": self.url, "error": str(exc)})
                self.last_error = f"{self.url}: {exc}"
            await asyncio.sleep(self.interval)
