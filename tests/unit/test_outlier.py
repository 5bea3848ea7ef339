"""Outlier ejection and the retry budget (services/shared/outlier.py), on a fake clock."""

from __future__ import annotations

from services.shared.config import OutlierSettings, RetryBudgetSettings
from services.shared.outlier import OutlierDetector, RetryBudget


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(n: int = 3, **settings) -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    d = OutlierDetector(
        OutlierSettings(
            **{"consecutive_failures": 3, "base_ejection_seconds": 10.0, "max_ejection_seconds": 25.0, **settings}
        ),
        clock,
    )
    for i in range(n):
        d.add(f"r{i}")
    return d, clock


def fail(d: OutlierDetector, address: str, times: int) -> list[float | None]:
    return [d.failure(address) for _ in range(times)]


def test_n_failures_in_a_row_eject_a_success_resets_the_count():
    d, _ = detector()
    assert fail(d, "r0", 2) == [None, None]
    d.success("r0")
    assert fail(d, "r0", 2) == [None, None] and not d.ejected("r0")
    assert d.failure("r0") == 10.0 and d.ejected("r0")
    assert d.failure("r0") is None  # an ejected replica gets no calls to fail


def test_each_ejection_lasts_longer_up_to_the_cap_and_is_forgiven_over_time():
    d, clock = detector()
    assert fail(d, "r0", 3)[-1] == 10.0
    clock.now += 10
    assert d.due_for_probe("r0")
    assert d.probed("r0", passed=False) == 20.0  # the probe failed: ejected again, for longer
    clock.now += 20
    assert d.probed("r0", passed=True) is None and not d.ejected("r0")
    assert fail(d, "r0", 3)[-1] == 25.0  # 3 × 10 s, capped at 25
    clock.now += 25
    d.probed("r0", passed=True)
    clock.now += 30  # three base periods in: three ejections forgiven
    assert fail(d, "r0", 3)[-1] == 10.0


def test_not_due_for_probe_before_the_ejection_ends():
    d, clock = detector()
    fail(d, "r0", 3)
    clock.now += 9.9
    assert not d.due_for_probe("r0")


def test_the_share_ejected_is_capped_and_the_last_replica_never_ejected():
    d, _ = detector(n=4, max_ejection_percent=50)
    assert fail(d, "r0", 3)[-1] is not None
    assert fail(d, "r1", 3)[-1] is not None
    assert fail(d, "r2", 3) == [None] * 3 and d.ejected_count() == 2  # 50% of 4

    d, _ = detector(n=2, max_ejection_percent=10)
    assert fail(d, "r0", 3)[-1] is not None  # at least one may be, as in Envoy
    assert fail(d, "r1", 3) == [None] * 3  # but never the last one serving

    d, _ = detector(n=1, max_ejection_percent=100)
    assert fail(d, "r0", 10) == [None] * 10


def test_ejection_off():
    d, _ = detector(consecutive_failures=0)
    assert fail(d, "r0", 100) == [None] * 100


def test_a_removed_replica_is_forgotten():
    d, _ = detector(n=2)
    fail(d, "r0", 3)
    d.remove("r0")
    assert d.ejected_count() == 0 and d.failure("r0") is None


def budget(**settings) -> tuple[RetryBudget, Clock]:
    clock = Clock()
    return RetryBudget(
        RetryBudgetSettings(**{"ratio": 0.2, "min_retries": 3, "window_seconds": 10.0, **settings}), clock
    ), clock


def test_retries_are_a_share_of_requests_plus_a_floor():
    b, _ = budget()
    for _ in range(100):
        b.request()
    allowed = sum(b.try_retry() for _ in range(100))
    assert allowed == 23  # 20% of 100 + 3


def test_a_failing_pool_gets_no_retry_storm():
    """Every request failing and retried: retries stay at the budget, whatever the request rate."""
    b, clock = budget()
    retries = requests = 0
    for second in range(60):
        for _ in range(50):
            b.request()
            requests += 1
            retries += b.try_retry()
        clock.now += 1
    assert retries <= 0.2 * requests + 3 * 60 / 10 + 3  # ≤ ratio × requests + a floor per window


def test_the_window_slides():
    b, clock = budget(min_retries=2, ratio=0.0)
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
    clock.now += 5
    assert not b.try_retry()
    clock.now += 5.5  # the first retries left the window
    assert [b.try_retry() for _ in range(3)] == [True, True, False]
