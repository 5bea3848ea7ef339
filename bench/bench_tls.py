"""What mTLS costs on the router hop: the same tritonclient load (bench_router's tiny model) against
two local meshes started in this run, one plaintext and one with `maas up --tls` (every hop mTLS:
caller → router with a client certificate, router → Triton with Triton's --grpc-use-ssl-mutual).

The figure is the p50 difference at concurrency 1 on the router's OIP data path (maas-oip-fastpath,
the port tritonclient uses): everything TLS adds to a call through the router, Triton's own TLS
included. For information: the same on the main Python port, and the router hop's share alone
(router minus direct Triton, mTLS minus plaintext). One caller goes round the targets call by call
(so all see the same moments of this shared 2-core machine's load), for ROUNDS rounds; the median of
the per-round differences is reported. Connections are long-lived: this is the per-call cost (record
encryption), not the handshake, which happens once per connection.
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


async def p50s_ms(targets: list[tuple[str, LocalPki | None, str]]) -> list[float]:
    """p50 latency (ms) of each target for one caller going round the targets call by call, for
    SECONDS after a warm-up: every target sees the same moments of this machine's load. A target is
    (address, the PKI to trust and present or None for plaintext, the model version to ask for)."""
    clients = [client(address, pki) for address, pki, _ in targets]
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    latencies: list[list[float]] = [[] for _ in targets]
    try:
        for seconds, record in ((WARMUP_SECONDS, False), (SECONDS, True)):
            until = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < until:
                which = i % len(clients)
                i += 1
                started = time.perf_counter()
                await clients[which].infer(MODEL, [inp], model_version=targets[which][2], client_timeout=30)
                if record:
                    latencies[which].append((time.perf_counter() - started) * 1000)
    finally:
        for c in clients:
            await c.close()
    return [float(np.percentile(lat, 50)) for lat in latencies]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="maas-bench-tls-") as tmp, \
            tiny_mesh(Path(tmp), tls=False) as (plain, plain_version), \
            tiny_mesh(Path(tmp), tls=True) as (secure, secure_version):
        pki = LocalPki(secure.tls_dir)
        added: dict[str, list[float]] = {"router_oip": [], "router": []}
        hop_only: list[float] = []
        print(f"{'round':>5} {'port':>10} {'plain p50':>10} {'mTLS p50':>10} {'added':>8}"
              f" {'triton plain':>12} {'triton mTLS':>12}")
        for r in range(ROUNDS):
            for port in added:
                # Triton directly too (naming the version): what TLS costs a caller with no router at all.
                plain_p50, tls_p50, plain_direct, tls_direct = asyncio.run(p50s_ms([
                    (plain.addresses[port], None, ""), (secure.addresses[port], pki, ""),
                    (plain.addresses["triton"], None, plain_version), (secure.addresses["triton"], pki, secure_version)]))
                added[port].append(tls_p50 - plain_p50)
                if port == "router_oip":
                    hop_only.append((tls_p50 - tls_direct) - (plain_p50 - plain_direct))
                print(f"{r:>5} {port:>10} {plain_p50:>10.3f} {tls_p50:>10.3f} {added[port][-1]:>8.3f}"
                      f" {plain_direct:>12.3f} {tls_direct:>12.3f}", flush=True)
    print("(machine shared with other sessions: figures are medians of rounds, each round interleaved call by call)")
    print(f"BENCH tls_added_p50_ms_c1 {float(np.median(added['router_oip'])):.3f} <= 0.1")
    print(f"tls main port (Python) added p50 ms c1: {float(np.median(added['router'])):.3f}")
    print(f"tls added by the router hop itself (router minus direct Triton, mTLS minus plaintext) p50 ms c1: "
          f"{float(np.median(hop_only)):.3f}")


if __name__ == "__main__":
    main()
