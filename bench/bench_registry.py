"""Registry figures, each against a baseline measured in this run on the same machine:

- alias change → Watch delivery latency, against a plain GetModel round trip (the floor of any RPC);
- version register → READY time for a tiny ONNX model and the real minilm, against loading the same
  model straight into Triton (load_model + one inference): the difference is the registry's overhead
  (upload, sha256, ONNX checker, atomic write, config generation, warm-up);
- Triton's RSS growth (tritonserver + its Python backend stubs) over 20 load/unload cycles of a version,
  through the registry's Triton fleet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio

from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO / "model_repository" / "minilm" / "1" / "model.onnx"
ALIAS_MOVES = 200
TINY_REGISTRATIONS = 5
RSS_CYCLES = 20


def tiny_onnx(scale: float) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "c"], ["y"])], "tiny", [x], [y], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def group_rss_mb(leader_pid: int) -> float:
    """RSS of every process in tritonserver's process group (the server and its Python stubs)."""
    total_kb = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != leader_pid:  # field 5 (pgrp), after pid and (comm)
                continue
            with open(f"/proc/{entry}/status") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return total_kb / 1024


def messages(model: str, data: bytes, chunk: int = 1024 * 1024):
    yield pb.RegisterVersionRequest(
        header=pb.RegistrationHeader(
            model=model,
            format=pb.ARTIFACT_FORMAT_ONNX,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            actor="bench",
        )
    )
    for i in range(0, len(data), chunk):
        yield pb.RegisterVersionRequest(chunk=data[i : i + chunk])


async def register_to_ready_ms(stub, model: str, data: bytes) -> tuple[float, int]:
    started = time.perf_counter()
    v = await stub.RegisterVersion(messages(model, data))
    while True:
        got = await stub.GetVersion(pb.GetVersionRequest(model=model, version=v.version))
        if got.state == pb.VERSION_STATE_READY:
            return (time.perf_counter() - started) * 1000, v.version
        if got.state == pb.VERSION_STATE_FAILED:
            raise RuntimeError(got.state_reason)
        await asyncio.sleep(0.01)


async def direct_load_ms(triton: LocalTriton, name: str, data: bytes, config: dict, inputs) -> float:
    """Baseline: the same model written by hand and loaded straight into Triton, plus one inference."""
    folder = Path(triton.config.model_repository) / name / "1"
    folder.mkdir(parents=True)
    started = time.perf_counter()
    (folder / "model.onnx").write_bytes(data)
    client = triton_aio.InferenceServerClient(triton.grpc_address)
    try:
        await client.load_model(name, config=json.dumps({**config, "name": name}))
        await client.infer(name, inputs, model_version="1")
        elapsed = (time.perf_counter() - started) * 1000
        await client.unload_model(name)
    finally:
        await client.close()
    return elapsed


async def run(triton: LocalTriton, workdir: Path) -> None:
    from services.registry.config import RegistryConfig
    from services.registry.server import create_server
    from services.registry.triton_fleet import warmup_inputs
    from services.shared.config import ServerSettings

    cfg = RegistryConfig(
        server=ServerSettings(service_name="registry", listen="127.0.0.1:0", grace_seconds=1),
        database=workdir / "registry.sqlite3",
        model_repository=Path(triton.config.model_repository),
        triton_addresses=(triton.grpc_address,),
        reconcile_interval_seconds=0,
    )  # the RSS cycles drive Triton directly: no repairs
    server, port = create_server(cfg)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = registry_pb2_grpc.RegistryStub(channel)
    try:
        # -- register → ready ---------------------------------------------------------------------
        tiny_ms = []
        for i in range(TINY_REGISTRATIONS):
            ms, _ = await register_to_ready_ms(stub, "tiny", tiny_onnx(float(i + 1)))
            tiny_ms.append(ms)
        tiny_base_config = {
            "backend": "onnxruntime",
            "default_model_filename": "model.onnx",
            "max_batch_size": 32,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
            "instance_group": [{"count": 1}],
        }
        v_tiny = server.registry.get_version("tiny", 1)
        tiny_direct = [
            await direct_load_ms(
                triton, f"direct_tiny_{i}", tiny_onnx(1.0), tiny_base_config, warmup_inputs(v_tiny.signature, 32)
            )
            for i in range(TINY_REGISTRATIONS)
        ]
        minilm = MINILM.read_bytes()
        minilm_ms, minilm_version = await register_to_ready_ms(stub, "minilm", minilm)
        v_minilm = server.registry.get_version("minilm", minilm_version)
        from services.registry.tritonconfig import model_config, to_json

        minilm_config = json.loads(to_json(model_config("direct_minilm", v_minilm, [1], False)))
        minilm_direct = await direct_load_ms(
            triton, "direct_minilm", minilm, minilm_config, warmup_inputs(v_minilm.signature, v_minilm.max_batch_size)
        )

        # -- alias change → Watch delivery --------------------------------------------------------
        watch = stub.Watch(pb.WatchRequest())
        await watch.read()  # snapshot
        delivery_ms, rpc_ms = [], []
        for i in range(ALIAS_MOVES):
            started = time.perf_counter()
            await stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=1 + i % 2))
            event = await watch.read()
            delivery_ms.append((time.perf_counter() - started) * 1000)
            assert event.model_changed.aliases["production"] == 1 + i % 2
            started = time.perf_counter()
            await stub.GetModel(pb.GetModelRequest(model="tiny"))
            rpc_ms.append((time.perf_counter() - started) * 1000)
        watch.cancel()

        # -- Triton RSS over load/unload cycles ---------------------------------------------------
        registry = server.registry
        config = model_config("minilm", v_minilm, [minilm_version], False)
        fleet = registry.fleet
        await fleet.apply("minilm", None, [])
        await fleet.apply("minilm", config, [minilm_version])  # cycle 0 warms allocators and imports
        await fleet.apply("minilm", None, [])
        await asyncio.sleep(1.0)
        rss_start = group_rss_mb(triton.process.pid)
        peak = rss_start
        cycle_ms = []
        for _ in range(RSS_CYCLES):
            started = time.perf_counter()
            await fleet.apply("minilm", config, [minilm_version])
            await fleet.warm_up("minilm", minilm_version, v_minilm.signature, v_minilm.max_batch_size)
            peak = max(peak, group_rss_mb(triton.process.pid))
            await fleet.apply("minilm", None, [])
            cycle_ms.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(1.0)
        rss_end = group_rss_mb(triton.process.pid)
    finally:
        await channel.close()
        await server.stop(0)

    p = lambda a, q: float(np.percentile(a, q))
    print(
        f"alias → watch delivery ms: p50 {p(delivery_ms, 50):.2f} p99 {p(delivery_ms, 99):.2f}; "
        f"GetModel round trip p50 {p(rpc_ms, 50):.2f}"
    )
    print(
        f"register → ready ms: tiny median {statistics.median(tiny_ms):.0f} (direct Triton load "
        f"{statistics.median(tiny_direct):.0f}); minilm {minilm_ms:.0f} (direct {minilm_direct:.0f}, "
        f"{len(minilm) / 1e6:.0f} MB)"
    )
    print(
        f"Triton RSS (server + stubs): {rss_start:.0f} MB after a warm-up cycle, peak {peak:.0f} MB, "
        f"{rss_end:.0f} MB after {RSS_CYCLES} minilm load/unload cycles (cycle median "
        f"{statistics.median(cycle_ms):.0f} ms)"
    )
    print(f"BENCH registry_alias_watch_delivery_p50_ms {p(delivery_ms, 50):.3f} <= 20")
    print(f"BENCH registry_alias_watch_delivery_p99_ms {p(delivery_ms, 99):.3f} <= 50")
    print(f"BENCH registry_alias_watch_over_rpc_p50_ms {p(delivery_ms, 50) - p(rpc_ms, 50):.3f} <= 15")
    print(f"BENCH registry_register_to_ready_tiny_ms {statistics.median(tiny_ms):.0f} <= 5000")
    print(
        f"BENCH registry_register_overhead_tiny_ms {statistics.median(tiny_ms) - statistics.median(tiny_direct):.0f}"
        f" <= 1000"
    )
    print(f"BENCH registry_register_to_ready_minilm_ms {minilm_ms:.0f} <= 30000")
    print(f"BENCH registry_register_overhead_minilm_ms {minilm_ms - minilm_direct:.0f} <= 5000")
    print(f"BENCH triton_rss_growth_mb_{RSS_CYCLES}_cycles {rss_end - rss_start:.1f} <= 200")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="maas-bench-registry-") as tmp:
        repository = Path(tmp) / "repository"
        repository.mkdir()
        with LocalTriton(TritonConfig(model_repository=repository, work_dir=Path(tmp) / "triton")) as triton:
            asyncio.run(run(triton, Path(tmp)))


if __name__ == "__main__":
    main()
