"""A version the registry has as READY that Triton does not serve (yet) is UNAVAILABLE on both router
ports — retryable, saying it is (re)loading — never Triton's NOT_FOUND; NOT_FOUND stays for what the
registry does not have.

A real registry loads `tiny` on its Triton (A); the router's Triton (B, same repository) is a replica
that came back empty, as after a restart: B has never loaded `tiny` (Triton says NOT_FOUND). Then B
loads it (the router serves it), then it is unloaded behind the registry's back (Triton says
UNAVAILABLE "not at ready state").
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from maas.local.processes import free_ports
from maas.local.triton import LocalTriton, TritonConfig
from maas.v1 import registry_pb2 as pb
from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.router.config import RouterConfig
from services.router.fastpath import find_binary
from services.router.server import create_server
from services.shared.config import ServerSettings
from tests.fixtures.registry import header, tiny_onnx, triton_versions, upload_messages, wait_state
from tests.fixtures.replicas import eventually

X = np.arange(4, dtype=np.float32).reshape(1, 4)


async def oip_status(address: str, version: str = "") -> tuple[str, str]:
    """(status, message) of one tritonclient ModelInfer of tiny through `address`; ("OK", "") on success."""
    client = triton_aio.InferenceServerClient(address)
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    try:
        result = await client.infer("tiny", [inp], model_version=version, client_timeout=20)
        np.testing.assert_array_equal(result.as_numpy("y"), X * 2)
        return "OK", ""
    except InferenceServerException as exc:
        return exc.status(), exc.message()
    finally:
        await client.close()


async def router_status(address: str) -> tuple[str, str]:
    """The same through maas.v1.Router/Infer on the main port."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.InferRequest(
            model=tensor_pb2.ModelRef(name="tiny"),
            inputs=[tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4], raw_contents=X.tobytes())],
        )
        try:
            await router_pb2_grpc.RouterStub(channel).Infer(request, timeout=20)
            return "OK", ""
        except grpc.aio.AioRpcError as exc:
            return f"StatusCode.{exc.code().name}", exc.details()


@pytest.fixture
def triton_b(empty_triton, tmp_path):
    """A second Triton on the registry's repository that loads nothing by itself."""
    with LocalTriton(TritonConfig(model_repository=empty_triton.repository, work_dir=tmp_path / "triton-b")) as b:
        yield b


async def test_a_ready_version_triton_does_not_serve_is_unavailable_on_both_ports(start_registry, triton_b):
    assert find_binary(), "build/bin/maas-oip-fastpath is missing: `make fastpath`"
    env = await start_registry()
    data = tiny_onnx(2.0)
    v1 = await wait_state(
        env.stub, "tiny", (await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))).version
    )
    assert v1.state == pb.VERSION_STATE_READY, v1.state_reason
    assert await triton_versions(triton_b, "tiny", states=("READY", "UNAVAILABLE", "LOADING")) == set()

    fast = f"127.0.0.1:{free_ports(1)[0]}"
    cfg = RouterConfig(
        server=ServerSettings(service_name="router", listen="127.0.0.1:0", grace_seconds=0.5, workers=1),
        registry=env.address,
        tokenizer="127.0.0.1:1",
        vision="127.0.0.1:1",
        triton=triton_b.grpc_address,
        default_timeout=10.0,
        oip_fast_listen=fast,
        oip_fast_binary=find_binary(),
    )
    server, port = create_server(cfg)
    await server.start()
    main = f"127.0.0.1:{port}"
    b = triton_aio.InferenceServerClient(triton_b.grpc_address)
    try:

        async def routable() -> bool:  # the routing state arrived (until then: "routing state not received")
            return "(re)loading" in (await oip_status(main))[1]

        await eventually(routable, what="routing state")

        async def answers() -> dict[str, tuple[str, str]]:
            return {
                "main port": await oip_status(main),
                "fast path": await oip_status(fast),
                "explicit version": await oip_status(fast, str(v1.version)),
                "maas.v1 Infer": await router_status(main),
            }

        # 1. B has never loaded tiny: Triton says NOT_FOUND; the caller gets UNAVAILABLE, (re)loading.
        direct = await oip_status(triton_b.grpc_address, str(v1.version))
        assert direct[0] == "StatusCode.NOT_FOUND", direct
        for where, (code, message) in (await answers()).items():
            assert code == "StatusCode.UNAVAILABLE", (where, code, message)
            assert "(re)loading" in message and f"'tiny' version {v1.version}" in message, (where, message)
            assert direct[1] in message, (where, message)  # Triton's words kept after ours
        messages = {message for _, message in (await answers()).values()}
        assert len(messages) == 1, messages  # one wording on every port

        # 2. B loads it: served on every port.
        await b.load_model("tiny")
        assert set((await answers()).values()) == {("OK", "")}

        # 3. Unloaded behind the registry's back: Triton says UNAVAILABLE "not at ready state"; same answer.
        await b.unload_model("tiny")

        async def unloaded() -> bool:
            return not await triton_versions(triton_b, "tiny")

        await eventually(unloaded, what="tiny unloaded on B")
        for where, (code, message) in (await answers()).items():
            assert code == "StatusCode.UNAVAILABLE" and "(re)loading" in message, (where, code, message)

        # A version the registry does not have stays NOT_FOUND, in Triton's words, on both ports.
        for address in (main, fast):
            code, message = await oip_status(address, "7")
            assert code == "StatusCode.NOT_FOUND", (address, code, message)
            assert message.startswith("Request for unknown model: 'tiny' version 7 is not found"), message
    finally:
        await b.close()
        await server.stop(0)
