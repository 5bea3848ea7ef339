"""Router hop cost: the same tritonclient load against the router and directly against Triton.

A tiny model (y = 2x on FP32 [1, 4]) keeps Triton's own time small, so the difference is the hop:
added p50/p99 latency and the QPS ratio at concurrency 1, 8 and 64, all measured in this run.

The router answers the Open Inference Protocol on two ports: its fast path
(maas-oip-fastpath, "router-fast", the figures the targets are about) and its main Python port
("router-main", the same protocol with every feature). A bare grpc.aio bytes-forwarding proxy with
no routing at all measures what any Python gRPC hop costs on this machine, so the main port's own
share can be told apart from it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from maas.local.triton import free_ports
from maas.registry_client import RegistryClient
from services.router.peers import MODEL_INFER_METHOD
from services.router.wire import with_model

MODEL = "bench_tiny"
CONCURRENCY = (1, 8, 64)
SECONDS = 5.0
WARMUP_SECONDS = 1.0


def tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["y"])], "tiny", [x], [y], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


async def load(address: str, version: str, concurrency: int, seconds: float) -> tuple[np.ndarray, float]:
    """(latencies in ms, requests per second) of `concurrency` closed-loop callers for `seconds`."""
    client = triton_aio.InferenceServerClient(address)
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    latencies: list[float] = []
    try:

        async def caller(until: float, record: bool):
            while (now := time.perf_counter()) < until:
                await client.infer(MODEL, [inp], model_version=version, client_timeout=30)
                if record:
                    latencies.append((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(caller(time.perf_counter() + WARMUP_SECONDS, False) for _ in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(caller(started + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return np.array(latencies), len(latencies) / elapsed


async def bare_proxy(listen: str, triton: str, version: str) -> None:
    """The floor: bytes in, version appended, bytes to Triton, bytes back. No routing, metrics, checks."""
    channel = grpc.aio.insecure_channel(triton)
    forward = channel.unary_unary(MODEL_INFER_METHOD)

    async def infer(request: bytes, context) -> bytes:
        return await forward(with_model(request, version=version), timeout=context.time_remaining())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
            ),
        )
    )
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def measure(targets: dict[str, tuple[str, str]]) -> dict[int, dict[str, tuple[np.ndarray, float]]]:
    print(
        f"{'concurrency':>11} "
        + " ".join(f"{name + ' ' + col:>16}" for name in targets for col in ("p50", "p99", "qps"))
    )
    results = {}
    for c in CONCURRENCY:
        results[c] = {
            name: asyncio.run(load(address, version, c, SECONDS)) for name, (address, version) in targets.items()
        }
        cells = []
        for latencies, qps in results[c].values():
            cells += [
                f"{np.percentile(latencies, 50):>16.3f}",
                f"{np.percentile(latencies, 99):>16.3f}",
                f"{qps:>16.0f}",
            ]
        print(f"{c:>11} " + " ".join(cells), flush=True)
    return results


@contextmanager
def tiny_mesh(prefix: str) -> Iterator[tuple[LocalMesh, str]]:
    """(a local mesh on free ports with only the tiny model, registered and routable, its version)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        config = MeshConfig(state_dir=Path(tmp) / "mesh", ports=FREE_PORTS, models=())
        with LocalMesh(config) as mesh, RegistryClient(mesh.registry_address) as registry:
            version = str(registry.register(tiny_onnx(Path(tmp) / "tiny.onnx"), MODEL, format="onnx").version)
            registry.wait_ready(MODEL, int(version))
            mesh.wait_routable([MODEL])
            yield mesh, version


def main() -> None:
    with tiny_mesh("maas-bench-router-") as (mesh, version):
        proxy_address = f"127.0.0.1:{free_ports(1)[0]}"
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bench_router",
                "--bare-proxy",
                proxy_address,
                mesh.addresses["triton"],
                version,
            ]
        )
        try:
            time.sleep(1.0)
            # Direct names the version, the router follows the policy: the same version answers all three.
            results = measure(
                {
                    "direct": (mesh.addresses["triton"], version),
                    "bare-proxy": (proxy_address, ""),
                    "router-main": (mesh.router_address, ""),
                    "router-fast": (mesh.addresses["router_oip_fast"], ""),
                }
            )
        finally:
            proxy.kill()
            proxy.wait()

    def p(c, name, q):
        return float(np.percentile(results[c][name][0], q))

    def qps(c, name):
        return results[c][name][1]

    print(f"BENCH router_added_p50_ms_c1 {p(1, 'router-fast', 50) - p(1, 'direct', 50):.3f} <= 0.5")
    print(f"BENCH router_added_p99_ms_c1 {p(1, 'router-fast', 99) - p(1, 'direct', 99):.3f} <= 2.0")
    for c in CONCURRENCY:
        # c8 is the issue's target; at c64 Triton batches 64 calls at once and each hop's CPU (two cores
        # shared with Triton and the load generator) is what limits.
        target = {1: 0.8, 8: 0.8, 64: 0.45}[c]
        print(f"BENCH router_qps_ratio_c{c} {qps(c, 'router-fast') / qps(c, 'direct'):.3f} >= {target}")
    # The main port (Python, every feature): within reach of any Python gRPC hop measured in this run.
    print(
        f"BENCH router_main_port_added_p50_ms_c1 {p(1, 'router-main', 50) - p(1, 'direct', 50):.3f} "
        f"<= {p(1, 'bare-proxy', 50) - p(1, 'direct', 50) + 0.2:.3f}"
    )
    main_over_bare = qps(8, "router-main") / qps(8, "bare-proxy")
    print(f"BENCH router_main_port_vs_bare_proxy_qps_ratio_c8 {main_over_bare:.3f} >= 0.9")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-proxy"]:
        asyncio.run(bare_proxy(*sys.argv[2:5]))
    else:
        main()
