"""Container figures (issue 12): image sizes, and render -> ready of the chart's CPU Triton pod under
podman kube play (tools/podman_kube.py), with the chart's own args, security context, volumes and
readiness probe, loading every model of model_repository/. Needs `make images` and `make models`;
without the images it says so and prints no figures.
Not measured yet: the whole mesh's render -> all ready and container_demo_e2e_qps_ratio (the
services' pods need a discovery mode without the Kubernetes API first; see docs/containers.md).
"""
from __future__ import annotations

import time

from tools import podman_kube as pk

SERVICES, TRITON = "localhost/maas-mesh:0.1.0", "localhost/maas-triton-cpu:0.1.0"


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
    finally:
        play.stop()


if __name__ == "__main__":
    main()
