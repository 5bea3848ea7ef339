"""Shadow agreement reports through the real mesh: the registry's numbers for a shadowed pair match a
direct computation on the same requests, and `maas models compare` prints them (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from maas.client import MeshClient
from maas.registry_client import parse_target
from services.registry.shadow_report import COSINE_BOUNDS, bucket
from services.router.postprocess import l2_normalise
from tests.fixtures.mesh import REPO, register_tiny
from tests.fixtures.rollout_models import offset_onnx

N = 40
MAAS = [sys.executable, "-c", "from maas.cli import main; main()"]


def test_report_matches_a_direct_computation(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "sr_tiny", tmp_path, scale=1.0)
    path = tmp_path / "offset.onnx"
    path.write_bytes(offset_onnx(0.5))
    v2 = mesh_registry.register(path, "sr_tiny", format="onnx").version
    mesh_registry.wait_ready("sr_tiny", v2, timeout=300)
    mesh_registry.set_alias("sr_tiny", "production", v1)
    mesh_registry.set_traffic("sr_tiny", [], shadow=parse_target(str(v2)), shadow_fraction=1.0)
    rng = np.random.default_rng(7)
    sent = []  # the inputs of every request that was mirrored
    with MeshClient(mesh.router_address) as client:
        deadline = time.monotonic() + 30
        while len(sent) < N:
            assert time.monotonic() < deadline, "the shadow policy never reached the router"
            x = rng.uniform(-1, 1, (2, 4)).astype(np.float32)
            if client.infer("sr_tiny", {"x": x}).routed.shadowed:
                sent.append(x)

    def report():
        try:
            r = mesh_registry.compare("sr_tiny", v1, v2)
        except Exception:  # noqa: BLE001 - NOT_FOUND until the first report
            return None
        return r if r.samples >= N else None

    deadline = time.monotonic() + 30
    while (r := report()) is None:
        assert time.monotonic() < deadline, "shadow results never reached the registry"
        time.sleep(0.2)

    # Direct computation on the same requests: y = x (primary) against y = x + 0.5 (shadow).
    per_request = [np.sum(l2_normalise(x) * l2_normalise(x + np.float32(0.5)), axis=1) for x in sent]
    cosines = np.concatenate(per_request)
    assert (r.samples, r.items, r.kind) == (N, 2 * N, "tensor")
    assert abs(r.mean_cosine - cosines.mean()) < 1e-5
    assert r.agreement == r.top1_agreement  # no postprocessing: top-1 is the gate's figure
    assert r.top1_agreement == np.mean([np.argmax(x[i]) == np.argmax(x[i] + 0.5) for x in sent for i in range(2)])
    expected = np.bincount([bucket(float(c)) for c in cosines], minlength=len(COSINE_BOUNDS))
    assert list(r.cosine_bounds) == list(COSINE_BOUNDS) and list(r.cosine_counts) == expected.tolist()
    assert [w.score for w in r.worst] == sorted(w.score for w in r.worst)
    np.testing.assert_allclose(
        [w.score for w in r.worst], sorted(c.min() for c in per_request)[: len(r.worst)], rtol=1e-5
    )
    assert len(r.worst) == 5 and all(len(w.request_id) == 32 and w.items == 2 for w in r.worst)

    env = {**os.environ, "MAAS_REGISTRY_ADDRESS": mesh.registry_address}
    out = subprocess.run(
        [*MAAS, "models", "compare", "sr_tiny", str(v1), str(v2)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "mean cosine" in out.stdout and "█" in out.stdout and r.worst[0].request_id in out.stdout
    out = subprocess.run(
        [*MAAS, "models", "compare", "sr_tiny", str(v2), str(v1), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "--shadow" in out.stderr  # no such direction
    out = subprocess.run(
        [*MAAS, "models", "rollout", "sr_tiny", "--to", str(v2), "--dry-run", "--step-weight", "25", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["planned_weights"] == [25, 50]
    out = subprocess.run(
        [*MAAS, "models", "rollout", "sr_tiny", "--to", str(v2), "--interval", "-1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 2 and "--interval" in out.stderr
