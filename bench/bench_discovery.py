"""Replica discovery: how fast a Triton replica change reaches the registry/router.

The EndpointSlice watcher (list once, then watch) against the baseline a watch-less implementation
would use: re-listing every second. Both run against the fake Kubernetes API on loopback with the
real `kubernetes` client; the figure is the time from a slice change to on_change being called.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time

from kubernetes import client as k8s

from services.shared.discovery import TritonReplicaWatcher, ready_addresses
from tests.fixtures.fake_kube import FakeKubeAPI

NS, SERVICE = "bench", "triton-headless"
WATCH_SAMPLES = 200
POLL_SAMPLES = 12
POLL_INTERVAL = 1.0


def _change(api: FakeKubeAPI, i: int) -> str:
    address = f"10.1.{i // 250}.{i % 250 + 1}"
    api.put_slice(NS, "replica", service=SERVICE, port=8001, endpoints=[(address, True)])
    return f"{address}:8001"


async def _watch_latencies(api: FakeKubeAPI) -> list[float]:
    arrived: dict[str, float] = {}
    event = asyncio.Event()

    def on_change(addresses: frozenset[str]) -> None:
        for a in addresses:
            arrived.setdefault(a, time.perf_counter())
        event.set()

    watcher = TritonReplicaWatcher(SERVICE, NS, api_client=api.api_client())
    await watcher.start(on_change)
    try:
        await watcher.wait_synced(10)
        api.wait_for(lambda k: k.open_watches == 1)
        latencies = []
        for i in range(WATCH_SAMPLES):
            t0 = time.perf_counter()
            address = _change(api, i)
            while address not in arrived:
                event.clear()
                await asyncio.wait_for(event.wait(), 10)
            latencies.append((arrived[address] - t0) * 1000)
        return latencies
    finally:
        await watcher.stop()


def _poll_latencies(api: FakeKubeAPI) -> list[float]:
    """Baseline: list every POLL_INTERVAL seconds and diff."""
    discovery = k8s.DiscoveryV1Api(api.api_client())
    arrived: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            listing = discovery.list_namespaced_endpoint_slice(
                NS, label_selector=f"kubernetes.io/service-name={SERVICE}"
            )
            for a in ready_addresses(listing.items):
                arrived.setdefault(a, time.perf_counter())
            stop.wait(POLL_INTERVAL)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    latencies = []
    try:
        for i in range(10_000, 10_000 + POLL_SAMPLES):
            time.sleep(random.uniform(0, POLL_INTERVAL))  # changes land at any point of the poll cycle
            t0 = time.perf_counter()
            address = _change(api, i)
            while address not in arrived:
                time.sleep(0.005)
            latencies.append((arrived[address] - t0) * 1000)
    finally:
        stop.set()
        poller.join()
    return latencies


def main() -> None:
    with FakeKubeAPI() as api:
        watch_ms = asyncio.run(_watch_latencies(api))
        poll_ms = _poll_latencies(api)
    w50, w99 = statistics.median(watch_ms), statistics.quantiles(watch_ms, n=100)[98]
    p50 = statistics.median(poll_ms)
    print(
        f"watch: p50 {w50:.2f} ms p99 {w99:.2f} ms over {len(watch_ms)} changes; "
        f"1 s re-list baseline: p50 {p50:.1f} ms over {len(poll_ms)} changes"
    )
    print(f"BENCH discovery_watch_propagation_p50_ms {w50:.3f} <= 50")
    print(f"BENCH discovery_watch_propagation_p99_ms {w99:.3f} <= 200")
    print(f"BENCH discovery_watch_vs_relist_p50_ratio {w50 / p50:.4f} <= 0.1")


if __name__ == "__main__":
    main()
