"""What mTLS costs on the router hop: the same tritonclient load (bench_router's tiny model) against
two local meshes started in this run, one plaintext and one with `maas up --tls` (every hop mTLS:
caller → router with a client certificate, router → Triton with Triton's --grpc-use-ssl-mutual).

The figure is what mTLS adds to the router hop, in bench_router's sense of the hop (a call through
the router minus the same call straight to Triton): p50 at concurrency 1 on the router's OIP data
path (maas-oip-fastpath, the port tritonclient uses), (router - Triton) with mTLS minus (router -
Triton) in plaintext. For information: everything TLS adds to a call through the router (the
caller's and Triton's own TLS included), and the main Python port's hop. One caller goes round the
four targets call by call (so all see the same moments of this shared 2-core machine's load), for
ROUNDS rounds; medians of the per-round figures are reported. Connections are long-lived: this is the
per-call cost (record encryption), not the handshake, which happens once per connection.
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

ROUNDS = 9
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
    return triton_aio.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(pki.key(CLIENT)),
        certificate_chain=str(pki.cert(CLIENT)),
    )


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
    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-tls-") as tmp,
        tiny_mesh(Path(tmp), tls=False) as (plain, plain_version),
        tiny_mesh(Path(tmp), tls=True) as (secure, secure_version),
    ):
        pki = LocalPki(secure.tls_dir)
        hop: dict[str, list[float]] = {"router_oip_fast": [], "router": []}  # what mTLS adds to the router hop
        end_to_end: dict[str, list[float]] = {"router_oip_fast": [], "router": []}  # to a call through the router
        print(
            f"{'round':>5} {'port':>10} {'router plain':>12} {'router mTLS':>12} {'triton plain':>12}"
            f" {'triton mTLS':>12} {'hop added':>9}"
        )
        for r in range(ROUNDS):
            for port in hop:
                # Triton directly (naming the version) in the same interleaving: the hop is router - direct.
                router_plain, router_tls, direct_plain, direct_tls = asyncio.run(
                    p50s_ms(
                        [
                            (plain.addresses[port], None, ""),
                            (secure.addresses[port], pki, ""),
                            (plain.addresses["triton"], None, plain_version),
                            (secure.addresses["triton"], pki, secure_version),
                        ]
                    )
                )
                hop[port].append((router_tls - direct_tls) - (router_plain - direct_plain))
                end_to_end[port].append(router_tls - router_plain)
                print(
                    f"{r:>5} {port:>10} {router_plain:>12.3f} {router_tls:>12.3f} {direct_plain:>12.3f}"
                    f" {direct_tls:>12.3f} {hop[port][-1]:>9.3f}",
                    flush=True,
                )

    def median(values: list[float]) -> float:
        return float(np.median(values))

    print("(machine shared with other sessions: medians of rounds, each round interleaved call by call)")
    print(f"BENCH tls_added_p50_ms_c1 {median(hop['router_oip_fast']):.3f} <= 0.1")
    print(
        f"  all TLS adds to a call through the router (caller's and Triton's TLS included), p50 ms c1: "
        f"{median(end_to_end['router_oip_fast']):.3f}"
    )
    print(
        f"  main Python port: mTLS added to its hop {median(hop['router']):.3f}, "
        f"to a call through it {median(end_to_end['router']):.3f} (p50 ms c1)"
    )


if __name__ == "__main__":
    main()
