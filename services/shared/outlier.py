"""Outlier ejection and a retry budget for a pool of replicas (Envoy's outlier detection and retry
budgets are the model). Pure policy, no I/O: services.shared.replica_pool applies it to real calls.

- A replica failing `consecutive_failures` calls in a row with a retryable error (UNAVAILABLE) is
  ejected for base_ejection_seconds × (its number of ejections), capped at max_ejection_seconds; the
  count drops by one for every base period it stays in. After the ejection it is probed and returns
  only if the probe passes (else it is ejected again, for longer).
- At most max_ejection_percent of the replicas are ejected at once (at least one may be, with two or
  more), and never the last one serving: a pool whose every replica fails keeps trying one rather than
  refusing every call.
- Retries (a call sent again to another replica) are allowed while retries ≤ budget_ratio × requests
  + min_retries over the last window_seconds, so a failing Triton is not hit by a retry storm.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.shared.config import OutlierSettings, RetryBudgetSettings

Clock = Callable[[], float]


@dataclass
class HostState:
    """What the detector knows of one replica."""

    consecutive_failures: int = 0
    ejections: int = 0  # the multiplier of the next ejection's length
    ejected_until: float = 0.0  # > 0 while ejected (until then, and until a probe passes)
    returned_at: float = 0.0  # when it last came back (or was first seen)


class OutlierDetector:
    def __init__(self, settings: OutlierSettings, clock: Clock = time.monotonic):
        self.settings, self.clock = settings, clock
        self.hosts: dict[str, HostState] = {}

    def add(self, address: str) -> None:
        self.hosts.setdefault(address, HostState(returned_at=self.clock()))

    def remove(self, address: str) -> None:
        self.hosts.pop(address, None)

    def ejected(self, address: str) -> bool:
        host = self.hosts.get(address)
        return host is not None and host.ejected_until > 0

    def ejected_count(self) -> int:
        return sum(1 for host in self.hosts.values() if host.ejected_until > 0)

    def success(self, address: str) -> None:
        host = self.hosts.get(address)
        if host is not None:
            host.consecutive_failures = 0

    def failure(self, address: str) -> float | None:
        """A retryable failure; returns the ejection's length in seconds when it ejects the replica."""
        host = self.hosts.get(address)
        if host is None or host.ejected_until > 0 or self.settings.consecutive_failures <= 0:
            return None
        host.consecutive_failures += 1
        if host.consecutive_failures < self.settings.consecutive_failures or not self._may_eject():
            return None
        return self._eject(host)

    def _may_eject(self) -> bool:
        total, ejected = len(self.hosts), self.ejected_count()
        allowed = max(1, int(total * self.settings.max_ejection_percent / 100))
        return ejected < allowed and total - ejected > 1  # never the last one serving

    def _eject(self, host: HostState, forgive: bool = True) -> float:
        now, base = self.clock(), self.settings.base_ejection_seconds
        if forgive and base > 0:  # one ejection forgiven per base period the replica stayed in
            host.ejections = max(0, host.ejections - int((now - host.returned_at) / base))
        host.ejections += 1
        seconds = min(base * host.ejections, self.settings.max_ejection_seconds)
        host.ejected_until = now + seconds
        host.consecutive_failures = 0
        return seconds

    def due_for_probe(self, address: str) -> bool:
        host = self.hosts.get(address)
        return host is not None and 0 < host.ejected_until <= self.clock()

    def probed(self, address: str, passed: bool) -> float | None:
        """The probe after an ejection: back in (None), or ejected again (its new length)."""
        host = self.hosts.get(address)
        if host is None:
            return None
        if passed:
            host.ejected_until, host.returned_at, host.consecutive_failures = 0.0, self.clock(), 0
            return None
        host.ejected_until = 0.0
        return self._eject(host, forgive=False)  # it was never back in


class RetryBudget:
    """Retries ≤ ratio × requests + min_retries over a sliding window (counted in 1 s buckets)."""

    def __init__(self, settings: RetryBudgetSettings, clock: Clock = time.monotonic):
        self.settings, self.clock = settings, clock
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]

    def _bucket(self) -> list[int]:
        now = int(self.clock())
        while self._buckets and self._buckets[0][0] <= now - self.settings.window_seconds:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def request(self) -> None:
        self._bucket()[1] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (take none) when it is spent."""
        current = self._bucket()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries + 1 > self.settings.ratio * requests + self.settings.min_retries:
            return False
        current[2] += 1
        return True
