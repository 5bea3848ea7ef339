"""Container figures (issue 12): image sizes, and render -> ready of the chart's CPU Triton pod under
podman kube play (tools/podman_kube.py), with the chart's own args, security context, volumes and
readiness probe, loading every model of model_repository/. Needs `make images` and `make models`;
without the images it says so and prints no figures.
Then classify QPS through an unmodified tritonclient against that pod vs a local-process Triton
(container_triton_classify_qps_ratio; Triton alone).
Not measured yet: the whole mesh's render -> all ready and container_demo_e2e_qps_ratio (the
services' pods need a discovery mode without the Kubernetes API first; see docs/containers.md).
"""
from __future__ import annotations

import time

import numpy as np
import tritonclient.grpc as grpcclient
from skimage import data

from maas.local.triton import REPO, LocalTriton, TritonConfig
from tests.integration.test_triton_models import classify, preprocess
from tools import podman_kube as pk

SERVICES, TRITON = "localhost/maas-mesh:0.1.0", "localhost/maas-triton-cpu:0.1.0"
ROUNDS, ROUND_SECONDS = 5, 2.0


def classify_qps(addresses: list[str]) -> list[float]:
    """Sequential single-image classify requests (an unmodified tritonclient, gRPC) per address, the
    addresses' rounds interleaved so that the shared CPU's load hits them alike; best round each."""
    cat = preprocess(data.chelsea())[None]
    clients = [grpcclient.InferenceServerClient(a) for a in addresses]
    try:
        for c in clients:  # the cat, in the container too; also the warm-up
            assert 281 <= int(np.argmax(classify(c, cat)[0])) <= 285
        best = [0.0] * len(clients)
        for _ in range(ROUNDS):
            for i, c in enumerate(clients):
                done, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < ROUND_SECONDS:
                    classify(c, cat)
                    done += 1
                best[i] = max(best[i], done / elapsed)
        return best
    finally:
        for c in clients:
            c.close()


def main() -> None:
    if not all(pk.image_exists(ref) for ref in (SERVICES, TRITON)):
        print("skipped: no podman or no images (run `make images`)")
        return
    print(f"BENCH image_services_mb {pk.image_mb(SERVICES):.0f} <= 1000")
    print(f"BENCH image_triton_cpu_mb {pk.image_mb(TRITON):.0f} <= 2500")
    start = time.monotonic()
    docs = pk.render()
    triton = next(d["metadata"]["name"] for d in docs
                  if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-triton"))
    claim = next(d["metadata"]["name"] for d in docs
                 if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-models"))
    play = pk.Play(docs, [triton], pk.REPO / "build/cluster")
    try:
        play.start(models_claim=claim)
        play.wait_http_probe(triton)
        print("(containers_start_to_ready_s: the Triton pod only, all models loaded)")
        print(f"BENCH containers_start_to_ready_s {time.monotonic() - start:.1f} <= 120")
        with LocalTriton(TritonConfig(model_repository=REPO / "model_repository",
                                      models=["efficientnet_lite0"])) as local:
            container_qps, local_qps = classify_qps([f"{play.address(triton)}:8001", local.grpc_address])
    finally:
        play.stop()
    # Triton alone (the mesh's services are not containerised yet): container vs local process.
    print(f"classify QPS: container Triton {container_qps:.1f}, local-process Triton {local_qps:.1f}")
    print(f"BENCH container_triton_classify_qps_ratio {container_qps / local_qps:.2f} >= 0.8")


if __name__ == "__main__":
    main()
