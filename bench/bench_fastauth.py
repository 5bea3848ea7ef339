"""The OIP fast path's key check:

- fast_auth_added_p50_ms_c1: one caller, tiny model, tritonclient ModelInfer on the fast path (50055) of a
  router with auth on (the compiled forwarder hashes the key and checks the tenant) against the fast path
  of an identical router with auth off, both in this process (their forwarders are child processes),
  calls interleaved one by one so drift of the machine's load hits both alike. Both get the same request,
  key included: the figure is what checking it adds. The main port's p50 with auth on is printed beside
  it (what a call of a quota tenant, handed to the main port, costs).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from maas.local.processes import free_ports
from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc
from services.router.admission import AdmissionSettings
from services.router.fastpath import find_binary
from tests.fixtures.flood import p50
from tests.fixtures.registry import header, registry_config, tiny_onnx, upload_messages, wait_state

ADMIN = "bench-admin-token"
CALLS = 2000
X = np.ones((1, 4), np.float32)


def _inputs() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return [inp]


def _serving(client: grpcclient.InferenceServerClient, headers: dict) -> None:
    for _ in range(600):
        try:
            client.infer("tiny", _inputs(), headers=headers, client_timeout=5)
            return
        except Exception:  # noqa: BLE001 - not serving yet (routing state, tenant list, forwarder start)
            time.sleep(0.1)
    raise TimeoutError("fast path not serving")


def _interleaved(clients: dict[str, grpcclient.InferenceServerClient], headers: dict, n: int) -> dict[str, list]:
    """n calls on each client, one by one in rotating order: ms per call, by client name."""
    names = list(clients)
    out: dict[str, list[float]] = {name: [] for name in names}
    inputs = _inputs()
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            clients[name].infer("tiny", inputs, headers=headers, client_timeout=30)
            out[name].append((time.perf_counter() - start) * 1000)
    return out


async def run(work: Path) -> None:
    from services.registry.server import create_server
    from services.router.config import RouterConfig
    from services.router.server import create_server as create_router
    from services.shared.config import ServerSettings

    if not find_binary():
        raise RuntimeError("maas-oip-fastpath is not built (make fastpath)")
    with LocalTriton(TritonConfig(model_repository=work / "repository", work_dir=work / "triton")) as triton:
        cfg = registry_config(work / "repository", work / "registry.sqlite3", triton.grpc_address, ADMIN)
        registry, port = create_server(cfg)
        await registry.start()
        address = f"127.0.0.1:{port}"
        auth = (("authorization", f"Bearer {ADMIN}"),)
        servers, clients = [], {}
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                reg = registry_pb2_grpc.RegistryStub(channel)
                data = tiny_onnx(2.0)
                version = await reg.RegisterVersion(upload_messages(header("tiny", data), data), metadata=auth)
                assert (await wait_state(reg, "tiny", version.version)).state == pb.VERSION_STATE_READY
                key = (
                    await reg.CreateTenant(pb.CreateTenantRequest(name="bench", actor="bench"), metadata=auth)
                ).api_key
            for name, on in (("on", True), ("off", False)):
                fast = f"127.0.0.1:{free_ports(1)[0]}"
                rcfg = RouterConfig(
                    server=ServerSettings(service_name="router", listen="127.0.0.1:0", grace_seconds=0.5, workers=1),
                    registry=address,
                    tokenizer="127.0.0.1:1",
                    vision="127.0.0.1:1",
                    triton=triton.grpc_address,
                    admin_token=ADMIN,
                    admission=AdmissionSettings(auth=on),
                    oip_fast_listen=fast,
                    oip_fast_binary=find_binary() or "",
                )
                server, rport = create_router(rcfg)
                await server.start()
                servers.append(server)
                clients[name] = grpcclient.InferenceServerClient(fast)
                if on:
                    clients["main port, auth on"] = grpcclient.InferenceServerClient(f"127.0.0.1:{rport}")
            headers = {"authorization": f"Bearer {key}"}
            for client in clients.values():
                await asyncio.to_thread(_serving, client, headers)
            await asyncio.to_thread(_interleaved, clients, headers, 200)  # warm-up
            series = await asyncio.to_thread(_interleaved, clients, headers, CALLS)
        finally:
            for client in clients.values():
                client.close()
            for server in servers:
                await server.stop(0)
            await registry.stop(0)
    checked, unchecked, main_port = series["on"], series["off"], series["main port, auth on"]
    print(
        f"fast path ModelInfer p50: auth on {p50(checked):.3f} ms, auth off {p50(unchecked):.3f} ms (same "
        f"request, key sent to both; {CALLS} calls each, interleaved); main port with auth on "
        f"{p50(main_port):.3f} ms"
    )
    print(f"BENCH fast_auth_added_p50_ms_c1 {max(p50(checked) - p50(unchecked), 0.0):.3f} <= 0.05")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="maas-bench-fastauth-") as work:
        (Path(work) / "repository").mkdir()
        asyncio.run(run(Path(work)))


if __name__ == "__main__":
    main()
