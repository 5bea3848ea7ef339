"""Container figures (issue 12): image sizes; render -> every pod's readiness probe of the chart's
container profile under podman kube play (tools/podman_mesh.py: Triton, registry, tokenizer, vision,
router with the chart's own commands, env, security contexts, volumes and probes); then classify QPS
through the containerised mesh's router vs a local-process mesh (`maas up`'s LocalMesh), both up in
the same run on the same machine, their rounds interleaved. Also Triton alone (an unmodified
tritonclient straight at each mesh's Triton). Needs `make images` and `make models`; without the
images it says so and prints no figures.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from skimage import data

from maas.cli.mesh import cat_photo
from maas.client import MeshClient
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from tests.integration.test_triton_models import classify, preprocess
from tools import podman_kube as pk
from tools.podman_mesh import IMAGES, MODELS, PodmanMesh

SERVICES, TRITON = IMAGES
ROUNDS, ROUND_SECONDS = 5, 2.0


def interleaved_qps(calls: list) -> list[float]:
    """Sequential calls per target, the targets' rounds interleaved so that the shared CPU's load (it
    swings ~8x within minutes here) hits them alike; the best round of each."""
    for call in calls:  # warm-up
        call()
    best = [0.0] * len(calls)
    for _ in range(ROUNDS):
        for i, call in enumerate(calls):
            done, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < ROUND_SECONDS:
                call()
                done += 1
            best[i] = max(best[i], done / elapsed)
    return best


def mesh_classify(client: MeshClient, jpeg: bytes):
    def call():
        top = client.classify([jpeg], "efficientnet_lite0", top_k=5).results[0][0]
        assert "cat" in top.label, top

    return call


def triton_classify(client: grpcclient.InferenceServerClient, cat: np.ndarray):
    def call():
        assert 281 <= int(np.argmax(classify(client, cat)[0])) <= 285

    return call


def main() -> None:
    if not all(pk.image_exists(ref) for ref in IMAGES):
        print("skipped: no podman or no images (run `make images`)")
        return
    print(f"BENCH image_services_mb {pk.image_mb(SERVICES):.0f} <= 1000")
    print(f"BENCH image_triton_cpu_mb {pk.image_mb(TRITON):.0f} <= 2500")
    jpeg, cat = cat_photo(), preprocess(data.chelsea())[None]
    with (
        PodmanMesh(pk.REPO / "build/cluster-bench") as pods,
        tempfile.TemporaryDirectory() as state,
        LocalMesh(MeshConfig(state_dir=Path(state), ports=FREE_PORTS, models=MODELS)) as local,
    ):
        print(
            f"(render -> every pod ready {pods.start_to_ready_s:.1f} s; -> models registered and routable "
            f"{pods.registered_s:.1f} s)"
        )
        print(f"BENCH containers_start_to_ready_s {pods.start_to_ready_s:.1f} <= 120")
        with MeshClient(pods.address("router")) as c_pods, MeshClient(local.router_address) as c_local:
            pods_qps, local_qps = interleaved_qps([mesh_classify(c_pods, jpeg), mesh_classify(c_local, jpeg)])
        t_pods = grpcclient.InferenceServerClient(pods.address("triton", "grpc"))
        t_local = grpcclient.InferenceServerClient(local.triton.grpc_address)
        try:
            tp_qps, tl_qps = interleaved_qps([triton_classify(t_pods, cat), triton_classify(t_local, cat)])
        finally:
            t_pods.close()
            t_local.close()
    print(f"classify QPS through the router: containerised mesh {pods_qps:.1f}, local-process mesh {local_qps:.1f}")
    print(f"BENCH container_demo_e2e_qps_ratio {pods_qps / local_qps:.2f} >= 0.8")
    print(f"classify QPS, Triton alone: container {tp_qps:.1f}, local process {tl_qps:.1f}")
    print(f"BENCH container_triton_classify_qps_ratio {tp_qps / tl_qps:.2f} >= 0.8")


if __name__ == "__main__":
    main()
