"""Rollout figures (docs/rollouts.md), on a local mesh of real processes with tiny models:

- rollback_detect_s: from the moment a running canary starts failing (the traffic begins to carry the
  input its version fails on) to the registry's rollback (the rollout's updated_at), with interval
  INTERVAL and failureLimit 1; target <= 2 x interval (one analysis interval, plus the router's report
  interval and the requests needed). Worst of RUNS rollouts.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from maas.client import AsyncMeshClient, MeshError
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from maas.registry_client import RegistryClient
from maas.v1 import registry_pb2 as pb
from tests.fixtures.registry import tiny_onnx
from tests.fixtures.rollout_models import FAIL_MARKER, faulty_onnx

INTERVAL = 1.0
RUNS = 3
CLEAN = np.ones((1, 4), np.float32)
MARKED = np.full((1, 4), FAIL_MARKER, np.float32)


def register(registry: RegistryClient, model: str, path: Path, data: bytes) -> int:
    path.write_bytes(data)
    version = registry.register(path, model, format="onnx")
    registry.wait_ready(model, version.version, timeout=300)
    return version.version


async def one_run(mesh: LocalMesh, registry: RegistryClient, model: str, tmp: Path) -> float:
    v1 = register(registry, model, tmp / f"{model}-1.onnx", tiny_onnx(1.0))
    v2 = register(registry, model, tmp / f"{model}-2.onnx", faulty_onnx(2.0))
    registry.set_alias(model, "production", v1)
    policy = pb.RolloutPolicy(
        step_weight=10,
        max_weight=50,
        interval_seconds=INTERVAL,
        max_error_rate=0.05,
        max_p99_ratio=0.0,
        min_requests=5,
        failure_limit=1,
    )
    fault_at = None
    stop = asyncio.Event()

    async with AsyncMeshClient(mesh.router_address) as client:

        async def worker(w: int) -> None:
            i = w
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                marked = fault_at is not None and i % 5 == 0
                i += 4
                try:
                    await client.infer(model, {"x": MARKED if marked else CLEAN}, timeout=10)
                except MeshError:
                    pass
                await asyncio.sleep(0.005)

        workers = [asyncio.create_task(worker(w)) for w in range(4)]
        registry.start_rollout(model, v2, policy)
        # The canary is healthy for its first step or two (5 steps in all), then the fault starts at a
        # random phase of an analysis window.
        await asyncio.sleep(INTERVAL * 1.2 + np.random.default_rng(len(model)).uniform(0, INTERVAL))
        fault_at = time.time()
        deadline = time.monotonic() + 30
        while (r := registry.get_rollout(model)).state == pb.ROLLOUT_STATE_RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
    if r.state != pb.ROLLOUT_STATE_ROLLED_BACK:
        raise RuntimeError(f"{model}: rollout ended {pb.RolloutState.Name(r.state)} ({r.reason})")
    return r.updated_at.seconds + r.updated_at.nanos / 1e9 - fault_at


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-rollout-") as tmp,
        LocalMesh(MeshConfig(state_dir=Path(tmp) / "mesh", ports=FREE_PORTS, models=())) as mesh,
        RegistryClient(mesh.registry_address, timeout=30) as registry,
    ):
        detect = [asyncio.run(one_run(mesh, registry, f"bench_rollout_{i}", Path(tmp))) for i in range(RUNS)]
    print(
        f"rollback detection over {RUNS} rollouts (interval {INTERVAL:g} s, failureLimit 1): "
        f"median {statistics.median(detect):.2f} s, worst {max(detect):.2f} s (machine shared, loaded)"
    )
    print(f"BENCH rollback_detect_s {max(detect):.3f} <= {2 * INTERVAL:g}")


if __name__ == "__main__":
    main()
