"""The router server end to end in-process, against fake peers on loopback (no processes).

Fakes: a registry (Watch + ReportShadowResults), a tokenizer, a vision service and a Triton speaking
the real Open Inference Protocol. The real-process tests are in tests/integration/test_router*.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas.v1 import (
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    tensor_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from services.router.config import RouterConfig
from services.router.server import create_server
from services.shared.config import ServerSettings
from services.shared.tensors import from_proto, to_proto

R = registry_pb2
LABELS = ["zero", "one", "two", "three"]


# -- fakes -------------------------------------------------------------------------------------------
def version(
    model,
    n,
    pre=R.Preprocessing.KIND_NONE,
    pre_name="",
    post=R.Postprocessing.KIND_NONE,
    state=R.VERSION_STATE_READY,
    inputs=(("x", "FP32"),),
    output="out",
    labels=(),
):
    return R.ModelVersion(
        model=model,
        version=n,
        state=state,
        signature=R.Signature(
            inputs=[R.TensorSpec(name=i, datatype=d, shape=[-1]) for i, d in inputs],
            outputs=[R.TensorSpec(name=output, datatype="FP32", shape=[4])],
        ),
        preprocessing=R.Preprocessing(kind=pre, name=pre_name),
        postprocessing=R.Postprocessing(kind=post),
        labels=labels,
    )


def routing_state():
    tok_inputs = (("input_ids", "INT64"), ("attention_mask", "INT64"))
    embedder = [
        version(
            "embedder", n, R.Preprocessing.KIND_TOKENIZER, "tok", R.Postprocessing.KIND_EMBEDDING, inputs=tok_inputs
        )
        for n in (1, 2)
    ]
    classifier = [
        version(
            "classifier",
            1,
            R.Preprocessing.KIND_VISION,
            "spec",
            R.Postprocessing.KIND_SOFTMAX_TOP_K,
            inputs=(("pixels", "FP32"),),
            labels=LABELS,
        )
    ]
    tiny = [version("tiny", 1), version("tiny", 2), version("tiny", 3, state=R.VERSION_STATE_LOADING)]
    return [
        R.ModelRouting(model="embedder", versions=embedder, aliases={"production": 1}),
        R.ModelRouting(model="classifier", versions=classifier, aliases={"production": 1}),
        R.ModelRouting(model="tiny", versions=tiny, aliases={"production": 1, "canary": 2}),
        R.ModelRouting(model="slow", versions=[version("slow", 1)]),
    ]


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    def __init__(self):
        self.models = routing_state()
        self.events: asyncio.Queue = asyncio.Queue()
        self.reports: list[R.ShadowResult] = []
        self.version_stats: list[R.VersionStats] = []
        self.revision = 1

    async def Watch(self, request, context):
        yield R.WatchEvent(revision=self.revision, snapshot=R.RoutingState(models=self.models))
        while True:
            yield await self.events.get()

    def change(self, model: R.ModelRouting):
        self.revision += 1
        self.models = [m for m in self.models if m.model != model.model] + [model]
        self.events.put_nowait(R.WatchEvent(revision=self.revision, model_changed=model))

    async def ReportShadowResults(self, request, context):
        self.reports.extend(request.results)
        return R.ReportShadowResultsResponse()

    async def ReportVersionStats(self, request, context):
        self.version_stats.extend(request.stats)
        return R.ReportVersionStatsResponse()


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self):
        self.calls = []
        self.cancelled = asyncio.Event()

    async def Tokenize(self, request, context):
        self.calls.append(request.tokenizer)
        if request.texts[0] == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        ids = np.array([[101, len(t) + 1, 102] for t in request.texts], np.int64)
        return tokenizer_pb2.TokenizeResponse(
            tensors=[
                to_proto("input_ids", ids),
                to_proto("attention_mask", np.ones_like(ids)),
                to_proto("token_type_ids", np.zeros_like(ids)),
            ],
            items=[tokenizer_pb2.TokenizedItem(length=3, truncated=len(t) > 10) for t in request.texts],
            tokenizer=request.tokenizer,
        )


class FakeVision(vision_pb2_grpc.VisionServicer):
    async def Preprocess(self, request, context):
        pixels = np.array([[len(image), 0, 0] for image in request.images], np.float32)
        return vision_pb2.PreprocessResponse(tensor=to_proto(request.output_name, pixels), spec=request.spec)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """out[:, 0] = sum of the first input's row, out[:, 1] = version, out[:, 3] = 1."""

    def __init__(self):
        self.calls: list[tuple[str, str, list[str]]] = []
        self.cancelled = asyncio.Event()

    async def ModelInfer(self, request, context):
        self.calls.append((request.model_name, request.model_version, [i.name for i in request.inputs]))
        if request.model_name == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        first = request.inputs[0]
        x = from_proto(
            tensor_pb2.Tensor(
                name=first.name, datatype=first.datatype, shape=first.shape, raw_contents=request.raw_input_contents[0]
            )
        ).astype(np.float32)
        out = np.zeros((x.shape[0], 4), np.float32)
        out[:, 0] = x.reshape(x.shape[0], -1).sum(axis=1)
        out[:, 1] = float(request.model_version)
        out[:, 3] = 1
        name = request.outputs[0].name if request.outputs else "out"
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        response.outputs.add(name=name, datatype="FP32", shape=out.shape)
        response.raw_output_contents.append(out.tobytes())
        return response

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="triton", version="2.51", extensions=["classification"])

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelConfig(self, request, context):
        response = service_pb2.ModelConfigResponse()
        response.config.name, response.config.max_batch_size = request.name, 4
        return response

    async def ModelMetadata(self, request, context):
        return service_pb2.ModelMetadataResponse(
            name=request.name,
            versions=[request.version],
            platform="fake",
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name="x", datatype="FP32", shape=[-1, -1])],
            outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name="out", datatype="FP32", shape=[-1, 4])],
        )


async def start(add, servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class Mesh:
    """Fake peers + the real router, all in this event loop."""

    async def start(self, registry_address: str | None = None, oip_fast_listen: str = "", oip_fast_binary: str = ""):
        """oip_fast_listen/binary: also run the router's OIP fast path (a process: integration tests)."""
        self.registry, self.tokenizer, self.vision, self.triton = (
            FakeRegistry(),
            FakeTokenizer(),
            FakeVision(),
            FakeTriton(),
        )
        self.servers = {}
        for name, add, servicer in (
            ("registry", registry_pb2_grpc.add_RegistryServicer_to_server, self.registry),
            ("tokenizer", tokenizer_pb2_grpc.add_TokenizerServicer_to_server, self.tokenizer),
            ("vision", vision_pb2_grpc.add_VisionServicer_to_server, self.vision),
            ("triton", service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, self.triton),
        ):
            self.servers[name] = await start(add, servicer)
        cfg = RouterConfig(
            server=ServerSettings(service_name="router", listen="127.0.0.1:0", grace_seconds=0.5, workers=1),
            registry=registry_address or self.servers["registry"][1],
            tokenizer=self.servers["tokenizer"][1],
            vision=self.servers["vision"][1],
            triton=self.servers["triton"][1],
            default_timeout=5.0,
            shadow_report_interval=0.05,
            stats_report_interval=0.05,
            oip_fast_listen=oip_fast_listen,
            oip_fast_binary=oip_fast_binary,
        )
        self.router, port = create_server(cfg)
        await self.router.start()
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        return self

    async def synced(self):
        for _ in range(200):
            try:
                await self.stub.Infer(
                    router_pb2.InferRequest(model=tensor_pb2.ModelRef(name="tiny"), inputs=[x_tensor()]), timeout=1
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.02)
        raise AssertionError("router never received the routing state")

    async def stop(self):
        await self.channel.close()
        await self.router.stop(0)
        for server, _ in self.servers.values():
            await server.stop(0)


def x_tensor(rows=2):
    return to_proto("x", np.arange(rows * 3, dtype=np.float32).reshape(rows, 3))


@pytest.fixture
async def mesh():
    m = await Mesh().start()
    try:
        await m.synced()
        yield m
    finally:
        await m.stop()


def ref(name, **kw):
    return tensor_pb2.ModelRef(name=name, **kw)


# -- tests ---------------------------------------------------------------------------------------------
async def test_embed_runs_the_versions_pipeline(mesh):
    response = await mesh.stub.Embed(router_pb2.EmbedRequest(model=ref("embedder"), texts=["hi", "a longer sentence"]))
    vectors = np.array([e.values for e in response.embeddings])
    assert vectors.shape == (2, 4) and response.dimensions == 4
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)  # KIND_EMBEDDING: L2-normalised
    assert list(response.truncated) == [False, True]
    assert (response.routed.model, response.routed.version, response.routed.kind) == (
        "embedder",
        1,
        tensor_pb2.ROUTE_KIND_DEFAULT,
    )
    assert mesh.tokenizer.calls == ["tok"]
    # Only the inputs of the version's signature go to Triton (not token_type_ids).
    assert mesh.triton.calls[-1] == ("embedder", "1", ["input_ids", "attention_mask"])


async def test_classify_softmax_top_k_with_labels(mesh):
    response = await mesh.stub.Classify(
        router_pb2.ClassifyRequest(model=ref("classifier"), images=[b"abc", b"a"], top_k=2)
    )
    assert len(response.results) == 2
    for result in response.results:
        scores = [c.score for c in result.classes]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
        assert all(c.label == LABELS[c.index] for c in result.classes)
    # Logits [3, 1, 0, 1] for the 3-byte image: class 0 wins.
    assert response.results[0].classes[0].index == 0


async def test_wrong_rpc_for_the_model_is_invalid_argument(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Embed(router_pb2.EmbedRequest(model=ref("classifier"), texts=["x"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not take texts" in err.value.details()


async def test_any_registered_model_through_infer_without_router_changes(mesh):
    response = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny", version=2), inputs=[x_tensor()]))
    out = from_proto(response.outputs[0])
    np.testing.assert_array_equal(out[:, 0], [3, 12])
    assert (response.routed.version, response.routed.kind) == (2, tensor_pb2.ROUTE_KIND_EXPLICIT_VERSION)
    aliased = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny", alias="canary"), inputs=[x_tensor()]))
    assert (aliased.routed.version, aliased.routed.target) == (2, "canary")


async def test_batches_over_tritons_limit_are_split_and_joined_in_order(mesh):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)  # max_batch_size 4 → slices of 4, 4, 2
    response = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[to_proto("x", x)]))
    np.testing.assert_array_equal(from_proto(response.outputs[0])[:, 0], x.sum(axis=1))
    assert sum(1 for call in mesh.triton.calls if call[0] == "tiny") >= 3


@pytest.mark.parametrize(
    "model_ref,code",
    [
        (ref("nope"), grpc.StatusCode.NOT_FOUND),
        (ref("tiny", version=9), grpc.StatusCode.NOT_FOUND),
        (ref("tiny", version=3), grpc.StatusCode.FAILED_PRECONDITION),
        (ref("tiny", alias="missing"), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_routing_errors(mesh, model_ref, code):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Infer(router_pb2.InferRequest(model=model_ref, inputs=[x_tensor()]))
    assert err.value.code() == code


async def test_open_inference_protocol_passthrough(mesh):
    client = triton_aio.InferenceServerClient(mesh.address)
    direct = triton_aio.InferenceServerClient(mesh.servers["triton"][1])
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("tiny") and await client.is_model_ready("tiny", "2")
        assert not await client.is_model_ready("tiny", "3") and not await client.is_model_ready("nope")
        meta = await client.get_model_metadata("tiny", as_json=True)
        assert meta["name"] == "tiny" and meta["versions"] == ["1", "2"]
        from tritonclient.grpc import InferInput

        inp = InferInput("x", [2, 3], "FP32")
        inp.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
        routed = await client.infer("tiny", [inp], request_id="abc")
        assert routed.get_response().model_version == "1" and routed.get_response().id == "abc"  # policy: production
        same = await direct.infer("tiny", [inp], model_version="1", request_id="abc")
        assert routed.get_response() == same.get_response()
        canary = await client.infer("tiny", [inp], model_version="canary")  # an alias as the OIP version
        assert canary.get_response().model_version == "2"
        with pytest.raises(Exception, match="not registered"):
            await client.infer("nope", [inp])
        with pytest.raises(Exception, match="not served by the router"):
            await client.load_model("tiny")
    finally:
        await client.close()
        await direct.close()


async def test_oip_routing_key_metadata_is_sticky(mesh):
    split = [R.TrafficTarget(version=1, weight=50), R.TrafficTarget(version=2, weight=50)]
    mesh.registry.change(
        R.ModelRouting(
            model="tiny",
            versions=routing_state()[2].versions,
            aliases={"production": 1},
            policy=R.TrafficPolicy(model="tiny", split=split),
        )
    )
    await asyncio.sleep(0.2)
    client = triton_aio.InferenceServerClient(mesh.address)
    try:
        from tritonclient.grpc import InferInput

        inp = InferInput("x", [1, 3], "FP32")
        inp.set_data_from_numpy(np.ones((1, 3), np.float32))
        for key in ("alice", "bob"):
            versions = {
                (await client.infer("tiny", [inp], headers={"x-maas-routing-key": key})).get_response().model_version
                for _ in range(10)
            }
            assert len(versions) == 1
        seen = {(await client.infer("tiny", [inp])).get_response().model_version for _ in range(40)}
        assert seen == {"1", "2"}
    finally:
        await client.close()


async def test_registry_changes_apply_and_registry_loss_keeps_serving(mesh):
    tiny = routing_state()[2]
    mesh.registry.change(R.ModelRouting(model="tiny", versions=tiny.versions, aliases={"production": 2}))
    for _ in range(100):
        response = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[x_tensor()]))
        if response.routed.version == 2:
            break
        await asyncio.sleep(0.02)
    assert response.routed.version == 2
    registry_server, _ = mesh.servers["registry"]
    await registry_server.stop(0)
    await asyncio.sleep(0.3)
    response = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[x_tensor()]), timeout=2)
    assert response.routed.version == 2  # the last state, still served


async def test_triton_down_is_unavailable_quickly(mesh):
    triton_server, _ = mesh.servers["triton"]
    await triton_server.stop(0)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[x_tensor()]), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton (127.0.0.1:" in err.value.details()
    assert time.monotonic() - started < 1.5


async def test_deadline_reaches_triton_and_cancels_it(mesh):
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Infer(router_pb2.InferRequest(model=ref("slow"), inputs=[x_tensor()]), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    await asyncio.wait_for(mesh.triton.cancelled.wait(), 2)  # Triton saw the call end too


async def test_deadline_reaches_the_preprocessing_service_and_cancels_it(mesh):
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Embed(router_pb2.EmbedRequest(model=ref("embedder"), texts=["slow"]), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1.5
    await asyncio.wait_for(mesh.tokenizer.cancelled.wait(), 2)


async def test_shadow_never_changes_the_answer_and_is_reported(mesh):
    tiny = routing_state()[2]
    shadow = R.ShadowPolicy(target=R.TrafficTarget(version=2), fraction=1.0)
    mesh.registry.change(
        R.ModelRouting(
            model="tiny",
            versions=tiny.versions,
            aliases={"production": 1},
            policy=R.TrafficPolicy(model="tiny", shadow=shadow),
        )
    )
    for _ in range(100):
        response = await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[x_tensor()]))
        if response.routed.shadowed:
            break
        await asyncio.sleep(0.02)
    assert response.routed.shadowed and response.routed.version == 1
    assert from_proto(response.outputs[0])[0, 1] == 1.0  # the primary's answer, never the shadow's
    for _ in range(100):
        if mesh.registry.reports:
            break
        await asyncio.sleep(0.02)
    report = mesh.registry.reports[0]
    assert (report.model, report.primary_version, report.shadow_version, report.items) == ("tiny", 1, 2, 2)
    assert report.top1_agreed == 2 and 0 < report.cosine_sum <= 2.0001
    assert ("tiny", "2", ["x"]) in mesh.triton.calls


async def test_requests_are_reported_per_version_with_errors_and_latency(mesh):
    """What rollouts analyse (docs/rollouts.md): each routed request counts against its version."""
    for _ in range(3):
        await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny", version=2), inputs=[x_tensor()]))
    with pytest.raises(grpc.aio.AioRpcError):  # a wrong input name: refused for v2, counted as its error
        await mesh.stub.Infer(
            router_pb2.InferRequest(
                model=ref("tiny", version=2), inputs=[to_proto("nope", np.zeros((1, 3), np.float32))]
            )
        )
    with pytest.raises(grpc.aio.AioRpcError):  # no version chosen: counted nowhere
        await mesh.stub.Infer(router_pb2.InferRequest(model=ref("nope"), inputs=[x_tensor()]))

    def totals():
        mine = [s for s in mesh.registry.version_stats if (s.model, s.version) == ("tiny", 2)]
        errors = {}
        for s in mine:
            for code, n in s.errors.items():
                errors[code] = errors.get(code, 0) + n
        return sum(s.requests for s in mine), errors, sum(sum(s.latency_counts) for s in mine)

    for _ in range(200):
        if totals()[0] >= 4:
            break
        await asyncio.sleep(0.02)
    assert totals() == (4, {"INVALID_ARGUMENT": 1}, 3)
    assert not any(s.model == "nope" for s in mesh.registry.version_stats)
    stats = mesh.registry.version_stats[0]
    assert len(stats.latency_counts) == len(stats.latency_bounds_ms) + 1


async def test_requests_before_the_first_snapshot_are_unavailable():
    m = await Mesh().start(registry_address="127.0.0.1:1")  # nothing listens there
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await m.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[x_tensor()]), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "routing state" in err.value.details()
        client = triton_aio.InferenceServerClient(m.address)
        assert await client.is_server_live() and not await client.is_server_ready()
        await client.close()
    finally:
        await m.stop()


async def test_routing_metrics(mesh):
    from prometheus_client import REGISTRY

    labels = {"model": "tiny", "version": "2", "route": "explicit_version"}
    before = REGISTRY.get_sample_value("maas_router_requests_total", labels) or 0
    await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny", version=2), inputs=[x_tensor()]))
    assert REGISTRY.get_sample_value("maas_router_requests_total", labels) == before + 1
    assert REGISTRY.get_sample_value("maas_router_inflight_requests") == 0  # back to zero once answered


async def test_hostile_but_parseable_requests_are_invalid_argument(mesh):
    """Inputs that used to reach code that raises (INTERNAL): non-ASCII digits as an OIP model_version,
    a shape whose element count overflows int64."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    client = triton_aio.InferenceServerClient(mesh.address)
    try:
        inp = InferInput("x", [1, 3], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
        for version in ("²", "١", "1\u0662"):
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("tiny", [inp], model_version=version)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "ASCII digits" in caught.value.message()
    finally:
        await client.close()
    overflowing = tensor_pb2.Tensor(name="x", datatype="FP32", shape=[2**32, 2**32], raw_contents=b"")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.stub.Infer(router_pb2.InferRequest(model=ref("tiny"), inputs=[overflowing]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    # Counted in Python ints (an int64 product would wrap to 0 and match the empty bytes).
    assert "input byte size mismatch for input 'x'" in caught.value.details()
    assert f"Expected {2**64 * 4}, got 0" in caught.value.details()


def test_the_router_reports_the_package_version_as_its_server_version():
    from importlib.metadata import version

    from services.router.servicer import InferenceServicer

    servicer = InferenceServicer(None, None, None)  # type: ignore[arg-type]
    assert servicer.server_version == version("maas-mesh") == "0.1.0"
