"""What tracing costs on the router hop: the same tritonclient load (bench_router.load) against extra
router processes sharing one mesh's peers, differing only in their OTEL_* environment.

  off       no OTEL_* at all (the default: no tracer provider, no interceptors)
  disabled  an OTLP endpoint set but OTEL_SDK_DISABLED=true (what the chart does with tracing off)
  on        OTLP/HTTP export of every request (100% sampling) to a local receiver
"""

from __future__ import annotations

from typing import Any
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.bench_router import MODEL, load, tiny_mesh
from maas.local.mesh import LocalMesh
from maas.local.triton import REPO, free_ports
from tests.fixtures.otlp import OtlpReceiver, http_handler

CONCURRENCY = (1, 8)
SECONDS = 3.0
ROUNDS = 2


def start_router(mesh: LocalMesh, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_ports(1)[0]}"
    a = mesh.addresses
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), clean.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.router",
                "--listen",
                address,
                "--registry",
                a["registry"],
                "--tokenizer",
                a["tokenizer"],
                "--vision",
                a["vision"],
                "--triton",
                a["triton"],
                "--oip-fast-listen",
                "off",
            ],  # tracing is the main port's: the fast path makes no spans
            env={**clean, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(address) as channel:
        health, oip = health_pb2_grpc.HealthStub(channel), service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                    and oip.ModelReady(service_pb2.ModelReadyRequest(name=MODEL), timeout=2).ready
                ):
                    return proc, address
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"router ({env}) did not become ready; see {log}")
            time.sleep(0.1)


def main() -> None:
    receiver = OtlpReceiver()
    http = ThreadingHTTPServer(("127.0.0.1", 0), http_handler(receiver))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{http.server_address[1]}"
    variants = {
        "off": {},
        "disabled": {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SDK_DISABLED": "true"},
        "on": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "always_on",
        },
    }
    routers: list[subprocess.Popen] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="maas-bench-tracing-") as tmp,
            tiny_mesh("maas-bench-tracing-mesh-") as (mesh, version),
        ):
            targets = {"direct": (mesh.addresses["triton"], version)}
            for name, env in variants.items():
                proc, address = start_router(mesh, env, Path(tmp) / f"router-{name}.log")
                routers.append(proc)
                targets[name] = (address, "")
            print(f"{'concurrency':>11} " + " ".join(f"{n + ' ' + col:>14}" for n in targets for col in ("p50", "qps")))
            results = {}
            for c in CONCURRENCY:
                # Variants take turns for ROUNDS rounds and each keeps its best round, so a burst of
                # other load on this 2-core machine cannot decide a ratio on its own.
                best: dict[str, tuple[Any, float]] = {}
                for _ in range(ROUNDS):
                    for n, (address, v) in targets.items():
                        lat, qps = asyncio.run(load(address, v, c, SECONDS))
                        if n not in best or qps > best[n][1]:
                            best[n] = (lat, qps)
                results[c] = best
                print(
                    f"{c:>11} "
                    + " ".join(f"{np.percentile(lat, 50):>14.3f} {qps:>14.0f}" for lat, qps in results[c].values()),
                    flush=True,
                )
    finally:
        for proc in routers:
            proc.terminate()
        for proc in routers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        http.shutdown()
        http.server_close()

    def p50(c, name):
        return float(np.percentile(results[c][name][0], 50))

    def best_qps(c, name):
        return results[c][name][1]

    print(f"spans received while tracing on: {len(receiver.spans)}")
    # The main port is a Python gRPC hop (~0.7 ms here, see bench_router's bare proxy); the router's
    # 0.5 ms target is met by its fast path, which has no tracing to switch.
    print(f"BENCH tracing_off_added_p50_ms_c1 {p50(1, 'off') - p50(1, 'direct'):.3f} <= 1.0")
    print(f"BENCH tracing_off_vs_sdk_disabled_qps_ratio_c8 {best_qps(8, 'off') / best_qps(8, 'disabled'):.3f} >= 0.95")
    print(f"BENCH tracing_on_added_p50_ms_c1 {p50(1, 'on') - p50(1, 'off'):.3f} <= 1.0")
    print(f"BENCH tracing_on_vs_off_qps_ratio_c8 {best_qps(8, 'on') / best_qps(8, 'off'):.3f} >= 0.7")


if __name__ == "__main__":
    main()
