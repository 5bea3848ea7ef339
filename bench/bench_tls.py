"""What mTLS costs on the router hop: the same tritonclient load (bench_router's tiny model) against
two local meshes started in this run, one plaintext and one with `maas up --tls` (every hop mTLS:
caller → router with a client certificate, router → Triton with Triton's --grpc-use-ssl-mutual).

The figure is the p50 difference at concurrency 1 on the router's OIP data path (maas-oip-fastpath,
the port tritonclient uses) and, for information, on its main Python port. One caller alternates
between the two meshes call by call (so both see the same moments of this shared 2-core machine's
load), for ROUNDS rounds; the median of the per-round differences is reported. Connections are long-lived: this is the per-call
cost (record encryption), not the handshake, which happens once per connection.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

from bench.bench_router import MODEL, tiny_onnx
from maas.local.certs import CLIENT, LocalPki
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from maas.registry_client import RegistryClient

ROUNDS = 5
SECONDS = 3.0
WARMUP_SECONDS = 0.5


@contextmanager
def tiny_mesh(root: Path, tls: bool) -> Iterator[tuple[LocalMesh, str]]:
    config = MeshConfig(state_dir=root / ("tls" if tls else "plain"), ports=FREE_PORTS, models=(), tls=tls)
    with LocalMesh(config) as mesh, RegistryClient(mesh.registry_address, tls=mesh.client_tls) as registry:
        version = registry.register(tiny_onnx(root / f"tiny-{tls}.onnx"), MODEL, format="onnx").version
        registry.wait_ready(MODEL, version)
        mesh.wait_routable([MODEL])
        yield mesh, str(version)


def client(address: str, pki: LocalPki | None) -> triton_aio.InferenceServerClient:
    if pki is None:
        return triton_aio.InferenceServerClient(address)
    return triton_aio.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca),
                                            private_key=str(pki.key(CLIENT)), certificate_chain=str(pki.cert(CLIENT)))


async def p50s_ms(plain_address: str, tls_address: str, pki: LocalPki) -> tuple[float, float]:
    """(plaintext p50, mTLS p50) in ms of one caller alternating between the two, call by call, for
    SECONDS after a warm-up: both see the same moments of this machine's load."""
    clients = (client(plain_address, None), client(tls_address, pki))
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    latencies: tuple[list[float], list[float]] = ([], [])
    try:
        for seconds, record in ((WARMUP_SECONDS, False), (SECONDS, True)):
            until = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < until:
                which = i % 2
                i += 1
                started = time.perf_counter()
                await clients[which].infer(MODEL, [inp], client_timeout=30)
                if record:
                    latencies[which].append((time.perf_counter() - started) * 1000)
    finally:
        for c in clients:
            await c.close()
    return float(np.percentile(latencies[0], 50)), float(np.percentile(latencies[1], 50))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="maas-bench-tls-") as tmp, \
            tiny_mesh(Path(tmp), tls=False) as (plain, _), tiny_mesh(Path(tmp), tls=True) as (secure, _):
        pki = LocalPki(secure.tls_dir)
        added: dict[str, list[float]] = {"router_oip": [], "router": []}
        print(f"{'round':>5} {'port':>10} {'plain p50':>10} {'mTLS p50':>10} {'added':>8}")
        for r in range(ROUNDS):
            for port in added:
                plain_p50, tls_p50 = asyncio.run(p50s_ms(plain.addresses[port], secure.addresses[port], pki))
                added[port].append(tls_p50 - plain_p50)
                print(f"{r:>5} {port:>10} {plain_p50:>10.3f} {tls_p50:>10.3f} {added[port][-1]:>8.3f}", flush=True)
    print("(machine shared with other sessions: figures are medians of interleaved rounds)")
    print(f"BENCH tls_added_p50_ms_c1 {float(np.median(added['router_oip'])):.3f} <= 0.1")
    print(f"tls main port (Python) added p50 ms c1: {float(np.median(added['router'])):.3f}")


if __name__ == "__main__":
    main()
