"""Traffic policy through the real mesh: canary share, sticky routing keys, shadow traffic."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np

from maas.client import AsyncMeshClient, MeshClient
from maas.registry_client import parse_target
from tests.fixtures.mesh import register_tiny

REQUESTS = 2000
CONCURRENCY = 32
X = np.ones((1, 4), np.float32)


def wait_for(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def send_many(address: str, model: str, n: int, keys=None) -> list[tuple[int, float]]:
    """n Infer calls (concurrency CONCURRENCY): (version that answered, scale it applied)."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with AsyncMeshClient(address) as client:

        async def one(i):
            async with semaphore:
                result = await client.infer(model, {"x": X}, routing_key=keys[i] if keys else None)
                return result.routed.version, float(result.outputs["y"][0, 0])

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_canary_share_and_sticky_routing_keys(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "canary_tiny", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "canary_tiny", tmp_path, scale=2.0)
    mesh_registry.set_alias("canary_tiny", "production", v1)
    mesh_registry.set_traffic("canary_tiny", [parse_target("production", 90), parse_target(str(v2), 10)])
    with MeshClient(mesh.router_address) as client:
        wait_for(lambda: client.infer("canary_tiny", {"x": X}).routed.kind == "traffic_policy", "the canary policy")

    answers = asyncio.run(send_many(mesh.router_address, "canary_tiny", REQUESTS))
    versions = Counter(version for version, _ in answers)
    assert set(versions) == {v1, v2}
    share = versions[v2] / REQUESTS
    assert 0.07 <= share <= 0.13, versions
    # Each answer came from the version the router reported (y = x * scale).
    assert all(scale == {v1: 1.0, v2: 2.0}[version] for version, scale in answers)

    keys = [f"user-{i % 100}" for i in range(500)]
    keyed = asyncio.run(send_many(mesh.router_address, "canary_tiny", len(keys), keys))
    per_key: dict[str, set[int]] = {}
    for key, (version, _) in zip(keys, keyed):
        per_key.setdefault(key, set()).add(version)
    assert all(len(seen) == 1 for seen in per_key.values())
    assert {v for seen in per_key.values() for v in seen} == {v1, v2}  # keys spread over both versions


def test_shadow_never_changes_the_answer_and_reports_agreement(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "shadow_tiny", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "shadow_tiny", tmp_path, scale=-1.0)  # disagrees on every item
    mesh_registry.set_alias("shadow_tiny", "production", v1)
    mesh_registry.set_traffic("shadow_tiny", [], shadow=parse_target(str(v2)), shadow_fraction=1.0)
    with MeshClient(mesh.router_address) as client:
        wait_for(lambda: client.infer("shadow_tiny", {"x": X}).routed.shadowed, "the shadow policy")
        for _ in range(50):
            result = client.infer("shadow_tiny", {"x": X})
            assert result.routed.version == v1 and result.routed.shadowed
            np.testing.assert_array_equal(result.outputs["y"], X)  # the primary's answer, never the shadow's

    def stats():
        found = [
            s
            for s in mesh_registry.get_model("shadow_tiny").shadow_stats
            if (s.primary_version, s.shadow_version) == (v1, v2)
        ]
        return found[0] if found and found[0].samples >= 40 else None

    wait_for(stats, "shadow statistics in the registry")
    s = stats()
    assert s.mean_cosine < -0.99  # y and -y: the comparison really ran on both answers
    assert s.primary_latency_ms > 0 and s.shadow_latency_ms > 0
